"""Feature visualization: for each of a stage's channels, the image that excites it, regularised so
that it shows a feature rather than per-pixel speckle.

    python plot_feature_visualization.py [--layer conv5_x] [--channels 0-15] [--steps 160] [--lr 0.08]
                                         [--seed 0] [--objective channel] [--start noise] [--measure]

One image per channel, all channels optimised as one batch by Adam. Each image is the sigmoid of a
colour-decorrelated Fourier image whose coefficients are scaled by 1/frequency (colour statistics
of the checkpoint's own training split, computed once and cached beside it), and at every step it
must excite its channel through a random shift (up to 2 px), zoom (0.9-1.1) and rotation (up to
5 degrees). Objective: the channel's mean over the stage's output, or its centre unit (neuron).

--start top starts each image from the test image that excites its channel most, with the report's
distance term (--penalty), and draws the report's pattern (plot_gradient_pattern.py's pixel-space
gradient ascent with the same steps and penalty) beside it. --measure prints how robust and how
smooth the patterns are (see the README). Saved: feature_visualization_<layer>.png and, beside it,
feature_visualization_<layer>.pt = {"channels": [c, ...], "images": (N, 3, 32, 32) in [0, 1], ...}
and feature_visualization_<layer>.json (the same but the images, and the figure's flags for the page);
every flag not at its default is added to the names (--objective neuron as _neuron, --start top as _top).
"""
import utils
from visualize import cli, featurevis


def main(argv=None):
    p = cli.plot_parser(__doc__, script=__file__, layer="conv5_x", channels="0-15")
    p.add_ascent_flags(steps=featurevis.FV_STEPS, lr=featurevis.FV_LR, penalty=0.01,
                       lr_help="Adam learning rate on the Fourier coefficients",
                       penalty_help="with --start top, lambda of the report's lambda * ||x - x0||^2")
    p.add_argument("--seed", type=int, default=0,
                   help="start and transformations; the same seed gives the same images on a CPU (default: %(default)s)")
    p.add_argument("--objective", choices=featurevis.OBJECTIVES, default="channel",
                   help="channel: the channel's mean over the stage's output; neuron: its centre unit "
                        "(default: %(default)s)")
    p.add_argument("--start", choices=featurevis.STARTS, default="noise",
                   help="noise: the data's mean colour with faint 1/f noise; top: the test image that "
                        "excites the channel most, with the distance term (default: %(default)s)")
    p.add_argument("--measure", action="store_true",
                   help="also print the shift-averaged activation against the most exciting test image's, "
                        "and the high-frequency energy against plain pixel-space gradient ascent")
    p.add_quick(f"{featurevis.QUICK_FV_STEPS} steps (unless --steps says), not {featurevis.FV_STEPS}",
                steps=featurevis.QUICK_FV_STEPS)
    args = p.parse_args(argv)
    cli.check_seed(args.seed)
    run = p.load(args, test_split=args.start == "top" or args.measure)
    channels = args.channels.of(run.model, args.layer)
    if channels is None:  # auto: channels 0-15, or all of a stage with fewer
        channels = list(range(min(16, run.model.channels(args.layer))))
    return featurevis.plot_feature_visualization(run, args.layer, channels, args.figures_dir, steps=args.steps,
                                                 lr=args.lr, seed=args.seed, objective=args.objective,
                                                 start=args.start, penalty=args.penalty, measure=args.measure,
                                                 figure=p.figure_record(args, "feature_visualization", run))


if __name__ == "__main__":
    utils.run_cli(main)
