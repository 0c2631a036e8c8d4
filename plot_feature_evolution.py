"""What a few units of each stage respond to through training: Zeiler & Fergus's Figure 4 for a ResNet,
from the snapshots train.py kept beside the checkpoint (train.py --snapshots; snapshots.py).

    python plot_feature_evolution.py [--checkpoint checkpoints/resnet18_cifar10.pt]
        [--layer conv2_x,conv3_x,conv4_x,conv5_x] [--channels 0-7] [--method deconvnet|guided|gradient] [--quick]

For each stage, figures/evolution_<layer>.png: a row per channel, a column per snapshot (epoch 0, the
initial weights, to the last), each tile the unit's strongest activation over the test split at that
snapshot, projected back to the pixels from that one activation (the deconvnet unless --method says)
beside the image patch, both cropped to the receptive field of the strongest unit as the unit atlas
crops them, headed by the activation and the image's class. One pass over the test split per snapshot
scores every channel of every stage. Beside it evolution_<layer>.json: per channel and snapshot the
epoch, iteration, test image, activation, position (row, col) in the stage's output and receptive
field box [top, left, bottom, right] (inclusive pixels), and the class. --method guided or gradient,
and channels other than the default, are added to the file names (evolution_conv2_x_guided_channels0-3);
--quick searches the first 2,000 test images only, a first look (evolution_conv2_x_quick).
--checkpoint names the run: its snapshots are the files of <checkpoint>.snapshots/ (or pass that folder).
"""

import utils
from visualize import atlas, cli, evolution
from visualize.context import QUICK_SPLIT
from visualize.drawing import format_indices


def main(argv=None):
    p = cli.plot_parser(__doc__, script=__file__, layers=evolution.EVOLUTION_LAYERS,
                        stage_channels=evolution.DEFAULT_CHANNELS_HELP, method="deconvnet")
    p.add_quick(f"each tile the strongest activation over the first {QUICK_SPLIT} test images, not the whole split "
                f"(one pass over them a snapshot, most of the time)")
    args = p.parse_args(argv)
    runs = p.load_snapshots(args)
    model = runs[-1][1].model
    channels = (atlas.default_channels(model, args.layers, evolution.EVOLUTION_CHANNELS) if args.channels is None
                else {layer: args.channels.of(model, layer) for layer in args.layers})
    count = QUICK_SPLIT if args.quick else None
    grid = evolution.feature_evolution(runs, channels, count)
    record = {"figure": p.figure_record(args, "feature_evolution")}
    paths = []
    for layer in args.layers:
        suffix = ("" if args.channels is None else f"_channels{format_indices(channels[layer])}") + \
            ("_quick" if args.quick else "")
        paths += evolution.plot_feature_evolution(grid, layer, args.figures_dir, args.method, record, suffix, count)
    return paths


if __name__ == "__main__":
    utils.run_cli(main)
