"""The pattern that excites conv5_x filter 0: gradient ascent on the input, from the test image
that excites the filter most.

    python plot_gradient_pattern.py [--layer conv5_x] [--channel 0] [--steps 100] [--lr 0.05] [--penalty 0.01]

First every test image is scored by the sum of the filter's feature map (the report's criterion)
and the best is printed. From that image x0, Adam maximizes  activation(x) - penalty * ||x - x0||^2
over the normalized input, clipping it after each step to the range of [0, 1] pixels. Saved: the
start image, the pattern, and their difference (shown as 0.5 + d / (2 max|d|), grey = 0).
"""
import utils
from visualize import ascent, cli


def main(argv=None):
    p = cli.plot_parser(__doc__, script=__file__, layer="conv5_x", channel=0, image_index=cli.TOP_ACTIVATING)
    p.add_ascent_flags(steps=100, lr=0.05, penalty=0.01, lr_help="Adam learning rate, in normalized input units",
                       penalty_help="lambda of lambda * ||x - x0||^2")
    args = p.parse_args(argv)
    run = p.load(args)
    return ascent.plot_gradient_pattern(run, args.layer, args.channel, args.figures_dir, args.steps, args.lr,
                                        args.penalty, index=args.image_index,
                                        figure=p.figure_record(args, "gradient_pattern", run))


if __name__ == "__main__":
    utils.run_cli(main)
