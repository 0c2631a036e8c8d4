"""A test image and its conv5_x feature maps (the report's figure for test image 7876).

    python plot_conv5_feature_map.py [--image-index 7876] [--layer conv5_x]

conv5_x maps are 2x2 (8x the width of channels); all share one grey scale (the colour bar);
channel 0 is top left, then row by row.
"""
import utils
import visualize


def main(argv=None):
    args = visualize.plot_parser(__doc__, image_index=7876, layer="conv5_x").parse_args(argv)
    run = visualize.load_for_plots(args)
    return [visualize.plot_feature_maps(run, args.layer, args.figures_dir)]


if __name__ == "__main__":
    utils.run_cli(main)
