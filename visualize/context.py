"""What a plot run holds: the trained network, the checkpoint it came from, the test split and the
caption that names both, loaded from plain values (cli.py turns the flags into them). Whatever
plot_all.py's scripts would each load or compute again is kept once per process (memo).
"""
from dataclasses import dataclass, field
from pathlib import Path

import torch

import snapshots
from checkpoint import load_checkpoint
from cifar10 import CIFAR10_FOLDER, SYNTHETIC_NAME, dataset_root, describe_dataset, load_cifar10
from model import STAGES
from utils import UserError
from visualize.attribution import attribute, check_options
from visualize.drawing import wrap_title
from visualize.scoring import score_units

# What plot_all.py's scripts would otherwise each load or compute again, once per process: keyed on
# the files (path, modification time, size) it came from, so a rewritten file is read afresh.
_MEMO = {}


def memo(key, compute):
    """compute(), or what it returned the first time it was asked for under `key` in this process."""
    if key not in _MEMO:
        _MEMO[key] = compute()
    return _MEMO[key]


def file_key(path):
    """(resolved path, mtime in ns, size) of a file; just the path if it does not exist (yet)."""
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except OSError:
        return (str(path),)
    return str(path), stat.st_mtime_ns, stat.st_size


@dataclass
class PlotRun:
    """A trained network and the test split its figures are drawn from.

    The model is in eval mode on `device`; images are the test split as uint8 (N, 3, 32, 32) on the
    CPU, with labels and class names (None when the script needs no data). The model and the images
    are shared between plot_all.py's scripts (memo): they must not be changed in place.
    """
    model: torch.nn.Module
    checkpoint: dict
    device: torch.device
    caption: str  # the checkpoint and the data, for titles
    data_dir: str = "data"  # dataset_root(data_dir, synthetic) holds the test split
    synthetic: bool = False
    trained_on_synthetic: bool = False  # what the checkpoint was trained on (its colour statistics)
    images: torch.Tensor | None = None
    labels: torch.Tensor | list | None = None
    classes: list = field(default_factory=list)
    key: tuple = ()  # what test_split_scores is memoized on: the checkpoint, device and test split

    def image_label(self, index, sep=" "):
        """'7876 (cat)': how titles name a test image."""
        return f"{index}{sep}({self.classes[self.labels[index]]})"


def load_run(checkpoint, device, data_dir=None, synthetic=None, test_split=True):
    """The PlotRun of `checkpoint` on `device` (a torch.device): with test_split, the test split of
    data_dir (default: the checkpoint's) and synthetic (default: what it was trained on). Only the
    test split is read. UserError (from utils and data) for a checkpoint or data that cannot be used.
    """
    checkpoint_key = ("checkpoint", file_key(checkpoint), str(device))
    model, ckpt = memo(checkpoint_key, lambda: load_checkpoint(checkpoint, device))
    config = ckpt["config"]
    trained_on = config.get("synthetic", False)
    synthetic = trained_on if synthetic is None else synthetic
    trained_name = config.get("data_name",  # named by cifar10.describe_dataset when it was trained
                              SYNTHETIC_NAME if trained_on else f"the data in {config.get('data_dir', 'data')}")
    caption = f"{Path(checkpoint).name}: width-{model.width} ResNet-18 trained on {trained_name}"
    run = PlotRun(model=model, checkpoint=ckpt, device=device, caption=wrap_title(caption),
                  data_dir=data_dir or config.get("data_dir", "data"), synthetic=synthetic,
                  trained_on_synthetic=trained_on)
    if test_split:
        root = dataset_root(run.data_dir, synthetic)
        data_key = ("test split", file_key(Path(root) / CIFAR10_FOLDER / "test_batch"))
        run.images, run.labels, run.classes = memo(data_key, lambda: load_cifar10(root, train=False))
        run.key = (checkpoint_key, data_key)
        test_name = describe_dataset(root, synthetic)
        if test_name != trained_name:
            run.caption = wrap_title(f"{caption}; test images from {test_name}")
    return run


def load_snapshots(checkpoint, device, data_dir=None, synthetic=None):
    """[(epoch, PlotRun)] of every snapshot train.py kept beside `checkpoint` (snapshots.py; or in the
    .snapshots folder `checkpoint` names), by epoch, each loaded as load_run loads a checkpoint, all on one
    test split. UserError, one line, where there are none."""
    found = snapshots.find(checkpoint)
    if not found:
        raise UserError(f"{checkpoint} has no snapshots (no {snapshots.folder(checkpoint)}/epoch_*.pt), so there "
                        f"is nothing to compare across training; train with `python train.py --snapshots default` "
                        f"(its default) to keep them")
    return [(epoch, load_run(path, device, data_dir, synthetic)) for epoch, path in found.items()]


def has_snapshots(checkpoint):
    """Whether train.py kept snapshots beside `checkpoint` (plot_all.py draws the figures of training then)."""
    return bool(snapshots.find(checkpoint))


# a quick run's share of the test split in the snapshots' passes (plot_feature_evolution.py and
# plot_learning_dynamics.py --quick): one pass a snapshot is most of their time
QUICK_SPLIT = 2000


def test_split_scores(run, layers, count=None):
    """{layer: scoring.UnitScores} over run's test split: one scoring.score_units pass of every stage,
    computed once per process for each checkpoint, test split and device, so the scripts plot_all.py
    runs share it, whichever runs first and whatever stages it needs (scoring a stage more costs
    little beside running it: conv1's maps, the largest, add about 3 % to the pass). count: over the
    first `count` test images only (a quick run's), a pass of their own, shared likewise."""
    count = None if count is not None and count >= len(run.images) else count  # the whole split: its one pass
    units = memo(("test split pass", run.key) + (() if count is None else (count,)),
                 lambda: score_units(run.model, run.images[:count], STAGES))
    return {layer: units[layer] for layer in layers}


def class_maps(run, indices, targets, method, layer="conv4_x", **options):
    """attribution.attribute's maps (float32, on the CPU) of run's test images `indices` for the classes
    `targets` (N,), computed once per process for each run and choice: the maps plot_class_evidence.py
    draws of the report's images are the ones plot_trust.py's randomisation tests start from. The
    options are keyed with their defaults filled in, so leaving one out and giving its default agree."""
    options = check_options(method, options, layer)
    targets = torch.as_tensor(targets, dtype=torch.long).cpu()
    key = ("class maps", run.key, tuple(indices), tuple(targets.expand(len(indices)).tolist()), method,
           layer if method == "gradcam" else None, tuple(sorted(options.items())))
    return memo(key, lambda: attribute(run.model, run.images[list(indices)], targets, method, layer,
                                       **options).float().cpu())
