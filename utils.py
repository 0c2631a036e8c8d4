"""Shared helpers: command-line errors, CIFAR-10 on disk, augmentation, checkpoints.

Everything a script needs beyond the network itself lives here, so train.py and the plot_*.py
scripts stay short. Data is handled as one uint8 tensor (N, 3, 32, 32) per split: that is what
the official archive holds, and it fits on any device (150 MB for the training set).
"""
import argparse
import math
import os
import pickle
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from model import PATHS, STAGES, BasicBlock, ResNet

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
SYNTHETIC_FOLDER = "synthetic"  # under --data-dir; holds a cifar-10-batches-py/ that is NOT CIFAR-10


# --------------------------------------------------------------------------- errors for people

class UserError(Exception):
    """Bad input a user can fix: reported as one line, without a traceback."""


def run_cli(main):
    """Run `main()`; turn a UserError into one line on stderr and exit status 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def resolve_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"--device {name!r} is not a device ({err}); use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but CUDA is not available here; use --device cpu")
    return device


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
                                         "utils.synthetic_cifar10 for offline demos. Not CIFAR-10.\n")
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


# --------------------------------------------------------------------------- checkpoints

def save_atomic(obj, path):
    """torch.save to a temporary file beside `path`, then os.replace: a kill leaves the old or new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "iteration", "epoch", "rng", "config", "history")


def read_checkpoint(path):
    """The checkpoint dict at `path`, loaded with weights_only=True; UserError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; train one with `python train.py` "
                        f"(offline: `python train.py --synthetic`) or pass --checkpoint PATH")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise UserError(f"{path} is not a readable checkpoint ({reason}); "
                        f"delete it and train again, or pass another --checkpoint") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a train.py checkpoint (missing {', '.join(missing)}); "
                        f"pass a checkpoint written by train.py")
    return ckpt


def build_model(ckpt, path="checkpoint"):
    """A ResNet of the checkpoint's width with its weights loaded; UserError if they do not fit."""
    width = ckpt["config"].get("width", 64)
    model = ResNet(width=width, num_classes=len(ckpt["config"].get("classes", CIFAR10_CLASSES)))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise UserError(f"{path}: its weights do not fit a width-{width} ResNet; the checkpoint is "
                        f"damaged or was made by other code; train again") from None
    return model


def load_checkpoint(path, device="cpu"):
    """(model in eval mode on `device`, checkpoint dict) for the plot scripts."""
    ckpt = read_checkpoint(path)
    model = build_model(ckpt, path).to(device).eval()
    return model, ckpt


# --------------------------------------------------------------------------- the plot scripts
# What the seven plot_*.py scripts share: their flags, loading a checkpoint with its test split,
# checking layer/channel/image arguments, the scores and the gradient ascent they compute, and the
# figures. Display conventions, the same in every figure: nearest interpolation, no ticks, one
# colour scale per grid, and RECONSTRUCTION_DISPLAY for signed images.

RECONSTRUCTION_DISPLAY = "each image shown as 0.5 + r / (2 max|r|), so grey is 0"


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line (as UserError does) instead of usage + error."""

    def error(self, message):
        print(f"error: {message}; see --help", file=sys.stderr)
        sys.exit(2)


def plot_parser(doc, image_index=None, images=None, layer=None, channel=None, path=None):
    """The flags every plot script has, plus those whose default is given here (None: no such flag)."""
    p = OneLineArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/resnet18_cifar10.pt",
                   help="checkpoint written by train.py (default: %(default)s)")
    p.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ (default: the checkpoint's)")
    p.add_argument("--synthetic", action=argparse.BooleanOptionalAction, default=None,
                   help="use the synthetic gratings, not CIFAR-10 (default: whatever the checkpoint was "
                        "trained on)")
    p.add_argument("--figures-dir", default="figures", help="where the PNGs go (default: %(default)s/)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ... (default: auto)")
    if image_index is not None:
        p.add_argument("--image-index", type=int, default=image_index,
                       help="index of the test image (default: %(default)s)")
    if images is not None:
        p.add_argument("--images", default=images,
                       help="test image indices: a range A-B (inclusive), a list 1,2,3 or both mixed "
                            "(default: %(default)s)")
    if layer is not None:
        p.add_argument("--layer", default=layer, help=f"one of {', '.join(STAGES)} (default: %(default)s)")
    if channel is not None:
        p.add_argument("--channel", type=int, default=channel,
                       help="channel (filter) of --layer, 0..C-1 (default: %(default)s)")
    if path is not None:
        p.add_argument("--path", default=path, help=f"where the deconvnet sends the signal at the residual "
                                                    f"sums of --layer: {', '.join(PATHS)} (default: %(default)s)")
    return p


def parse_indices(text):
    """'4531-4546' -> [4531, ..., 4546]; '1,2,3' -> [1, 2, 3]; both forms may be mixed: '1,5-7'."""
    indices = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            first, last = int(first), int(last or first)
            if last < first:
                raise ValueError
            indices.extend(range(first, last + 1))
    except ValueError:
        raise UserError(f"--images {text!r} is not a list of test image indices; "
                        f"write a range like 4531-4546 or a list like 1,2,3") from None
    return indices


def check_layer(layer):
    if layer not in STAGES:
        raise UserError(f"--layer {layer!r} is not a stage of the network; choose one of {', '.join(STAGES)}")


def check_channel(model, layer, channel):
    channels = model.channels(layer)
    if not 0 <= channel < channels:
        raise UserError(f"--channel {channel} is out of range: {layer} of this width-{model.width} network "
                        f"has {channels} channels; choose 0..{channels - 1}")


def check_image_indices(indices, num_images):
    bad = [i for i in indices if not 0 <= i < num_images]
    if bad:
        raise UserError(f"test image index {bad[0]} is out of range: the test split has {num_images} "
                        f"images; choose 0..{num_images - 1}")


def check_path(path):
    if path not in PATHS:
        raise UserError(f"--path {path!r} is not a deconvnet path; choose one of {', '.join(PATHS)}")


def load_for_plots(args, test_split=True):
    """Everything a plot script needs, from its parsed flags, with every flag checked.

    Returns a namespace: model (eval mode, on args.device), device, caption (checkpoint and data,
    for titles; synthetic data says NOT CIFAR-10) and, with test_split, the test images (uint8, on
    the CPU), labels and class names, and indices: the parsed --images, or [--image-index], where
    the script has that flag. Only the test split is read.
    """
    for name, check in (("layer", check_layer), ("path", check_path)):
        if hasattr(args, name):
            check(getattr(args, name))
    device = resolve_device(args.device)
    model, ckpt = load_checkpoint(args.checkpoint, device)
    if hasattr(args, "channel"):
        check_channel(model, args.layer, args.channel)
    config = ckpt["config"]
    trained_on = config.get("synthetic", False)
    synthetic = trained_on if args.synthetic is None else args.synthetic
    name = {True: "synthetic gratings (NOT CIFAR-10)", False: "CIFAR-10"}
    caption = f"{Path(args.checkpoint).name}: width-{model.width} ResNet-18 trained on {name[trained_on]}"
    if test_split and synthetic != trained_on:
        caption += f"; test images from {name[synthetic]}"
    run = SimpleNamespace(model=model, device=device, indices=None, caption=caption)
    if test_split:
        root = dataset_root(args.data_dir or config.get("data_dir", "data"), synthetic)
        run.images, run.labels, run.classes = load_cifar10(root, train=False)
        if hasattr(args, "images"):
            run.indices = parse_indices(args.images)
        elif getattr(args, "image_index", None) is not None:
            run.indices = [args.image_index]
        if run.indices is not None:
            check_image_indices(run.indices, len(run.images))
    return run


# --------------------------------------------------------------------------- what the plots compute

def stage_output(model, x, layer):
    """The output of stage `layer` for the normalized batch x, running only the stages up to it."""
    for name in STAGES[:STAGES.index(layer) + 1]:
        # oneDNN's CPU convolutions and max-pool are ~2x faster channels-last on the 32x32 maps of
        # the first two stages, and faster in NCHW on the small maps after; the values are the same
        big = x.shape[-1] >= 32
        x = model.stage(name)(x.contiguous(memory_format=torch.channels_last if big else torch.contiguous_format))
    return x


def channel_scores(model, x, layer, channel):
    """Per image, the sum of `channel`'s feature map at `layer`: the report's activation of a filter."""
    return stage_output(model, x, layer)[:, channel].sum((1, 2))


def top_activating(model, images, layer, channel, k=1, batch_size=None):
    """(indices, scores) of the k images whose `channel` at `layer` has the largest feature-map sum.

    images: uint8 (N, 3, 32, 32) as load_cifar10 returns them, on any device; they are normalized
    here, batch by batch, on the model's device. Equal to scoring one image at a time (tested), but
    batched, under inference mode and stopping at `layer`. batch_size defaults to 100 on a CPU
    (fastest on 2 cores: the activations stay in cache) and 1000 on a GPU.
    """
    device = next(model.parameters()).device
    batch_size = batch_size or (100 if device.type == "cpu" else 1000)
    scores = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(images), batch_size), desc=f"scoring {layer} channel {channel}",
                          unit="batch", leave=False, dynamic_ncols=True):
            x = normalize(images[start:start + batch_size].to(device))
            scores.append(channel_scores(model, x, layer, channel).float())
    top = torch.cat(scores).topk(k)
    return top.indices.cpu(), top.values.cpu()


def gradient_ascent(model, x0, layer, channel, steps=100, lr=0.05, penalty=0.01):
    """The input that maximizes channel_scores(x) - penalty * ||x - x0||^2, found by Adam from x0.

    x0 is a normalized batch; every step is clipped back to the normalized image of [0, 1] pixels,
    so the result is a displayable image. The model's weights get no gradients.
    """
    low = normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8, device=x0.device))
    high = normalize(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8, device=x0.device))
    x0 = x0.detach()
    x = x0.clone().requires_grad_()
    optimizer = torch.optim.Adam([x], lr=lr)
    for _ in tqdm(range(steps), desc=f"gradient ascent on {layer} channel {channel}", unit="step",
                  leave=False, dynamic_ncols=True):
        objective = channel_scores(model, x, layer, channel).sum() - penalty * (x - x0).pow(2).sum()
        x.grad, = torch.autograd.grad(-objective, x)
        optimizer.step()
        with torch.no_grad():
            x.clamp_(low, high)
    return x.detach()


# --------------------------------------------------------------------------- figures

def grid_shape(n):
    """(rows, columns) of the near-square grid that holds n panels, filled row by row."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def tile(maps, pad=1, fill=float("nan")):
    """(N, H, W) or (N, H, W, 3) maps -> one array: the grid_shape(N) grid, `pad` cells of `fill` apart."""
    maps = np.asarray(maps, dtype=np.float32)
    n, h, w = maps.shape[:3]
    rows, cols = grid_shape(n)
    out = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, *maps.shape[3:]), fill, dtype=np.float32)
    for i, m in enumerate(maps):
        r, c = divmod(i, cols)
        out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = m
    return out


def to_display(x):
    """A normalized batch (N, 3, H, W) -> (N, H, W, 3) pixels in [0, 1] as numpy, for imshow."""
    return denormalize(x.detach().float()).permute(0, 2, 3, 1).cpu().numpy()


def signed_to_display(r, per_image=True):
    """Signed (N, 3, H, W) -> (N, H, W, 3) in [0, 1]: 0.5 + r / (2 max|r|), grey = 0.

    The max is taken per image (RECONSTRUCTION_DISPLAY, used for every reconstruction) or, with
    per_image=False, over the whole batch (one scale for a grid of filters).
    """
    r = r.detach().float()
    dims = (1, 2, 3) if per_image else (0, 1, 2, 3)
    scale = r.abs().amax(dims, keepdim=True).clamp_min(1e-12)
    return (0.5 + r / (2 * scale)).permute(0, 2, 3, 1).cpu().numpy()


def new_figure(width, height):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=150)


def bare(ax):
    ax.set_xticks([])
    ax.set_yticks([])


def save(fig, path):
    """Save a figure (the Agg renderer, no pyplot state), say so, and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"wrote {path}")
    return path


def show_mosaic(fig, ax, maps, symmetric=False):
    """Draw (N, H, W) maps as one near-square mosaic on one colour scale, with its colour bar.

    symmetric: the scale is -m..m around 0 (for weights) rather than min..max (for feature maps).
    """
    import matplotlib
    maps = maps.detach().float().cpu()
    low, high = (-maps.abs().max(), maps.abs().max()) if symmetric else (maps.min(), maps.max())
    cmap = matplotlib.colormaps["gray"].with_extremes(bad="lightsteelblue")  # the gaps: no grey level
    image = ax.imshow(tile(maps.numpy()), cmap=cmap, vmin=low.item(), vmax=high.item(), interpolation="nearest")
    bare(ax)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)


def save_mosaic(path, maps, title, symmetric=False):
    """One figure holding show_mosaic(maps)."""
    fig = new_figure(6.4, 6)
    ax = fig.add_subplot()
    show_mosaic(fig, ax, maps, symmetric)
    ax.set_title(title, fontsize=9)
    return save(fig, path)


def save_rgb_mosaic(path, rgb, title):
    """(N, H, W, 3) images in [0, 1] as one mosaic with white gaps."""
    fig = new_figure(6, 6.3)
    ax = fig.add_subplot()
    ax.imshow(tile(rgb, fill=1.0), interpolation="nearest")
    bare(ax)
    ax.set_title(title, fontsize=9)
    return save(fig, path)


def save_panels(path, panels, title, cols=None):
    """RGB panels [(array (H, W, 3) in [0, 1], panel title), ...] in a grid with `cols` columns."""
    rows, cols = grid_shape(len(panels)) if cols is None else (math.ceil(len(panels) / cols), cols)
    size = min(max(8 / cols, 1.3), 2.6)  # inches a panel: few panels get room for their titles
    fig = new_figure(size * cols + 0.4, (size + 0.3) * rows + 0.9)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (image, panel_title) in zip(axes, panels):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(panel_title, fontsize=7)
    for ax in axes:
        bare(ax)
        ax.set_frame_on(ax.has_data())  # empty cells of the last row stay blank
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def image_label(run, index, sep=" "):
    """'7876 (cat)': how titles name a test image."""
    return f"{index}{sep}({run.classes[run.labels[index]]})"


# --------------------------------------------------------------------------- the figures themselves
# Scripts that show the same kind of figure for different defaults share these functions.

def plot_feature_maps(run, layer, figures_dir):
    """The test image run.indices[0] beside all of `layer`'s feature maps for it."""
    index = run.indices[0]
    x = normalize(run.images[[index]].to(run.device))
    with torch.inference_mode():
        maps = stage_output(run.model, x, layer)[0]
    fig = new_figure(11, 5.6)
    image_ax, maps_ax = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=(1, 2.2)))
    image_ax.imshow(to_display(x)[0], interpolation="nearest")
    bare(image_ax)
    image_ax.set_title(f"test image {image_label(run, index)}", fontsize=9)
    show_mosaic(fig, maps_ax, maps)
    maps_ax.set_title(f"its {layer} feature maps: {len(maps)} channels, {maps.shape[-2]}x{maps.shape[-1]} "
                      f"each, channel 0 top left, row by row", fontsize=9)
    fig.suptitle(f"{layer} feature maps; {run.caption}", fontsize=10)
    return save(fig, Path(figures_dir) / f"{layer}_feature_maps_image{index}.png")


def plot_reconstructions(run, layer, channel, path, figures_dir):
    """Each test image of run.indices beside the deconvnet projection of `layer`/`channel` for it."""
    x = normalize(run.images[run.indices].to(run.device))
    recon = run.model.reconstruct(x, layer, channel, path=path)
    panels = []
    for index, image, projection in zip(run.indices, to_display(x), signed_to_display(recon)):
        panels += [(image, image_label(run, index, sep="\n")), (projection, "reconstruction")]
    if any(isinstance(m, BasicBlock) for m in run.model.stage(layer).children()):
        through = {"both": "both branches", "shortcut": "the shortcut", "trunk": "the trunk"}[path]
        through = f" through {through} of each residual sum in {layer}"
    else:
        through = ""  # conv1 has no residual sum, so every path is the same
    title = (f"{layer} channel {channel}: deconvnet reconstruction{through}, beside its test image\n"
             f"({RECONSTRUCTION_DISPLAY}; {run.caption})")
    name = f"{layer}_channel{channel}_reconstructions" + ("" if path == "both" else f"_{path}") + ".png"
    return save_panels(Path(figures_dir) / name, panels, title, cols=2 * grid_shape(len(run.indices))[1])
