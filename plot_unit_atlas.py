"""What each unit learned, as Zeiler & Fergus's Figure 2: for each channel of a stage, the 9 test
images with the largest single activation, each as its top-1 deconvnet projection beside the image
patch, both cropped to the receptive field of the strongest unit, under the unit's numbers.

    python plot_unit_atlas.py [--layer conv2_x,conv3_x,conv4_x,conv5_x] [--channels 0-15]
        [--method deconvnet|guided|gradient] [--ablation-images 1000]

One figure per stage, figures/atlas_<layer>.png, and beside it atlas_<layer>.json: per channel the 9
images with their activation, class, the strongest position (row, col) in the stage's output and its
receptive field box [top, left, bottom, right] (inclusive pixels); the channel's class selectivity
(Morcos et al. 2018: (mu_max - mu_rest) / (mu_max + mu_rest), mu_c its mean activation on the test
images of class c) and leading class; and its ablation: the test accuracy with the channel set to 0,
beside the network's own, and the class whose accuracy drops most, over the first --ablation-images
test images. One batched pass over the test split scores every channel of every stage asked for (and
gives the selectivity); the ablations run only the network above each stage, per channel. The 9
projections of a channel share one display scale, 0.5 + r / (2 max|r|) (grey = 0), so their
strengths compare; light blue is where a receptive field reaches past the image border. --method
guided or gradient projects by guided backpropagation or the plain gradient instead; the file names
then end in _guided or _gradient.
"""
import utils
from visualize import atlas, cli, units


def main(argv=None):
    p = cli.plot_parser(__doc__, script=__file__, layers=atlas.ATLAS_LAYERS, stage_channels=atlas.DEFAULT_CHANNELS_HELP,
                        ablation_images=True, method="deconvnet")
    p.add_quick(f"the ablations on the first {units.QUICK_ABLATION_IMAGES} test images (unless --ablation-images "
                f"says), not {units.ABLATION_IMAGES}")
    args = p.parse_args(argv)
    run = p.load(args)
    channels = (atlas.default_channels(run.model, args.layers) if args.channels is None
                else {layer: args.channels.of(run.model, layer) for layer in args.layers})
    ablation_images = args.ablation_images
    if ablation_images is None and args.quick:
        ablation_images = min(units.QUICK_ABLATION_IMAGES, len(run.images))
    unit_atlas = atlas.unit_atlas(run, channels, ablation_images=ablation_images)
    figure = p.figure_record(args, "atlas", run)
    return [path for layer, layer_units in unit_atlas.items()
            for path in atlas.plot_unit_atlas(run, layer, layer_units, args.checkpoint, args.figures_dir, args.method,
                                              figure=figure)]


if __name__ == "__main__":
    utils.run_cli(main)
