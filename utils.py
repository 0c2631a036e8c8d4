"""Errors for people and the command line: what every script shares to say what is wrong in one line.

It imports nothing of the project, so any module may raise a UserError without loading the network.
The checkpoint lives in checkpoint.py, devices and speed in speed.py, the data in data.py and what the
plot scripts share in visualize/.
"""
import argparse
import errno
import os
import sys
import tempfile
from pathlib import Path

# --------------------------------------------------------------------------- errors for people

class UserError(Exception):
    """Bad input a user can fix: reported as one line, without a traceback."""


WINDOWS_PATH_TOO_LONG = 206  # ERROR_FILENAME_EXCED_RANGE: Windows' ENAMETOOLONG


def run_cli(main):
    """Run `main()`; turn a UserError, or a path too long for the file system, into one line on stderr
    and exit status 2, Ctrl-C into one line and exit status 130."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as err:
        if err.errno != errno.ENAMETOOLONG and getattr(err, "winerror", None) != WINDOWS_PATH_TOO_LONG:
            raise
        # a path to read (a checkpoint, a data dir) too long to open; paths to write are checked by name
        print(f"error: {shorten(err.filename)} is longer than the file system allows ({err.strerror}); "
              f"pass a shorter path", file=sys.stderr)
        sys.exit(2)


def shorten(path):
    """`path` as text, its middle elided past 80 characters, so a message about it stays one readable line."""
    text = str(path)
    return text if len(text) <= 80 else f"{text[:60]}...{text[-15:]}"


# Where the system cannot be asked (Windows has no pathconf): the name limit of NTFS, APFS and ext4 alike;
# a path too long there fails when opened, and run_cli says so in one line.
NAME_MAX_FALLBACK = 255


def path_limits(folder):
    """(longest name, longest path) the file system of `folder` allows, in bytes; path None where unknown."""
    pathconf = getattr(os, "pathconf", None)
    if pathconf is None:
        return NAME_MAX_FALLBACK, None
    try:
        return pathconf(folder, "PC_NAME_MAX"), pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError):
        return NAME_MAX_FALLBACK, None


def check_name_length(path, what):
    """UserError if `path`, or a name in it, is longer than the file system allows (os.stat and open
    would raise ENAMETOOLONG); the limits are asked of the nearest folder that exists."""
    path = Path(path).absolute()
    existing = next(p for p in path.parents if os.path.isdir(p))
    name_max, path_max = path_limits(existing)
    longest = max(path.parts, key=lambda part: len(os.fsencode(part)))
    shown = shorten(path)
    if len(os.fsencode(longest)) > name_max:
        raise UserError(f"{what} {shown} has a name of {len(os.fsencode(longest))} bytes, but this file "
                        f"system allows at most {name_max}; pass a shorter name")
    if path_max is not None and len(os.fsencode(str(path))) >= path_max:
        raise UserError(f"{what} {shown} is {len(os.fsencode(str(path)))} bytes long, but this file system "
                        f"allows paths under {path_max}; pass a shorter path")


def check_at_least(minimum, **values):
    """UserError for the first flag (named by its keyword: batch_size is --batch-size) below `minimum`."""
    for name, value in values.items():
        if value < minimum:
            raise UserError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")


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


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line (as UserError does) instead of usage + error."""

    def error(self, message):
        print(f"error: {message}; see --help", file=sys.stderr)
        sys.exit(2)


# --------------------------------------------------------------------------- files

def write_atomic(path, write):
    """write(binary file) into a temporary file beside `path`, flushed to disk, then os.replace: a kill
    leaves the old or the new file, never half of one. The file gets the mode open() would give it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path, text):
    """write_atomic of `text` as UTF-8 (newlines as written, on every platform)."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))
