"""Errors for people, devices and checkpoints: what train.py, bench.py and the plot scripts share.

Everything about the data lives in data.py, everything the plot scripts share in visualize/.
"""
import argparse
import errno
import fcntl
import functools
import json
import os
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from model import ResNet, state_shapes

# --------------------------------------------------------------------------- errors for people

class UserError(Exception):
    """Bad input a user can fix: reported as one line, without a traceback."""


def run_cli(main):
    """Run `main()`; turn a UserError into one line on stderr and exit status 2, Ctrl-C into one line
    and exit status 130."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as err:
        if err.errno != errno.ENAMETOOLONG:
            raise
        # a path to read (a checkpoint, a data dir) too long to open; paths to write are checked by name
        print(f"error: {shorten(err.filename)} is longer than the file system allows ({err.strerror}); "
              f"pass a shorter path", file=sys.stderr)
        sys.exit(2)


def shorten(path):
    """`path` as text, its middle elided past 80 characters, so a message about it stays one readable line."""
    text = str(path)
    return text if len(text) <= 80 else f"{text[:60]}...{text[-15:]}"


def check_name_length(path, what):
    """UserError if `path`, or a name in it, is longer than the file system allows (os.stat and open
    would raise ENAMETOOLONG); the limits are asked of the nearest folder that exists."""
    path = Path(path).absolute()
    existing = next(p for p in path.parents if os.path.isdir(p))
    name_max, path_max = (os.pathconf(existing, limit) for limit in ("PC_NAME_MAX", "PC_PATH_MAX"))
    longest = max(path.parts, key=lambda part: len(os.fsencode(part)))
    shown = shorten(path)
    if len(os.fsencode(longest)) > name_max:
        raise UserError(f"{what} {shown} has a name of {len(os.fsencode(longest))} bytes, but this file "
                        f"system allows at most {name_max}; pass a shorter name")
    if len(os.fsencode(str(path))) >= path_max:
        raise UserError(f"{what} {shown} is {len(os.fsencode(str(path)))} bytes long, but this file system "
                        f"allows paths under {path_max}; pass a shorter path")


def check_writable(path, what, folder=False):
    """UserError unless `path` can be written as a file (or, with folder, made a folder of files).

    Refused: a folder where the file must go, a file where the folder must go, a file among the
    folders above it, and a folder in which no file can be created. The last is tried for real (a
    temporary file is made and removed in the nearest existing folder), so it also holds for root
    and on read-only file systems. `what` names the path in the message ("--checkpoint", ...).
    """
    path = Path(path)
    kind, other = ("folder", "file") if folder else ("file", "folder")
    check_name_length(path, what)
    if path.exists() and path.is_dir() != folder:
        raise UserError(f"{what} {path} is a {other}, but a {kind} must go there; move it away or pass "
                        f"another path")
    existing = (path if folder else path.parent).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what} {path} cannot be made: {existing} is a file, not a folder; pass another path")
    try:
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(13, "permission denied")
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"{what} {path} cannot be written: no file can be made in {existing} "
                        f"({err.strerror or err}); pass a path you can write to") from None


def resolve_device(name="auto"):
    """The torch device `name` names, if this machine has it; UserError otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        with warnings.catch_warnings():  # torch warns about some legacy names ("mkldnn")
            warnings.simplefilter("ignore")
            device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"--device {name!r} is not a device name; use auto, cpu or cuda "
                        f"(cuda:1 for a second GPU)") from None
    fix = "use --device cpu" + (" or cuda" if torch.cuda.is_available() else "") + ", or leave out --device"
    if device.type == "cpu":
        return device
    if device.type == "meta":
        raise UserError(f"--device meta holds shapes but no numbers, so nothing can be computed on it; {fix}")
    if device.type == "mps":
        count = int(torch.backends.mps.is_available())
    else:  # cuda, xpu, mtia: torch's backend module says how many this machine has
        backend = getattr(torch, device.type, None)
        available = getattr(backend, "is_available", None)
        count = backend.device_count() if callable(available) and available() else 0
    if count == 0:
        raise UserError(f"--device {name}: torch knows the name, but this machine has no {device.type} "
                        f"device that torch can use; {fix}")
    if device.index is not None and device.index >= count:
        raise UserError(f"--device {name}: this machine has {count} {device.type} device{'s' * (count > 1)}, "
                        f"{device.type}:0..{device.type}:{count - 1}")
    return device


def available_memory(device):
    """Bytes that `device` has free now (CPU: MemAvailable of /proc/meminfo); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None



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


class CheckpointClaim:
    """One run per checkpoint: while a CheckpointClaim on a path is held, making another (in any
    process) raises UserError naming the holder's pid and start time.

    The claim is an exclusive flock on <checkpoint>.lock beside the checkpoint, so it is atomic
    (one flock wins), and the kernel drops it when its holder dies in any way (SIGKILL included,
    and a reboot holds no locks): a lock file that can be locked is a claim nobody holds, taken
    over with one line saying so. The file records who holds it, for the message; release()
    removes it. Paths are resolved, so every working directory names the same claim.
    """

    def __init__(self, path, what="--checkpoint"):
        path = Path(path)
        check_writable(path, what)  # a folder in the way or an unwritable place, said as usual
        path = path.resolve()
        self.lock_path = path.with_name(path.name + ".lock")
        self.made = []  # folders made for the lock, removed again on release if still empty
        folder = path.parent
        while not folder.exists():
            self.made.append(folder)
            folder = folder.parent
        for made in reversed(self.made):
            made.mkdir(exist_ok=True)
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _claim_holder(fd)
                os.close(fd)
                self._remove_made()
                raise UserError(f"{what} {path} is in use by another run ({_describe_holder(holder)}); wait for "
                                f"it to end or stop it, or pass another --checkpoint") from None
            if _names_file(self.lock_path, fd):
                break
            os.close(fd)  # its holder released (and removed) the file between our open and flock: again
        self.fd = fd
        left = _read_claim(fd)
        if left is not None:  # locked by nobody, yet not removed: its holder never released it
            restarted = left.get("boot") not in (None, _boot_id())
            how = "the machine has restarted since" if restarted else "that run ended without releasing it (killed?)"
            print(f"note: {path} was left claimed by {_describe_holder(left)}, but {how}; this run takes it over",
                  file=sys.stderr, flush=True)
        record = dict(pid=os.getpid(), started=time.time(), host=socket.gethostname(), boot=_boot_id())
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        _HELD.append(self)

    def release(self):
        """Give the claim up (lock file removed); again is a no-op. Safe in a signal handler before os._exit."""
        if self not in _HELD:
            return
        _HELD.remove(self)
        try:
            if _names_file(self.lock_path, self.fd):  # removed while still locked: no run can lock it meanwhile
                os.unlink(self.lock_path)
        except OSError:  # left behind, unlocked: the next run takes it over
            pass
        os.close(self.fd)
        self._remove_made()

    def _remove_made(self):
        for folder in self.made:
            try:
                folder.rmdir()
            except OSError:  # the run wrote into it, or someone else did: kept
                break


_HELD = []  # the claims this process holds, in the order made


def release_claims(since=0):
    """Release the claims this process made after its first `since` (all of them by default: for the
    exits that skip `finally`, os._exit), the latest first."""
    for claim in reversed(_HELD[since:]):
        claim.release()


def releasing_claims(main):
    """Decorator: the claims `main` makes are released however it ends (return, UserError, Ctrl-C, any error)."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        held = len(_HELD)
        try:
            return main(*args, **kwargs)
        finally:
            release_claims(since=held)
    return run


def _names_file(path, fd):
    """Whether `path` is still the file open as `fd` (not removed, or replaced by another)."""
    try:
        st, fst = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _read_claim(fd):
    """The holder record in a lock file, {} if it holds something else, None if it is empty."""
    raw = os.pread(fd, 4096, 0)
    if not raw:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _claim_holder(fd, wait=2.0):
    """The record of the process holding the lock on fd. It writes it just after locking, over the
    record of any stale claim it took over, so a record that is not of a live process of this boot
    is waited on for a moment."""
    deadline = time.monotonic() + wait
    while True:
        record = _read_claim(fd) or {}
        if _alive(record) or time.monotonic() > deadline:
            return record
        time.sleep(0.02)


def _alive(record):
    """Whether a holder record names a running process (one on another host is taken on trust)."""
    if not record or record.get("host") != socket.gethostname():
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


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "iteration", "epoch", "rng", "config", "history")
HISTORY_KEYS = ("train_loss", "train_acc", "test_iteration", "test_epoch", "test_acc", "test_loss")
CONFIG_KEYS = ("width", "classes", "data_dir", "synthetic")  # what every script reads from a config


def read_checkpoint(path, config_keys=()):
    """The checkpoint dict at `path`, loaded with weights_only=True; UserError if it is not one.

    Checked: every key train.py writes, a config dict holding CONFIG_KEYS and `config_keys`, a
    positive integer width and a list of class names, and a history with every list.
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
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
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
