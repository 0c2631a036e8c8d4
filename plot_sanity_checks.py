"""Sanity checks (Adebayo et al. 2018): does each picture of a unit depend on what the network learned?

    python plot_sanity_checks.py [--layer conv5_x] [--channel 1] [--images 4531-4546] [--seed 0]
        [--fv-steps N] [--pattern-steps N]

Cascading randomisation: the unit is drawn by the trained network, then with its stage re-initialised
(model.init_weights, as a freshly built ResNet: seeded), then also the stage below, and so on down to
conv1. Each network draws the unit with every technique: the deconvnet, guided backpropagation and the
plain gradient (ResNet.reconstruct through both branches) for each test image, the feature
visualization (plot_feature_visualization.py's, the same start at every depth) and the gradient
pattern (plot_gradient_pattern.py's ascent, from each test image), each with fewer steps than its own
script takes (--fv-steps, --pattern-steps: the similarities stay within their spread over seeds,
docs/figures.md), every depth optimised in the same batch. Under each
picture: its similarity to the trained network's, the Spearman rank correlation of sum over colour
|r| over the pixels (r: the reconstruction, or the pattern minus its start), averaged over the test
images; n/a where it is undefined (a constant picture: the unit is silent). A picture that barely
changes shows the input or the technique, not what the network learned.

Saved: sanity_<layer>_channel<c>.png and, beside it, sanity_<layer>_channel<c>.json = {"layer",
"channel", "images", "depths": ["trained", then each stage re-initialised, in order], "seed",
"similarity": {technique: [one number per depth, null where undefined]}, "figure": its flags, for the page};
every flag not at its default is added to both names (sanity_conv5_x_channel1_images0-3_seed2.png).
"""
import utils
from visualize import cli, sanity


def main(argv=None):
    p = cli.plot_parser(__doc__, script=__file__, images=sanity.IMAGES, layer="conv5_x", channel=1)
    p.add_argument("--seed", type=int, default=0,
                   help="the re-initialisation's and the feature visualization's; the same seed gives the same "
                        "numbers on a CPU (default: %(default)s)")
    p.add_argument("--fv-steps", type=int, default=sanity.SANITY_FV_STEPS,
                   help="the feature visualization's steps at every depth, at least 1 (default: %(default)s)")
    p.add_argument("--pattern-steps", type=int, default=sanity.PATTERN_STEPS,
                   help="the gradient pattern's steps at every depth, at least 1 (default: %(default)s; "
                        "plot_gradient_pattern.py takes 100)")
    p.add_quick(f"test images {sanity.QUICK_IMAGES} (unless --images says), not {sanity.IMAGES}", images=sanity.QUICK_IMAGES)
    args = p.parse_args(argv)
    cli.check_seed(args.seed)
    for flag in ("fv_steps", "pattern_steps"):
        if getattr(args, flag) < 1:
            raise utils.UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    run = p.load(args)
    return sanity.plot_sanity_checks(run, args.layer, args.channel, args.images, args.figures_dir, seed=args.seed,
                                     fv_steps=args.fv_steps, pattern_steps=args.pattern_steps,
                                     figure=p.figure_record(args, "sanity", run))


if __name__ == "__main__":
    utils.run_cli(main)
