"""Test images 4531-4546, each beside its deconvnet reconstruction from conv1 (channel 0 by default).

    python plot_conv1_reconstructed_pattern.py [--images 4531-4546] [--channel 0] [--top1] [--scale shared]
        [--method deconvnet|guided|gradient]

The reconstruction (Zeiler & Fergus) projects one channel's feature map (with --top1 only its
strongest activation) back to pixel space with the transposed network (model.ResNet.reconstruct).
Above each: the channel's activation on the image, max over positions (sum), or "silent" where it is
0. Display: each reconstruction r is shown as 0.5 + r / (2 max|r|), so grey is 0; the max is per
image, or with --scale shared one for all panels.
--method guided or gradient goes back by guided backpropagation or the plain gradient instead
(ResNet.reconstruct); the file name then ends in _guided or _gradient.
"""
import utils
from visualize import figures


def main(argv=None):
    return figures.reconstructions_main(__doc__, argv, script=__file__, layer="conv1", channel=0)


if __name__ == "__main__":
    utils.run_cli(main)
