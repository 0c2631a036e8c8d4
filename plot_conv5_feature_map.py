"""A test image and its conv5_x feature maps (the report's figure for test image 7876).

    python plot_conv5_feature_map.py [--image-index 7876] [--layer conv5_x] [--channels 0-15|all]

conv5_x maps are 2x2 (8x the width of channels: 512 at width 64), too many to read at once, so by
default the figure shows the 64 channels with the largest maximum on the image, most active first,
each labelled with its channel and maximum; --channels chooses others (all: every map, found by row
and column labels). All share one grey scale (the colour bar).
"""
import utils
from visualize import cli, figures


def main(argv=None):
    parser = cli.plot_parser(__doc__, script=__file__, image_index=7876, layer="conv5_x", channels="auto")
    args = parser.parse_args(argv)
    run = parser.load(args)
    channels = args.channels.of(run.model, args.layer)
    return figures.plot_feature_maps(run, args.image_index, args.layer, args.figures_dir, channels,
                                     parser.figure_record(args, "feature_maps", run))


if __name__ == "__main__":
    utils.run_cli(main)
