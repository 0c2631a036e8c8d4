"""How far each picture can be trusted, on both axes, in one table (visualize/trust.py).

    python plot_trust.py [--count 256] [--target predicted] [--step-percent 5] [--noise 0.01] [--seed 0]
                          [--images 4531-4546] [--quick]

A row per technique: the unit pictures of the sanity checks (deconvnet, guided backpropagation, the
plain gradient, the feature visualization, the gradient pattern: conv5_x channel 1, plot_sanity_checks.py's)
and the class-evidence maps (Grad-CAM at conv4_x and conv3_x, saliency, SmoothGrad, integrated
gradients, occlusion; visualize/attribution.py's defaults) for each image's predicted (or true) class,
beside a seeded random map and the Sobel edge map. Columns: does the map depend on the weights
(Spearman rho to the trained map with conv5_x, and with every stage, re-initialised: the cascade of
Adebayo et al. 2018), on the class (rho to the map of a random other class, Sixt et al. 2020), both on
the test images --images; and is it faithful (deletion and insertion AUC, Petsiuk et al. 2018; ROAD
most- and least-relevant-first, Rong et al. 2022), on the first --count test images. Each number is
a mean over the images with its standard error, and a verdict (pass, fail) is given only where the
number is 2 standard errors from its line; else it says unresolved. docs/class_evidence.md gives
every definition, and what --count costs.

Saved: trust.png and trust.json = {"count", "target", "seed", "step_percent", "road_noise",
"road_levels", "unit", "dependence_images", "depths", "pass_below", "z", "rows": {row: {"kind", each
column's mean and "<column> SE" its standard error (absent: n/a; null: undefined), "passes": {test:
"pass" | "fail" | "unresolved"}, "cascade": the mean rho at each depth}}, "figure": its flags, for the
page}; a non-default choice is added to both names (trust_count64_true.png, trust_quick.png).
"""
import math

import utils
from visualize import cli, faithfulness, sanity, trust


def main(argv=None):
    p = cli.plot_parser(__doc__, script=__file__, images=sanity.IMAGES)
    p.add_argument("--count", type=int, default=None,
                   help=f"the first N test images the faithfulness columns are measured on, 1..the split's "
                        f"size; fewer are faster and less certain (default: {trust.COUNT}, or the whole split "
                        f"if smaller)")
    p.add_argument("--target", default="predicted",
                   help=f"the class each map explains: {' or '.join(trust.TARGETS)} (default: %(default)s)")
    p.add_argument("--step-percent", type=float, default=faithfulness.DELETION_STEP,
                   help="deletion and insertion: the percentage of the pixels deleted or inserted at each step "
                        "(5: 20 steps), above 0 and at most 100 (default: %(default)s)")
    p.add_argument("--noise", type=float, default=faithfulness.ROAD_NOISE,
                   help="ROAD's imputation noise, standard deviation in [0, 1] pixels, 0 or above (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="the re-initialisation's, the random map's, the random other class's and ROAD's noise, "
                        "0..2^63-1 (default: %(default)s)")
    p.add_quick(f"faithfulness on the first {trust.QUICK_COUNT} test images (unless --count says), not "
                f"{trust.COUNT}, and the weights and class on test images {sanity.QUICK_IMAGES} (unless --images "
                f"says), as plot_sanity_checks.py --quick", images=sanity.QUICK_IMAGES)
    args = p.parse_args(argv)
    if args.target not in trust.TARGETS:
        raise utils.UserError(f"--target {args.target!r}: choose one of {', '.join(trust.TARGETS)}")
    if not 0 < args.step_percent <= 100:
        raise utils.UserError(f"--step-percent {args.step_percent:g} is not a percentage of the pixels; choose above 0 "
                              f"and at most 100")
    if not (math.isfinite(args.noise) and args.noise >= 0):
        raise utils.UserError(f"--noise {args.noise}: must be a finite number, 0 or above (0: no noise)")
    cli.check_seed(args.seed)
    if args.count is not None and args.count < 1:
        raise utils.UserError(f"--count {args.count}: must be at least 1 (the first N test images)")
    run = p.load(args)
    if args.count is not None and args.count > len(run.images):
        raise utils.UserError(f"--count {args.count} is out of range: the test split has {len(run.images)} images; "
                              f"choose 1..{len(run.images)}")
    return trust.plot_trust(run, args.figures_dir, args.count, args.target, args.seed, args.step_percent, args.noise,
                            args.images, p.figure_record(args, "trust", run))


if __name__ == "__main__":
    utils.run_cli(main)
