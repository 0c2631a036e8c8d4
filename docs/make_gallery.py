"""Regenerate the README's gallery, docs/gallery/*.png, from one checkpoint.

    python docs/make_gallery.py --checkpoint checkpoints/fashion_w16.pt [--data-dir DIR]

Runs plot_all.py (every figure, with each script's defaults) and the reconstruction scripts once more
with --method guided and --method gradient, into a scratch folder, then copies the figures the
README shows into docs/gallery/ and writes docs/gallery/SOURCE.txt: the checkpoint, its data and its
last test accuracy, so each caption can say what the pictures were made from. The captions name the data
as cifar10.describe_dataset names it now (Fashion-MNIST by the NAME.txt beside its folder), not by the
folder it lay in on the machine that trained the checkpoint.
"""
import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import plot_all  # noqa: E402
import plot_conv5_reconstructed_pattern_trunk  # noqa: E402
import checkpoint  # noqa: E402
import cifar10  # noqa: E402
import utils  # noqa: E402

GALLERY = Path(__file__).resolve().parent / "gallery"
SHOWN = ["train_accuracy.png", "test_accuracy.png", "conv1_filters_rgb.png", "conv1_feature_maps_image7876.png",
         "conv5_x_feature_maps_image7876.png", "conv1_channel0_reconstructions.png",
         "conv5_x_channel1_reconstructions_shortcut.png", "conv5_x_channel1_reconstructions_trunk.png",
         "conv5_x_channel1_reconstructions_trunk_guided.png", "conv5_x_channel1_reconstructions_trunk_gradient.png",
         "gradient_pattern_conv5_x_channel0.png", "atlas_conv2_x.png", "atlas_conv5_x.png",
         "feature_visualization_conv5_x.png", "sanity_conv5_x_channel1.png", "class_evidence.png",
         "trust.png", "invariance.png", "occlusion.png"]


def main(argv=None):
    p = utils.OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint written by train.py")
    p.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ (default: the checkpoint's)")
    p.add_argument("--figures-dir", help="keep every figure, JSON and index.html there (default: a scratch folder)")
    args = p.parse_args(argv)
    made_by = ["--checkpoint", args.checkpoint] + (["--data-dir", args.data_dir] if args.data_dir else [])
    ckpt = checkpoint.read_checkpoint(args.checkpoint)
    config, history = ckpt["config"], ckpt["history"]
    # the data as named now (by its NAME.txt, which holds on any machine), not as the run recorded it
    # when it trained (by the folder it lay in there)
    data_name = cifar10.describe_dataset(args.data_dir or config["data_dir"], config["synthetic"])
    with tempfile.TemporaryDirectory() as scratch:
        renamed = Path(scratch) / "checkpoint" / Path(args.checkpoint).name
        checkpoint.save_atomic(dict(ckpt, config=dict(config, data_name=data_name)), renamed)
        shared = ["--checkpoint", str(renamed)] + (["--data-dir", args.data_dir] if args.data_dir else [])
        figures = Path(args.figures_dir) if args.figures_dir else Path(scratch) / "figures"
        plot_all.main([*shared, "--figures-dir", str(figures)])
        for method in ("guided", "gradient"):
            plot_conv5_reconstructed_pattern_trunk.main([*shared, "--figures-dir", str(figures), "--method", method])
        GALLERY.mkdir(exist_ok=True)
        for name in SHOWN:
            shutil.copyfile(figures / name, GALLERY / name)
    (GALLERY / "SOURCE.txt").write_text(
        f"made by: python docs/make_gallery.py {' '.join(made_by)}\n"
        f"checkpoint: {Path(args.checkpoint).name}, width {config['width']}, {ckpt['iteration']} iterations "
        f"({ckpt['epoch']} epochs), seed {config['seed']}\n"
        f"trained on: {data_name}\n"
        f"last test accuracy: {history['test_acc'][-1]:.4f}\n")
    print(f"wrote {len(SHOWN)} figures and SOURCE.txt into {GALLERY}")


if __name__ == "__main__":
    utils.run_cli(main)
