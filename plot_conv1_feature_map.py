"""A test image and its conv1 feature maps (the report's figure for test image 7876).

    python plot_conv1_feature_map.py [--image-index 7876] [--layer conv1] [--channels 0-15]

All maps share one grey scale (the colour bar); channel 0 is top left, then row by row, and the
row and column labels add up to a map's channel. --channels shows only those, each labelled with
its channel and maximum.
"""
import utils
from visualize import cli, figures


def main(argv=None):
    parser = cli.plot_parser(__doc__, script=__file__, image_index=7876, layer="conv1", channels="auto")
    args = parser.parse_args(argv)
    run = parser.load(args)
    channels = args.channels.of(run.model, args.layer)
    return figures.plot_feature_maps(run, args.image_index, args.layer, args.figures_dir, channels,
                                     parser.figure_record(args, "feature_maps", run))


if __name__ == "__main__":
    utils.run_cli(main)
