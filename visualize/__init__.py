"""What the plot scripts share, one concern a module. Imports point one way, down this list:

    page        figures/index.html, built from the figures' records  -> cli, context, progress, drawing
    dynamics    each stage through training: CKA, probe, evidence  -> trust, cli, units, context, scoring,
                                                                        drawing
    evolution   Zeiler & Fergus's Figure 4 from the snapshots        -> atlas, context, drawing
    figures     feature maps and reconstructions of the report       -> cli, scoring, drawing
                (and the three reconstruction scripts' main)
    invariance  Zeiler & Fergus's invariance: images moved, turned  -> trust, evidence, scoring, drawing
    occlusion   Zeiler & Fergus's occlusion: a grey square slid over -> trust, evidence, context, attribution, scoring,
                                                                        drawing
    trust       both axes of trust in one table: unit and class maps -> faithfulness, sanity, cli, context,
                                                                        attribution, drawing
    evidence    the class-evidence figure and its JSON               -> cli, context, attribution, scoring, drawing
    faithfulness deletion, insertion, ROAD and the baseline maps    -> scoring
    sanity      sanity checks: Adebayo's cascading randomisation     -> featurevis, ascent, cli, context, scoring,
                                                                        drawing
    featurevis  feature visualization at 32x32                       -> ascent, cli, context, scoring, drawing
    atlas       the top-9 unit atlas per stage                       -> cli, units, context, scoring, drawing
    ascent      the report's gradient-ascent pattern                 -> cli, context, scoring, drawing
    cli         the scripts' shared flags, each parsed once, checked; -> units, context, drawing
                a figure's record (what the page and file names read)
    units       each unit's class selectivity and ablation           -> scoring
    context     PlotRun: the checkpoint, test split and its one pass -> attribution, scoring, drawing
    attribution class evidence maps: Grad-CAM, gradients, occlusion  -> scoring
    progress    the learning-progress figures (train.py draws them)  -> drawing
    scoring     running stages, scoring units on images              -> model, data
    drawing     every matplotlib figure is made and saved here       -> data, utils

Below the package: snapshots (context finds a run's), checkpoint (context reads one, featurevis saves its cache atomically, progress takes
the history's windows from it), data, model (trust and dynamics fold its BatchNorms: model.fold_batchnorm), speed
(cli's --device) and utils.

Import the modules themselves (`from visualize import cli, figures`); this file imports nothing, so
train.py can draw its progress figures without loading the rest.
"""
