"""The checkpoint: written atomically, claimed by one run, read back checked, and the training history
it carries (with its CSV).

    with checkpoint.Claim(path):                         # one run per checkpoint path
        state = checkpoint.state_of(model, optimizer, ...)   # the dict a checkpoint holds, live
        copy, ready = checkpoint.snapshot(state)             # a CPU copy training cannot change
        checkpoint.save_atomic(checkpoint.portable(copy), path)  # (on the writer's thread, after ready())
    model, ckpt = checkpoint.load_checkpoint(path)           # the plot scripts' way in

Every checkpoint loads with torch.load(weights_only=True): it holds tensors, numbers, strings, lists
and dicts only.
"""
import csv
import io
import json
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import filelock
import torch

import speed
from model import ResNet, state_shapes
from utils import UserError, check_writable, write_atomic, write_text_atomic

# --------------------------------------------------------------------------- writing: atomic, one run a path

def save_atomic(obj, path):
    """torch.save to a temporary file beside `path`, then os.replace: a kill leaves the old or new file."""
    write_atomic(path, lambda f: torch.save(obj, f))



class Claim:
    """One run per checkpoint, as a `with` block: while a Claim on a path is held, making another (in
    any process, on Linux, Windows or macOS) raises UserError naming the holder's pid and start time.

        with checkpoint.Claim(path) as claim:   # released however the block ends
            ...

    The claim is filelock's lock on <checkpoint>.lock beside the checkpoint (flock on Linux and macOS,
    msvcrt's lock on Windows), taken without waiting: atomic (one lock wins), and dropped by the
    operating system when its holder dies in any way (a kill or a reboot included). Who holds it is
    recorded in <checkpoint>.claim, written once the lock is held and removed on release; a record
    found by a run that got the lock is a claim its holder never gave back, taken over with one line
    saying so. release() removes both files: the block's end, or a signal handler before os._exit
    (which skips every `finally`). Paths are resolved, so every working directory names the same claim.
    """

    def __init__(self, path, what="--checkpoint"):
        path = Path(path)
        check_writable(path, what)  # a folder in the way or an unwritable place, said as usual
        path = path.resolve()
        self.lock_path = path.with_name(path.name + ".lock")
        self.record_path = path.with_name(path.name + ".claim")
        self.made = []  # folders made for the lock, removed again on release if still empty
        folder = path.parent
        while not folder.exists():
            self.made.append(folder)
            folder = folder.parent
        for made in reversed(self.made):
            made.mkdir(exist_ok=True)
        while True:
            self.lock = filelock.FileLock(str(self.lock_path), timeout=0, thread_local=False)
            try:
                self.lock.acquire()
            except filelock.Timeout:
                holder = _claim_holder(self.record_path)
                self._remove_made()
                raise UserError(f"{what} {path} is in use by another run ({_describe_holder(holder)}); wait for "
                                f"it to end or stop it, or pass another --checkpoint") from None
            if self._names_lock_file():
                break
            self.lock.release()  # its holder released (and removed) the file between our open and lock: again
        left = _read_claim(self.record_path)
        if left is not None:  # the lock was free, yet the record stayed: its holder never released it
            restarted = left.get("boot") not in (None, _boot_id())
            how = "the machine has restarted since" if restarted else "that run ended without releasing it (killed?)"
            print(f"note: {path} was left claimed by {_describe_holder(left)}, but {how}; this run takes it over",
                  file=sys.stderr, flush=True)
        record = dict(pid=os.getpid(), started=time.time(), host=socket.gethostname(), boot=_boot_id())
        write_text_atomic(self.record_path, json.dumps(record))
        self.held = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def release(self):
        """Give the claim up (its files removed); again is a no-op. Safe in a signal handler before os._exit."""
        if not self.held:
            return
        self.held = False
        for remove in (self.record_path, self.lock_path if self._names_lock_file() else None):
            try:  # removed while still locked: no run can take the lock file meanwhile
                if remove is not None:
                    remove.unlink()
            except OSError:  # left behind (Windows keeps a locked file; filelock removes it there on release)
                pass
        self.lock.release()
        self._remove_made()

    def _names_lock_file(self):
        """Whether the lock file's path still names the file this claim locked (not removed by a run that
        released it while this one waited, nor replaced). Where filelock does not say which file it
        opened, whether the path exists."""
        fd = getattr(getattr(self.lock, "_context", None), "lock_file_fd", None)
        if not isinstance(fd, int):
            return self.lock_path.exists()
        try:
            st, fst = os.stat(self.lock_path), os.fstat(fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)

    def _remove_made(self):
        for folder in self.made:
            try:
                folder.rmdir()
            except OSError:  # the run wrote into it, or someone else did: kept
                break


def _boot_id():
    """This boot's id (Linux); None where the system does not give one, and then a claim left behind is
    taken over without saying whether the machine restarted."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def _read_claim(path):
    """The holder record at `path`, {} if it holds something else, None if there is none."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except OSError:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _claim_holder(path, wait=2.0):
    """The record of the run holding the lock. It writes it just after locking, over the record of any
    stale claim it took over, so a record that is not of a live process is waited on for a moment."""
    deadline = time.monotonic() + wait
    while True:
        record = _read_claim(path) or {}
        if _alive(record) or time.monotonic() > deadline:
            return record
        time.sleep(0.02)


def _alive(record):
    """Whether a holder record names a running process (one on another host is taken on trust, and so
    is every one on Windows, where os.kill(pid, 0) would send Ctrl-C instead of asking)."""
    if not record or record.get("host") != socket.gethostname() or os.name == "nt":
        return bool(record)
    pid = record.get("pid")
    if record.get("boot") != _boot_id() or type(pid) is not int or pid <= 0:  # kill(0) would mean our group
        return False
    try:
        os.kill(pid, 0)
    except (OverflowError, ProcessLookupError):
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True


def _describe_holder(record):
    pid, started, host = record.get("pid"), record.get("started"), record.get("host")
    if not isinstance(pid, int) or not isinstance(started, (int, float)):
        return "a process that did not record itself"
    where = f" on {host}" if isinstance(host, str) and host != socket.gethostname() else ""
    return f"pid {pid}{where}, started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}"



# --------------------------------------------------------------------------- reading: checked, then built

CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "iteration", "epoch", "rng", "config", "history")
HISTORY_KEYS = ("train_loss", "train_acc", "test_iteration", "test_epoch", "test_acc", "test_loss")
CONFIG_KEYS = ("width", "classes", "data_dir", "synthetic")  # what every script reads from a config
# A snapshot (snapshots.py, kind "snapshot"): the weights at one epoch, no optimizer; the plot scripts read it
SNAPSHOT_KEYS = ("model", "iteration", "epoch", "config", "history", "test_acc")


def read_checkpoint(path, config_keys=(), snapshot=True):
    """The checkpoint dict at `path`, loaded with weights_only=True; UserError if it is not one.

    Checked: every key train.py writes (CHECKPOINT_KEYS; a snapshot's SNAPSHOT_KEYS, refused unless
    `snapshot`), a config dict holding CONFIG_KEYS and `config_keys`, a positive integer width and a
    list of class names, and a history with every list.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; train one with `python train.py` "
                        f"(offline: `python train.py --synthetic`) or pass --checkpoint PATH")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = " ".join(str(err).split()) or type(err).__name__  # the whole reason, on one line
        raise UserError(f"{path} is not a readable checkpoint ({reason}); "
                        f"delete it and train again, or pass another --checkpoint") from None
    if isinstance(ckpt, dict) and ckpt.get("kind") == "snapshot" and not snapshot:
        raise UserError(f"{path} is a snapshot (the weights at epoch {ckpt.get('epoch')}, no optimizer), which "
                        f"cannot be trained on; pass the run's checkpoint, {ckpt.get('checkpoint')}")
    keys = SNAPSHOT_KEYS if isinstance(ckpt, dict) and ckpt.get("kind") == "snapshot" else CHECKPOINT_KEYS
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a train.py checkpoint (missing {', '.join(missing)}); "
                        f"pass a checkpoint written by train.py")
    damaged = "it is damaged or was not written by train.py; train again or pass another --checkpoint"
    config, history = ckpt["config"], ckpt["history"]
    if not isinstance(config, dict):
        raise UserError(f"{path}: its config is a {type(config).__name__}, not a dict of the run's settings; {damaged}")
    missing = [k for k in (*CONFIG_KEYS, *config_keys) if k not in config]
    if missing:
        raise UserError(f"{path}: its config lacks {', '.join(missing)}; {damaged}")
    width, classes = config["width"], config["classes"]
    if type(width) is not int or width < 1:
        raise UserError(f"{path}: its config's width is {width!r}, not a positive integer; {damaged}")
    if not isinstance(classes, (list, tuple)) or not classes or not all(isinstance(c, str) for c in classes):
        raise UserError(f"{path}: its config's classes are {classes!r:.60}, not a list of class names; {damaged}")
    if not isinstance(history, dict) or not all(isinstance(history.get(k), list) for k in HISTORY_KEYS):
        raise UserError(f"{path}: its history lacks the lists {', '.join(HISTORY_KEYS)}; {damaged}")
    if not isinstance(ckpt["model"], dict):
        raise UserError(f"{path}: its weights are a {type(ckpt['model']).__name__}, not a state dict; {damaged}")
    return ckpt


def build_model(ckpt, path="checkpoint"):
    """A ResNet of the checkpoint's width with its weights loaded (a read_checkpoint dict).

    UserError if the weights do not fit that network, found from the shapes before anything is
    allocated, or if any of them is NaN or infinite.
    """
    width, num_classes, state = ckpt["config"]["width"], len(ckpt["config"]["classes"]), ckpt["model"]
    unfit = UserError(f"{path}: its weights do not fit a width-{width} ResNet; the checkpoint is "
                      f"damaged or was made by other code; train again")
    expected = state_shapes(width, num_classes)
    if set(state) != set(expected) or any(not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != shape
                                          for k, shape in expected.items()):
        raise unfit
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        more = f" and {len(bad) - 1} more tensors" if len(bad) > 1 else ""
        raise UserError(f"{path}: its weights hold NaN or inf (in {bad[0]}{more}); the run that saved them "
                        f"had diverged; train again with a lower --lr")
    model = ResNet(width=width, num_classes=num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise unfit from None
    return model


def load_checkpoint(path, device="cpu"):
    """(model in eval mode on `device`, checkpoint dict) for the plot scripts."""
    ckpt = read_checkpoint(path)
    model = build_model(ckpt, path).to(device).eval()
    return model, ckpt


# --------------------------------------------------------------------------- a run's state: saved and resumed

def state_of(model, optimizer, scheduler, scaler, iteration, epoch, config, history):
    """The dict a checkpoint holds, of the training's own (live) objects: snapshot copies it."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict() if scaler is not None else None,
                iteration=iteration, epoch=epoch, rng=rng, config=config, history=history)


def map_tensors(obj, fn):
    """obj with fn(tensor) in place of every tensor in it, through dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def snapshot(state):
    """(copy, ready): a copy of `state` with every tensor on the CPU, since training goes on changing the
    originals in place, and ready(), which returns once the copy is whole. CUDA tensors are copied
    without blocking into pinned memory and ready() waits for those copies, on the writer's thread, so
    the training thread never waits for the GPU's queue to drain (a blocking copy per tensor would)."""
    devices = set()

    def copy(tensor):
        if tensor.device.type != "cuda":
            return tensor.detach().to("cpu", copy=True)
        devices.add(tensor.device)
        return torch.empty_like(tensor, device="cpu", pin_memory=True).copy_(tensor.detach(), non_blocking=True)

    copied = map_tensors(state, copy)
    events = []
    for device in devices:
        events.append(torch.cuda.Event())
        events[-1].record(torch.cuda.current_stream(device))
    return copied, lambda: [event.synchronize() for event in events]


def portable(state):
    """`state` as a checkpoint keeps it: Adam's and StepLR's learning rates plain floats (a CUDA graph's
    are one-element device tensors) and Adam not capturable, however this run stepped, so that any run,
    graphed or not, loads it. Reads a device tensor: call it on a snapshot, off the training thread."""
    def number(tensor):
        return tensor.item() if tensor.numel() == 1 else tensor
    optimizer = state["optimizer"]
    groups = [dict(map_tensors(group, number), capturable=False) for group in optimizer["param_groups"]]
    return dict(state, optimizer=dict(optimizer, param_groups=groups), scheduler=map_tensors(state["scheduler"], number))


def resume(ckpt, optimizer, scheduler, scaler):
    """Load a checkpoint's Adam, StepLR, GradScaler and torch RNG states into this run's: the CPU's, and
    each GPU's that the saving run and this one both have (none where either has none)."""
    load_optimizer_state(optimizer, ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if torch.cuda.is_available():
        for index, state in enumerate(ckpt["rng"].get("cuda", [])[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state.cpu(), index)


def load_optimizer_state(optimizer, state):
    """Load a checkpoint's Adam state, keeping how this run steps: capturable or not, the very lr
    tensor a CUDA graph reads (filled with the checkpoint's lr), and the parameters' memory format."""
    live = [(group["capturable"], group["lr"]) for group in optimizer.param_groups]
    groups = [dict(saved, capturable=capturable) for saved, (capturable, _) in zip(state["param_groups"], live)]
    optimizer.load_state_dict(dict(state, param_groups=groups))  # capturable moves `step` to the device
    for group, (_, lr) in zip(optimizer.param_groups, live):
        if isinstance(lr, torch.Tensor):
            lr.fill_(float(group["lr"]))
            group["lr"] = lr
        else:
            group["lr"] = float(group["lr"])
    speed.match_memory_format(optimizer)


@dataclass
class LastSave:
    """What the checkpoint path holds, for the last words of a stopped or failed run: `iteration` is that
    of the checkpoint this run (or the run it resumes) wrote there, None before any."""
    path: Path
    iteration: int = None

    def saved(self, iteration):
        self.iteration = iteration

    def describe(self):
        if self.iteration is not None:
            return f"{self.path} holds the last good state, iteration {self.iteration}"
        if self.path.exists():
            return f"no checkpoint of this run was written yet; {self.path} is still the earlier run's"
        return f"no checkpoint was written yet ({self.path} does not exist)"


class BackgroundWriter:
    """Runs one output job at a time on a worker thread, so a GPU keeps training while the checkpoint,
    CSV and figures of the last epoch are written. A new job first waits for the previous one, and
    wait() re-raises a job's error in the training thread (an OSError as one line)."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending = None

    def submit(self, job, *args):
        self.wait()
        self.pending = self.pool.submit(job, *args)

    def wait(self):
        pending, self.pending = self.pending, None
        if pending is not None:
            try:
                pending.result()
            except OSError as err:
                raise UserError(f"could not write {err.filename or 'the outputs'}: {err.strerror or err}; "
                                f"the last checkpoint written stays as it was") from None


# --------------------------------------------------------------------------- the history and its CSV

def new_history():
    # Per-iteration train_loss and train_acc (index i = iteration i + 1); test_* once per evaluation.
    return {key: [] for key in HISTORY_KEYS}


def curve_window(n):
    """Iterations each point of the train curves averages in a run of n: the report's 100 from 1,000
    iterations on, else n // 10 (at least 1), so every run gets about 10 points or more."""
    return min(100, max(1, n // 10))


def window_means(values, window, keep=None):
    """(centres, means) of `values` (values[i] belongs to iteration i + 1) over consecutive complete
    windows of `window` iterations; a partial window at the end is left out, as in the report. The
    window of iterations a..b is drawn at its centre (a + b) / 2. keep: per iteration, whether it
    counts; a window's mean is over its kept iterations, and a window with none kept has no point."""
    v = torch.tensor(values, dtype=torch.float64)
    w = torch.ones_like(v) if keep is None else torch.tensor(keep, dtype=torch.float64)
    n = len(v) // window * window
    sums = (v * w)[:n].view(-1, window).sum(1)
    counts = w[:n].view(-1, window).sum(1)
    centres = torch.arange(len(sums), dtype=torch.float64) * window + (window + 1) / 2
    kept = counts > 0
    return centres[kept].tolist(), (sums[kept] / counts[kept]).tolist()


def write_history_csv(history, path):
    """One row per iteration; test columns are filled where they exist. train_loss_mean100 holds, on the last
    iteration of each window, the mean train loss of the window of the train-loss figure: 100 iterations
    (the report's) in runs of at least 1,000, curve_window(n) in shorter ones."""
    window = curve_window(len(history["train_loss"]))
    centres, means = window_means(history["train_loss"], window)
    loss_means = {round(c + (window - 1) / 2): m for c, m in zip(centres, means)}
    tests = {it: (e, a, l) for it, e, a, l in zip(history["test_iteration"], history["test_epoch"],
                                                   history["test_acc"], history["test_loss"])}
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(["iteration", "train_acc", "train_loss", "train_loss_mean100", "epoch", "test_acc", "test_loss"])
    for i, (loss, acc) in enumerate(zip(history["train_loss"], history["train_acc"]), start=1):
        epoch, tacc, tloss = tests.get(i, ("", "", ""))
        w.writerow([i, f"{acc:.6f}", f"{loss:.6f}", f"{loss_means[i]:.6f}" if i in loss_means else "", epoch,
                    f"{tacc:.6f}" if tacc != "" else "", f"{tloss:.6f}" if tloss != "" else ""])
    write_text_atomic(path, text.getvalue())
