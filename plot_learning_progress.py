"""train.py's four learning-progress figures (train accuracy and loss, test accuracy and loss against
iterations), redrawn from the history stored in a checkpoint.

    python plot_learning_progress.py [--checkpoint checkpoints/resnet18_cifar10.pt]

train.py draws the same figures after every epoch; this redraws them without training, e.g. into
another --figures-dir. Only the checkpoint is read, no data.
"""
import utils
from visualize import cli, progress


def main(argv=None):
    parser = cli.plot_parser(__doc__, script=__file__)
    args = parser.parse_args(argv)
    run = parser.load(args, test_split=False)
    ckpt = run.checkpoint
    paths = progress.save_progress_figures(ckpt["history"], args.figures_dir, progress.progress_title(ckpt["config"]),
                                           parser.figure_record(args, "progress", run))
    for path in paths:
        if path.suffix == ".png":
            print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    utils.run_cli(main)
