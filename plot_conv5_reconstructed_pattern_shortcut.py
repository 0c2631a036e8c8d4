"""Test images 4531-4546, each beside its deconvnet reconstruction from conv5_x channel 1, with the
signal sent only through the shortcut at conv5_x's residual sums (both branches below conv5_x).

    python plot_conv5_reconstructed_pattern_shortcut.py [--images 4531-4546] [--channel 1] [--top1] [--scale shared]
        [--method deconvnet|guided|gradient]

plot_conv5_reconstructed_pattern_trunk.py is the same through the trunk. Above each
reconstruction: the channel's activation on the image, max over positions (sum), or "silent" where it
is 0. Display: each reconstruction r is shown as 0.5 + r / (2 max|r|), so grey is 0; the max is per
image, or with --scale shared one for all panels. --top1 projects only the strongest activation.
--method guided or gradient goes back by guided backpropagation or the plain gradient instead
(ResNet.reconstruct); the file name then ends in _guided or _gradient.
"""
import utils
from visualize import figures


def main(argv=None):
    return figures.reconstructions_main(__doc__, argv, script=__file__, layer="conv5_x", channel=1, path="shortcut")


if __name__ == "__main__":
    utils.run_cli(main)
