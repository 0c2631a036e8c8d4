"""Test images 4531-4546, each beside its deconvnet reconstruction from conv1 (channel 0 by default).

    python plot_conv1_reconstructed_pattern.py [--images 4531-4546] [--channel 0]

The reconstruction (Zeiler & Fergus) projects one channel's feature map back to pixel space with
the transposed network (model.ResNet.reconstruct). Display: each reconstruction r is shown as
0.5 + r / (2 max|r|), so grey is 0.
"""
import utils
import visualize


def main(argv=None):
    args = visualize.plot_parser(__doc__, images="4531-4546", layer="conv1", channel=0, path="both").parse_args(argv)
    run = visualize.load_for_plots(args)
    return [visualize.plot_reconstructions(run, args.layer, args.channel, args.path, args.figures_dir)]


if __name__ == "__main__":
    utils.run_cli(main)
