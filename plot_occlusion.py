"""Occlusion (Zeiler & Fergus 2014, their Figure 7): does the network look at the object or at its
context? A grey square slid over each test image, and what the network does as a function of where it is.

    python plot_occlusion.py [--images 4531-4533] [--size 8] [--stride 1] [--method deconvnet]

A row a test image; the square is --size pixels a side in the data's mean colour, moved --stride pixels
at a time. (a) the image, its true class and its probability, and (yellow) the square where it lowers
that probability most; (b) the total activation of the image's strongest conv5_x channel (the one whose
map sums highest unoccluded), the square at each position; (c) that channel projected back to the pixels
(--method) on this image and on the 3 other test images it excites most; (d) the probability of the
true class; (e) the most probable class, in the legend's colours. (b), (d) and (e) are drawn over the
image in grey, each value where the square's centre was. visualize/occlusion.py says every convention.

Saved: occlusion.png and, beside it, occlusion.json = {"figure" (the flags, the command that redraws
it), "square", "stride", "baseline", "method", "layer", "starts" (the square's top-left rows and columns,
P of them), "classes", "per_image": [{"index", "true", "true_name", "probability" (of the true class,
unoccluded), "channel", "total" (its activation unoccluded), "activation" (P x P, row: the square's top,
column: its left), "true_probability" (P x P), "predicted" (P x P class indices), "projections":
{"images", "totals", "maps" (3 x 32 x 32 each)}}]}; a flag not at its default is part of both names.
"""

import utils
from visualize import cli, occlusion
from visualize.attribution import check_options


def main(argv=None):
    p = cli.plot_parser(__doc__, script=__file__, images="4531-4533", method="deconvnet")
    p.add_argument("--size", type=int, default=8, help="the square's side in pixels, 1..32 (default: %(default)s)")
    p.add_argument("--stride", type=int, default=1,
                   help="pixels the square moves a step, 1..32 (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        check_options("occlusion", {"k": args.size, "s": args.stride}, names={"k": "--size", "s": "--stride"})
    except ValueError as err:
        raise utils.UserError(str(err)) from None
    run = p.load(args)
    record = p.figure_record(args, "occlusion")
    return occlusion.plot_occlusion(run, args.images, args.size, args.stride, args.method, args.figures_dir,
                                    record, "occlusion" + cli.name_suffix(record))


if __name__ == "__main__":
    utils.run_cli(main)
