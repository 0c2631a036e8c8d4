"""Errors for people, devices and checkpoints: what train.py, bench.py and the plot scripts share.

Everything about the data lives in data.py, everything the plot scripts share in visualize.py.
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from model import ResNet

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



class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line (as UserError does) instead of usage + error."""

    def error(self, message):
        print(f"error: {message}; see --help", file=sys.stderr)
        sys.exit(2)


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
    model = ResNet(width=width, num_classes=len(ckpt["config"].get("classes", range(10))))
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
