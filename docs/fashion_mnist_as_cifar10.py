"""Write the real Fashion-MNIST in the CIFAR-10 on-disk format, for the README's gallery.

    apt-get install dataset-fashion-mnist          # Debian's copy, under /usr/share/datasets/fashion-mnist
    python docs/fashion_mnist_as_cifar10.py --out data/fashion
    python train.py --data-dir data/fashion --width 16 --epochs 6 --checkpoint checkpoints/fashion_w16.pt

CIFAR-10 cannot be downloaded where this repo is built, and synthetic gratings show nothing about
how a visualization treats a picture; Fashion-MNIST's 70,000 real photographs of clothing can be.
Each 28x28 grey image is padded with 2 black pixels a side to 32x32 and copied into all three
colour channels; train.py and the plot scripts then read it with the same code that reads CIFAR-10
(it is named by the NAME.txt written beside it, "Fashion-MNIST in the CIFAR-10 format", never "CIFAR-10",
since its md5 sums are not the archive's).
"""
import argparse
import gzip
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cifar10  # noqa: E402
import utils  # noqa: E402

CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def read_idx(path):
    """An idx file (the MNIST format: big-endian magic, dimensions, then uint8 data) as a numpy array."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def as_cifar(images):
    """(N, 28, 28) grey -> (N, 3, 32, 32) uint8: padded with 2 black pixels a side, grey in R, G and B."""
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return torch.from_numpy(np.repeat(padded[:, None], 3, axis=1).copy())


def main(argv=None):
    p = utils.OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="/usr/share/datasets/fashion-mnist",
                   help="folder of the four idx files (default: %(default)s)")
    p.add_argument("--out", required=True, help="data dir to write cifar-10-batches-py/ into")
    args = p.parse_args(argv)
    source = Path(args.source)
    names = {split: [source / f"{prefix}-{kind}-idx{dims}-ubyte.gz" for kind, dims in (("images", 3), ("labels", 1))]
             for split, prefix in (("train", "train"), ("test", "t10k"))}
    missing = [str(path) for paths in names.values() for path in paths if not path.is_file()]
    if missing:
        raise utils.UserError(f"{missing[0]} not found; install Fashion-MNIST with `apt-get install "
                              f"dataset-fashion-mnist` or pass --source FOLDER")
    splits = []
    for images, labels in names.values():
        splits += [as_cifar(read_idx(images)), torch.from_numpy(read_idx(labels).astype(np.int64))]
    folder = cifar10.write_cifar10_folder(args.out, *splits, CLASSES)
    (Path(args.out) / cifar10.NAME_FILE).write_text("Fashion-MNIST in the CIFAR-10 format\n", encoding="utf-8")  # its name in titles
    print(f"wrote {folder}: {len(splits[0])} train and {len(splits[2])} test images of Fashion-MNIST")


if __name__ == "__main__":
    utils.run_cli(main)
