"""How far each picture can be trusted, on both axes, in one table (plot_trust.py): the unit pictures of
the sanity checks and the class-evidence maps of visualize.attribution, a row each, beside two maps
that know nothing of the network (faithfulness.random_map, faithfulness.edge_map).

Columns, each measured the same way for every row it applies to:

    weights: top, all   Adebayo et al. 2018's cascading randomisation: Spearman rho (sanity.spearman, over
                        the 32x32 pixels of faithfulness.relevance) between the map the trained network
                        draws and the one it draws with conv5_x re-initialised (top), and with every
                        stage re-initialised (all; sanity.reinitialised, seeded, the fc kept), averaged
                        over the images where it is defined. Unit pictures: the sanity checks' numbers
                        for conv5_x channel 1 on test images 4531-4546 (sanity.unit_sanity_checks, memoized,
                        so plot_all.py computes them once). Class maps: of the same target class.
    class               Sixt et al. 2020's random-logit test: rho between the map for the target class
                        and the map for a random other class (seeded), averaged over the images. Unit
                        pictures are not about a class: n/a.
    deletion, insertion faithfulness.deletion / insertion: the mean AUC over the images.
    ROAD MoRF, LeRF     faithfulness.road: the fraction still classified as the target, averaged over
                        the levels 10 %..90 %.
The baselines are computed like any other row: a seeded random map and the Sobel edge map depend on
neither the weights nor the class (rho 1 by construction, and measured), so their faithfulness is what
a map scores that knows nothing of the network.

A row passes a test when: weights: rho < PASS_BELOW at both depths; class: rho < PASS_BELOW (an
undefined rho, a map that became constant, counts as changed); faithful: its ROAD gap LeRF - MoRF is
wider than both baselines'. ROAD decides, not deletion: removing scattered pixels into the mean colour
takes an image out of the data the network knows, so a random map can "delete" best (it does on the
gallery's network), the bias ROAD's imputation was made to remove; deletion and insertion are shown
beside it.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data import normalize
from model import STAGES
from visualize import faithfulness, sanity
from visualize.attribution import attribute
from visualize.drawing import format_indices, save_text_table, wrap_title

# The class maps of the table: (row name, attribute's method, its stage); attribute's default options
CLASS_MAPS = (("Grad-CAM conv4_x", "gradcam", "conv4_x"), ("Grad-CAM conv3_x", "gradcam", "conv3_x"),
              ("saliency", "saliency", None), ("SmoothGrad", "smoothgrad", None),
              ("integrated gradients", "integrated_gradients", None), ("occlusion", "occlusion", None))
CLASS_MAP_NAMES = tuple(name for name, _, _ in CLASS_MAPS)
BASELINES = ("random map", "Sobel edge map")
UNIT = {"layer": "conv5_x", "channel": 1}  # plot_sanity_checks.py's defaults
UNIT_IMAGES = list(range(4531, 4547))  # and its test images (plot_trust.py --images)
TOP = STAGES[-1]  # the stage re-initialised first
COUNT = 16  # the first test images the class maps are measured on (plot_trust.py --count): cost, see docs
TARGETS = ("predicted", "true")
PASS_BELOW = 0.5  # rho under which a map is taken to have changed (weights, class)
COLUMNS = ("weights: top", "weights: all", "class", "deletion AUC", "insertion AUC", "ROAD MoRF", "ROAD LeRF")


@dataclass
class TrustRow:
    kind: str                       # "unit picture", "class map" or "baseline"
    values: dict = field(default_factory=dict)  # {column: number}; a column left out is n/a
    passes: dict = field(default_factory=dict)  # {"weights" | "class" | "faithful": bool}


def mean_similarity(maps, other):
    """sanity.defined_mean of the per-image Spearman rho between the relevance of two batches of maps."""
    pick = lambda m: faithfulness.relevance(m.cpu())[:, None]  # (N, 1, H, W) >= 0, as sanity.similarities reads
    return sanity.defined_mean(sanity.similarities(pick(maps), pick(other)))


def draw_class_maps(model, images, targets, names=CLASS_MAP_NAMES):
    """{row name: maps on the CPU} of the class maps `names` for the images and targets."""
    chosen = [entry for entry in CLASS_MAPS if entry[0] in names]
    return {name: attribute(model, images, targets, method, **({"layer": layer} if layer else {})).cpu()
            for name, method, layer in chosen}


def random_other_classes(targets, classes, seed):
    """For each target a class drawn uniformly from the other classes - 1, by a generator seeded with `seed`."""
    shift = torch.randint(1, classes, (len(targets),), generator=torch.Generator().manual_seed(seed))
    return (targets.cpu() + shift) % classes


def class_map_trust(model, images, targets, seed=0, step=faithfulness.DELETION_STEP, noise=faithfulness.ROAD_NOISE,
                    names=CLASS_MAP_NAMES):
    """{row name: {column: value}} of the class maps `names` and the two baselines on the uint8 images
    and their targets (N,): every column of the module's docstring."""
    device = next(model.parameters()).device
    trained = draw_class_maps(model, images, targets, names)
    maps = {**trained, BASELINES[0]: faithfulness.random_map(len(images), seed),
            BASELINES[1]: faithfulness.edge_map(images).cpu()}
    values = {name: {} for name in maps}
    fresh = {}
    for column, stages in (("weights: top", [TOP]), ("weights: all", sanity.cascade_depths(TOP))):
        fresh[column] = draw_class_maps(sanity.reinitialised(model, stages, seed).eval(), images, targets, names)
    others = random_other_classes(targets, model.fc.out_features, seed).to(device)
    fresh["class"] = draw_class_maps(model, images, others, names)
    for column, redrawn in fresh.items():
        for name in maps:
            # a baseline is drawn again exactly as before: it reads neither the weights nor the class
            values[name][column] = mean_similarity(maps[name], redrawn.get(name, maps[name]))
    for name, m in maps.items():
        values[name]["deletion AUC"] = faithfulness.deletion(model, images, targets, m, step, seed).mean_auc
        values[name]["insertion AUC"] = faithfulness.insertion(model, images, targets, m, step, seed).mean_auc
        for order in ("MoRF", "LeRF"):
            values[name][f"ROAD {order}"] = faithfulness.road(model, images, targets, m, order, noise=noise,
                                                             seed=seed).mean
    return values


def unit_picture_trust(run, unit_images=UNIT_IMAGES, seed=0):
    """{technique: {"weights: top", "weights: all"}} of the unit pictures: the sanity checks of UNIT
    on the test images `unit_images`."""
    checks = sanity.unit_sanity_checks(run, UNIT["layer"], UNIT["channel"], unit_images, seed)
    return {name: {"weights: top": values[1], "weights: all": values[-1]} for name, values in checks.similarity.items()}


def changed(values):
    """Whether every defined rho of `values` is below PASS_BELOW: an undefined one (NaN) is a map that
    became constant, which has kept nothing of the trained map's ranking."""
    return all(math.isnan(v) or v < PASS_BELOW for v in values)


def verdicts(rows):
    """Each row's passes (the module's docstring), against the baselines' values."""
    gap = lambda v: v["ROAD LeRF"] - v["ROAD MoRF"]
    base_gaps = [gap(rows[name].values) for name in BASELINES]
    for row in rows.values():
        v = row.values
        if row.kind == "baseline":
            continue
        row.passes["weights"] = changed([v["weights: top"], v["weights: all"]])
        if "class" in v:
            row.passes["class"] = changed([v["class"]])
        if "ROAD MoRF" in v:
            row.passes["faithful"] = all(gap(v) > b for b in base_gaps)
    return rows


def trust_table(run, count=COUNT, target="predicted", seed=0, step=faithfulness.DELETION_STEP,
                noise=faithfulness.ROAD_NOISE, unit_images=UNIT_IMAGES):
    """{row name: TrustRow}: the unit pictures, the class maps on the first `count` test images for
    their predicted or true class (`target`), and the baselines; the unit pictures' sanity checks on
    the test images `unit_images`."""
    images = run.images[:count]
    if target == "true":
        targets = torch.as_tensor(run.labels[:count])
    else:
        targets = faithfulness.predictions(run.model, normalize(images.to(run.device))).cpu()
    rows = {name: TrustRow("unit picture", values) for name, values in unit_picture_trust(run, unit_images, seed).items()}
    for name, values in class_map_trust(run.model, images, targets.to(run.device), seed, step, noise).items():
        rows[name] = TrustRow("baseline" if name in BASELINES else "class map", values)
    return verdicts(rows)


def table_suffix(count, target, seed, step, noise, unit_images):
    """The file name's additions for every non-default choice ('' for the defaults)."""
    parts = [(unit_images != UNIT_IMAGES, f"images{format_indices(unit_images)}"), (count != COUNT, f"count{count}"), (target != "predicted", target), (seed != 0, f"seed{seed}"),
             (step != faithfulness.DELETION_STEP, f"step{step:g}"), (noise != faithfulness.ROAD_NOISE, f"noise{noise:g}")]
    return "".join(f"_{text}" for chosen, text in parts if chosen)


def cell_text(value):
    """A number as the table writes it: 'n/a' where the column does not apply, 'const.' where rho is
    undefined (the map became constant)."""
    return "n/a" if value is None else "const." if math.isnan(value) else f"{value:.2f}"


def plot_trust(run, figures_dir, count=COUNT, target="predicted", seed=0, step=faithfulness.DELETION_STEP,
               noise=faithfulness.ROAD_NOISE, unit_images=UNIT_IMAGES):
    """plot_trust.py: the table as trust<suffix>.png and .json in figures_dir; prints it; returns both paths."""
    rows = trust_table(run, count, target, seed, step, noise, unit_images)
    marks = {True: "pass", False: "fail"}
    header = [*COLUMNS, "passes"]
    cells = [[cell_text(row.values.get(column)) for column in COLUMNS]
             + [", ".join(f"{test} {marks[ok]}" for test, ok in row.passes.items()) or "reference"]
             for row in rows.values()]
    print(f"{'':>22}" + "".join(f"{column:>15}" for column in header[:-1]))
    for name, line in zip(rows, cells):
        print(f"{name:>22}" + "".join(f"{text:>15}" for text in line[:-1]) + f"  {line[-1]}")
    title = "\n".join(wrap_title(part) for part in (
        f"trust: unit pictures (sanity checks of {UNIT['layer']} channel {UNIT['channel']}, test images {format_indices(unit_images)}) "
        f"and class maps (the first {count} test images, {target} class), beside maps that know nothing of the network",
        f"weights: Spearman rho to the trained map with {TOP} (top) or every stage (all) re-initialised, seed {seed}; "
        f"class: rho to the map of a random other class; pass below {PASS_BELOW}",
        f"deletion / insertion: mean AUC of the target's probability, {step:g} % steps (lower / higher is faithful); "
        f"ROAD: fraction still the target, mean over 10-90 % removed (MoRF lower, LeRF higher), noise {noise:g}",
        run.caption))
    figures_dir = Path(figures_dir)
    suffix = table_suffix(count, target, seed, step, noise, unit_images)
    png = save_text_table(figures_dir / f"trust{suffix}.png", cells, title, header, list(rows),
                          [row.kind for row in rows.values()])
    record = {"count": count, "target": target, "seed": seed, "step_percent": step, "road_noise": noise,
              "road_levels": list(faithfulness.ROAD_LEVELS), "unit": {**UNIT, "images": unit_images}, "pass_below": PASS_BELOW,
              "rows": {name: {"kind": row.kind,
                              **{column: None if math.isnan(row.values[column]) else row.values[column]
                                 for column in COLUMNS if column in row.values},
                              "passes": row.passes} for name, row in rows.items()}}
    json_path = figures_dir / f"trust{suffix}.json"
    json_path.write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    print(f"wrote {json_path}")
    return [png, json_path]
