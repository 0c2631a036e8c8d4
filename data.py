"""CIFAR-10 on disk, its download, the synthetic stand-in, and the batched augmentation.

Data is handled as one uint8 tensor (N, 3, 32, 32) per split: that is what the official archive
holds, and it fits on any device (150 MB for the training set). The folder format read here is the
official `cifar-10-batches-py/`; tests, demos and --synthetic write the same format and are read by
the same code.
"""
import math
import pickle
from pathlib import Path

import numpy as np
import torch

from utils import UserError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
SYNTHETIC_FOLDER = "synthetic"  # under --data-dir; holds a cifar-10-batches-py/ that is NOT CIFAR-10


# --------------------------------------------------------------------------- CIFAR-10 on disk

def _unpickle(path):
    """One batch file of the official archive: a Python-2 pickle whose keys load as bytes."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as err:  # a truncated or foreign file can raise almost anything here
        raise UserError(f"{path} is not a readable CIFAR-10 batch file ({type(err).__name__}); "
                        f"delete {path.parent} and extract {CIFAR10_ARCHIVE} again") from None
    if not isinstance(batch, dict):
        raise UserError(f"{path} holds a {type(batch).__name__}, not a CIFAR-10 batch dict; "
                        f"delete {path.parent} and extract {CIFAR10_ARCHIVE} again")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _read_batch(path, num_classes):
    batch = _unpickle(path)
    if "data" not in batch or "labels" not in batch:
        raise UserError(f"{path} has no 'data'/'labels' entries (keys: {sorted(batch)}); "
                        f"it is not a CIFAR-10 batch file")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (data.shape[0],):
        raise UserError(f"{path}: {labels.size} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"{path}: labels must lie in 0..{num_classes - 1}, "
                        f"found {labels.min()}..{labels.max()}")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.astype("int64"))


def _download_cifar10(data_dir):
    from torchvision.datasets.utils import download_and_extract_archive
    try:
        # Skips the download when a verified archive already lies in data_dir; checks the md5 either way.
        download_and_extract_archive(CIFAR10_URL, str(data_dir), filename=CIFAR10_ARCHIVE, md5=CIFAR10_MD5)
    except Exception as err:
        raise UserError(
            f"CIFAR-10 is not in {data_dir / CIFAR10_FOLDER} and could not be downloaded "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no network'}); "
            f"put {CIFAR10_ARCHIVE} (md5 {CIFAR10_MD5}) in {data_dir}/ and run again, "
            f"or use --synthetic for an offline demo") from None


def load_cifar10(data_dir, train, download=True):
    """(images uint8 (N, 3, 32, 32), labels int64 (N,), class names) of one split.

    Reads data_dir/cifar-10-batches-py/ in the official format: data_batch_* for training,
    test_batch for testing, batches.meta for class names. A folder in the same format with other
    content (a subset, a fixture, --synthetic data) loads the same way.
    """
    data_dir = Path(data_dir)
    folder = data_dir / CIFAR10_FOLDER
    if not folder.is_dir():
        if not download:
            raise UserError(f"no {CIFAR10_FOLDER}/ in {data_dir}; extract {CIFAR10_ARCHIVE} there "
                            f"or use --synthetic")
        _download_cifar10(data_dir)
    classes = list(CIFAR10_CLASSES)
    if (folder / "batches.meta").is_file():
        meta = _unpickle(folder / "batches.meta")
        if "label_names" in meta:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta["label_names"]]
    files = sorted(folder.glob("data_batch_*")) if train else [folder / "test_batch"]
    files = [f for f in files if f.is_file()]
    if not files:
        wanted = "data_batch_1..5" if train else "test_batch"
        raise UserError(f"{folder} has no {wanted}; delete the folder and extract {CIFAR10_ARCHIVE} again")
    parts = [_read_batch(f, len(classes)) for f in files]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), classes


def write_cifar10_folder(root, train_images, train_labels, test_images, test_labels, classes,
                         num_train_batches=5):
    """Write a cifar-10-batches-py/ folder in the official on-disk format (for tests and --synthetic)."""
    folder = Path(root) / CIFAR10_FOLDER
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name, images, labels):
        # bytes keys and protocol 2: what the official Python-2 pickles give under encoding="bytes"
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in labels],
                 b"data": images.reshape(len(images), 3072).numpy().astype(np.uint8),
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(len(images))]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)

    for i, idx in enumerate(torch.arange(len(train_images)).chunk(num_train_batches), start=1):
        dump(f"data_batch_{i}", train_images[idx], train_labels[idx])
    dump("test_batch", test_images, test_labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in classes], b"num_vis": 3072,
                     b"num_cases_per_batch": math.ceil(len(train_images) / num_train_batches)}, f, protocol=2)
    return folder


def make_synthetic_images(n, seed):
    """Learnable class-structured 32x32 images: class k is a colour grating at angle 18k degrees.

    Phase, frequency, contrast and background vary per image and noise is added, so the classes
    must be told apart by orientation and colour: an easy task, but one a network has to learn.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    angle = labels.float() * math.pi / 10
    freq = 0.35 + 0.25 * torch.rand(n, generator=g)
    phase = 2 * math.pi * torch.rand(n, generator=g)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    proj = xx * torch.cos(angle)[:, None, None] + yy * torch.sin(angle)[:, None, None]
    wave = torch.sin(freq[:, None, None] * proj + phase[:, None, None])  # (n, 32, 32)
    hue = torch.tensor([[1.0, .2, .2], [.2, 1.0, .2], [.2, .2, 1.0], [1.0, 1.0, .2], [1.0, .2, 1.0],
                        [.2, 1.0, 1.0], [1.0, .6, .2], [.6, .2, 1.0], [.2, .6, .4], [.8, .8, .8]])[labels]
    contrast = 0.25 + 0.2 * torch.rand(n, 1, 1, 1, generator=g)
    background = 0.3 + 0.4 * torch.rand(n, 3, 1, 1, generator=g)
    images = background + contrast * hue[:, :, None, None] * wave[:, None]
    images = images + 0.08 * torch.randn(n, 3, 32, 32, generator=g)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


def synthetic_cifar10(data_dir, num_train=10000, num_test=10000):
    """Write (once) and return the folder of the offline demo data: NOT CIFAR-10.

    The test split has 10,000 images like the real one, so the plot scripts' default indices work.
    """
    root = Path(data_dir) / SYNTHETIC_FOLDER
    if not (root / CIFAR10_FOLDER / "test_batch").is_file():
        train = make_synthetic_images(num_train, seed=0)
        test = make_synthetic_images(num_test, seed=1)
        classes = [f"synthetic-grating-{18 * k}deg" for k in range(10)]
        write_cifar10_folder(root, *train, *test, classes)
        (root / "README.txt").write_text("Synthetic gratings in the CIFAR-10 file format, written by "
                                         "data.synthetic_cifar10 for offline demos. Not CIFAR-10.\n")
    return root


def dataset_root(data_dir, synthetic):
    """The folder that load_cifar10 reads for this choice of data."""
    return synthetic_cifar10(data_dir) if synthetic else Path(data_dir)


# --------------------------------------------------------------------------- tensors in and out

def normalize(images):
    """uint8 images (N, 3, H, W) -> float network input normalised with the CIFAR-10 mean/std."""
    mean = torch.tensor(CIFAR10_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def denormalize(x):
    """The inverse of normalize, as floats in [0, 1] for display."""
    mean = torch.tensor(CIFAR10_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def random_crop_flip(images, offsets, flips, padding=4):
    """Batched RandomCrop(32, padding) + RandomHorizontalFlip on raw uint8 images.

    images (N, C, H, W); offsets (N, 2) int64 in 0..2*padding (top, left) of each crop in the
    zero-padded image; flips (N,) bool. Pure indexing, so it runs on whatever device holds the data.
    """
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    rows = offsets[:, :1] + torch.arange(h, device=images.device)           # (N, H)
    cols = offsets[:, 1:] + torch.arange(w, device=images.device)           # (N, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2)


def draw_augmentation(n, generator, padding=4):
    """Random crop offsets (N, 2) and flips (N,) from a CPU generator, for random_crop_flip."""
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    return offsets, flips
