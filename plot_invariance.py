"""Invariance (Zeiler & Fergus 2014, their Figure 5): how far the network's representation and its answer
move as test images are shifted, scaled and turned.

    python plot_invariance.py [--images 4531-4546] [--translation=-8:8:1] [--scale 0.6:1.6:0.05]
                              [--rotation 0:360:10]

Each range is first:last:step (a range that starts below 0 is written with '=', as above). A row a
transformation: vertical translation in pixels (positive: down), scale about the centre, rotation in
degrees (counter-clockwise); each image resampled bilinearly (align_corners=False), the uncovered border
the data's mean colour. Left, transformed copies of the first image; then, against the transformation,
the distance |f(x) - f(Tx)| / |f(x)| of the original's representation from the transformed image's at
conv1, at conv5_x and at the pooled features fc reads (Zeiler & Fergus's layers 1 and 7), and the
probability of the true class: a thin line an image, black the mean over the images with a band of
± its standard error. visualize/invariance.py says every convention.

Saved: invariance.png and, beside it, invariance.json = {"figure" (the flags, the command that redraws
it), "images", "true", "true_names", "resampling", "original_probability" (N), "original_norm":
{representation: |f(x)| (N)}, "transformations": {name: {"what", "unit", "values" (K), "probability",
"distance": {representation: ...}, "relative_distance": {...} (each K rows of N images), "mean" and
"standard_error": {"probability" | "distance <representation>" | "relative_distance <representation>":
K numbers}}}}, representation one of conv1, conv5_x, pooled; a flag not at its default is part of both
names (a ':' written as '-').
"""

import utils
from visualize import cli, invariance


def main(argv=None):
    p = cli.plot_parser(__doc__, script=__file__, images="4531-4546")
    for kind, (unit, (low, high), default, what) in invariance.SWEEP_RULES.items():
        p.add_argument(f"--{kind}", type=invariance.sweep_type(kind), default=str(default),
                       help=f"the {what}, first:last:step in {unit}, within {low:g}..{high:g}, at most "
                            f"{invariance.MAX_STEPS} values (default: %(default)s)")
    args = p.parse_args(argv)
    run = p.load(args)
    record = p.figure_record(args, "invariance")
    sweeps = {kind: getattr(args, kind) for kind in invariance.TRANSFORMATIONS}
    return invariance.plot_invariance(run, args.images, sweeps, args.figures_dir, record,
                                      "invariance" + cli.name_suffix(record))


if __name__ == "__main__":
    utils.run_cli(main)
