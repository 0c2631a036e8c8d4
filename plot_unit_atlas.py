"""What each unit learned, as Zeiler & Fergus's Figure 2: for each channel of a stage, the 9 test
images with the largest single activation, each as its top-1 deconvnet projection beside the image
patch, both cropped to the receptive field of the strongest unit.

    python plot_unit_atlas.py [--layer conv2_x,conv3_x,conv4_x,conv5_x] [--channels 0-15]

One figure per stage, figures/atlas_<layer>.png, and beside it atlas_<layer>.json: per channel the 9
images with their activation, the strongest position (row, col) in the stage's output and its
receptive field box [top, left, bottom, right] (inclusive pixels). One batched pass over the test
split scores every channel of every stage asked for. The 9 projections of a channel share one
display scale, 0.5 + r / (2 max|r|) (grey = 0), so their strengths compare; light blue is where a
receptive field reaches past the image border.
"""
import utils
from visualize import atlas, cli


def main(argv=None):
    p = cli.plot_parser(__doc__)
    p.add_argument("--layer", dest="layers", default=atlas.ATLAS_LAYERS,
                   help="stages, a comma list from conv1, conv2_x, ..., conv5_x (default: %(default)s)")
    p.add_argument("--channels", help="channels of each stage, as --images elsewhere: a range A-B, a list "
                                      "1,2,3 or both mixed, or all (default: 0-15, or every channel of a stage "
                                      "with fewer)")
    args = p.parse_args(argv)
    layers = cli.parse_layers(args.layers)
    run = p.load(args)
    units = atlas.unit_atlas(run, cli.atlas_channels(run.model, layers, args.channels))
    return [path for layer, layer_units in units.items()
            for path in atlas.plot_unit_atlas(run, layer, layer_units, args.checkpoint, args.figures_dir)]


if __name__ == "__main__":
    utils.run_cli(main)
