"""Snapshots: the network's weights kept at chosen epochs of a run, each a file of its own beside the
checkpoint, so any figure can be drawn at any epoch (`--checkpoint` of every plot script takes one).

    checkpoints/resnet18_cifar10.pt                         the run's checkpoint
    checkpoints/resnet18_cifar10.snapshots/epoch_005.pt     its weights at the end of epoch 5

train.py --snapshots chooses the epochs (parse, then chosen_epochs once the run's length is known):

    default     the initial weights (epoch 0), then Zeiler & Fergus's epochs 1, 2, 5, 10, 20, 30, 40
                cut to the run's length, and always the run's last epoch
    none        no snapshots
    0,3,7       these epochs (each once, none past the run's last)
    every 5     epoch 0 and every 5th epoch (5, 10, ...), and the run's last

Epoch e's snapshot holds the weights after e whole epochs (e * steps_per_epoch iterations), epoch 0's
the initial ones. A run whose length (--iterations) ends inside an epoch has that epoch as its last:
ceil(iterations / steps_per_epoch); its snapshot is of the run's end, and its `iteration` says where.

A snapshot is a dict, loadable with torch.load(weights_only=True) and checkpoint.read_checkpoint
(checkpoint.SNAPSHOT_KEYS): kind "snapshot", model (the state_dict), iteration, epoch, test_acc and
test_loss (the whole test split at that point, evaluated as train.py evaluates every epoch), config (the
run's), history (the run's, up to that point) and checkpoint (the file name of the run's checkpoint).
It holds no optimizer, so it cannot be resumed. Written atomically (checkpoint.save_atomic), none before
the run's first save (Keeper). A new run removes the snapshots a run before it left at the same path
then; a resumed run keeps those it has and adds the rest.
"""
import math
import re
import sys
from pathlib import Path

from checkpoint import map_tensors, read_checkpoint, save_atomic
from utils import UserError

ZEILER_FERGUS_EPOCHS = (0, 1, 2, 5, 10, 20, 30, 40)  # their Figure 4's columns up to 40 (and their last, 64)
DEFAULT = "default"
NONE = "none"
HELP = (f"epochs whose weights are kept, each a file in <checkpoint>.snapshots/: '{DEFAULT}' (the initial "
        f"weights, then Zeiler & Fergus's epochs {', '.join(map(str, ZEILER_FERGUS_EPOCHS[1:]))} cut to the run, and "
        f"always the last), '{NONE}', a list such as 0,3,7, or 'every N' (0, N, 2N, ... and the last) "
        f"(default: {DEFAULT}; with --resume, the run's own)")
FILE = re.compile(r"epoch_(\d{3,})\.pt")


def parse(text):
    """--snapshots text -> its canonical text ('default', 'none', 'every N' or a comma list of epochs);
    UserError, one line, for text that is none of these or names an epoch twice."""
    words = " ".join(str(text).lower().split())
    if words in (DEFAULT, NONE):
        return words
    every = re.fullmatch(r"every ?(\d+)", words)
    if every:
        step = int(every.group(1))
        if step < 1:
            raise UserError(f"--snapshots {text!r}: 'every N' needs N of at least 1, e.g. 'every 5'")
        return f"every {step}"
    parts = [part.strip() for part in words.split(",")]
    if not all(part.isdigit() for part in parts):
        raise UserError(f"--snapshots {text!r} is not a list of epochs; write '{DEFAULT}', '{NONE}', a list "
                        f"like 0,3,7 or 'every 5'")
    epochs = [int(part) for part in parts]
    twice = sorted({e for e in epochs if epochs.count(e) > 1})
    if twice:
        raise UserError(f"--snapshots {text!r} names epoch {twice[0]} twice; name each epoch once")
    return ",".join(map(str, sorted(epochs)))


def run_epochs(total, steps_per_epoch):
    """The epochs a run of `total` iterations touches: its last epoch (a partial one counts)."""
    return math.ceil(total / steps_per_epoch)


def chosen_epochs(text, last):
    """The sorted epochs parse's `text` keeps in a run whose last epoch is `last`; UserError, one line,
    for a listed epoch past it."""
    text = parse(text)
    if text == NONE:
        return []
    if text == DEFAULT:
        return sorted({*(e for e in ZEILER_FERGUS_EPOCHS if e <= last), last})
    if text.startswith("every "):
        return sorted({*range(0, last + 1, int(text.split()[1])), last})
    epochs = [int(e) for e in text.split(",")]
    if epochs[-1] > last:
        raise UserError(f"--snapshots {text}: epoch {epochs[-1]} is past the run, whose last epoch is {last}; "
                        f"choose epochs 0..{last} or train longer (--epochs)")
    return epochs


def folder(checkpoint_path):
    """<checkpoint without its suffix>.snapshots, beside the checkpoint."""
    checkpoint_path = Path(checkpoint_path)
    return checkpoint_path.with_name(checkpoint_path.stem + ".snapshots")


def path(checkpoint_path, epoch):
    return folder(checkpoint_path) / f"epoch_{epoch:03d}.pt"


def find(checkpoint_path):
    """{epoch: path} of the snapshots on disk beside a checkpoint (or inside a .snapshots folder), by epoch."""
    checkpoint_path = Path(checkpoint_path)
    where = checkpoint_path if checkpoint_path.is_dir() else folder(checkpoint_path)
    if not where.is_dir():
        return {}
    found = {int(m.group(1)): p for p in where.iterdir() if (m := FILE.fullmatch(p.name)) and p.is_file()}
    return dict(sorted(found.items()))


def read(snapshot_path):
    """A snapshot's dict, checked by checkpoint.read_checkpoint; UserError if it is not a snapshot."""
    snap = read_checkpoint(snapshot_path)
    if snap.get("kind") != "snapshot":
        raise UserError(f"{snapshot_path} is a checkpoint, not a snapshot; pass a file of a .snapshots folder")
    return snap


def weights(model):
    """A CPU copy of the model's state_dict, contiguous, that training cannot change."""
    return map_tensors(model.state_dict(), lambda t: t.detach().to("cpu", copy=True).contiguous())


class Keeper:
    """train.py's snapshots. start() at the beginning of a new run holds the initial weights (epoch 0) in
    memory; call it after each epoch, where it writes the epoch's snapshot when that epoch is one of
    `epochs` and the iteration ends it (or ends the run, for its last epoch); flush() where the run saves
    its checkpoint otherwise (a stop).

    Nothing is written, and nothing removed, before the run's first save: a run that fails before it
    (a NaN loss) leaves the folder as it was. At that first write of a new run (fresh) the snapshots an
    earlier run left beside the checkpoint are removed, so the folder never mixes two runs' weights, and
    the held epoch 0 is written.
    """

    def __init__(self, checkpoint_path, epochs, steps_per_epoch, total, fresh):
        self.checkpoint_path, self.epochs = Path(checkpoint_path), set(epochs)
        self.steps_per_epoch, self.total = steps_per_epoch, total
        self.fresh, self.held = fresh, None

    def start(self, model, config, history, evaluate):
        """Hold epoch 0's snapshot (the initial weights, their test accuracy from evaluate()) if it is kept."""
        if 0 in self.epochs:
            self.held = self.state(model, 0, config, history, evaluate)

    def __call__(self, model, iteration, config, history, evaluate):
        """Write the snapshot of `iteration` if it is kept (after any held one); evaluate() -> (test accuracy,
        test loss) is called only where the history holds no evaluation at that iteration."""
        epoch = math.ceil(iteration / self.steps_per_epoch)
        at_end = iteration == epoch * self.steps_per_epoch or iteration == self.total
        self.flush()
        if epoch in self.epochs and at_end:
            self.write(self.state(model, iteration, config, history, evaluate))

    def flush(self):
        """Remove an earlier run's snapshots (a new run's first write) and write the held epoch 0."""
        if self.fresh:
            self.fresh = False
            stale = find(self.checkpoint_path)
            for old in stale.values():
                old.unlink()
            if stale:
                print(f"note: removed {len(stale)} snapshots of an earlier run from {folder(self.checkpoint_path)}",
                      file=sys.stderr, flush=True)
        if self.held is not None:
            held, self.held = self.held, None
            self.write(held)

    def state(self, model, iteration, config, history, evaluate):
        epoch = math.ceil(iteration / self.steps_per_epoch)
        if history["test_iteration"] and history["test_iteration"][-1] == iteration:
            acc, loss = history["test_acc"][-1], history["test_loss"][-1]
        else:
            acc, loss = evaluate()
        return dict(kind="snapshot", model=weights(model), iteration=iteration, epoch=epoch, test_acc=acc,
                    test_loss=loss, config=dict(config), checkpoint=self.checkpoint_path.name,
                    history={key: list(values) for key, values in history.items()})

    def write(self, state):
        save_atomic(state, path(self.checkpoint_path, state["epoch"]))
