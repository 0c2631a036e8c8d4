"""Shared fixtures: small data in the exact CIFAR-10 on-disk format, and a small trained checkpoint."""
import contextlib
import importlib
import io
import os
import re
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))  # the benchmarks' functions are tested too

import cifar10  # noqa: E402
import utils  # noqa: E402

# Run by pytest-xdist (`-n 2`, the README's command), each worker gets its share of the cores: two workers
# of two torch threads each on two cores spin against each other, and a 0.6 s test takes 46 s.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def script_env(env=None):
    """The environment a test runs a script in: the user's, unbuffered, Agg, and one torch thread (the
    suite's networks are tiny and two processes run at a time, so two threads each would only wait on
    each other), with `env` added. Every process of a test that compares runs bit for bit gets it."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", **(env or {})}


def run_script(script, *args, timeout=300, cwd=ROOT, env=None):
    """Run a top-level script as a user would (from cwd, in script_env(env)); returns the
    CompletedProcess (text output)."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=script_env(env),
                          capture_output=True, text=True, timeout=timeout)


# A sitecustomize that makes this Linux look, to the repo's code, like a system without the POSIX-only
# modules and calls (Windows has none of them; macOS has no /proc): importing fcntl or resource fails,
# os.pread, os.pwrite, os.pathconf and signal.pthread_sigmask are gone, and opening a path under /proc
# raises FileNotFoundError.
WITHOUT_POSIX_ONLY = """
import builtins, io, os, signal, sys
for name in ("fcntl", "resource"):
    sys.modules[name] = None
for module, names in ((os, ("pread", "pwrite", "pathconf", "getloadavg")), (signal, ("pthread_sigmask",))):
    for name in names:
        if hasattr(module, name):
            delattr(module, name)
_open = io.open


def _open_without_proc(file, *args, **kwargs):
    if isinstance(file, (str, bytes, os.PathLike)) and os.fsdecode(file).startswith("/proc"):
        raise FileNotFoundError(2, "No such file or directory", os.fsdecode(file))
    return _open(file, *args, **kwargs)


builtins.open = io.open = _open_without_proc
"""


def without_posix_only_env(folder):
    """The environment (for run_script's env) of a process that runs under WITHOUT_POSIX_ONLY, its
    sitecustomize.py written into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(WITHOUT_POSIX_ONLY, encoding="utf-8")
    return {"PYTHONPATH": os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])])}


def run_in_process(script, args):
    """`python script args`, run here: the script's main(args) under utils.run_cli, as its `__main__`
    runs it (test_bad_inputs checks that every script's does), with one torch thread as script_env
    gives a process, and with what a process would show. A warning counts as a line on stderr (pytest would
    otherwise swallow it) and an exception that escapes run_cli as a traceback with exit status 1."""
    main = importlib.import_module(script.removesuffix(".py")).main
    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)  # as script_env gives a process: runs compared bit for bit must agree on it
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            utils.run_cli(lambda: main(args))
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
            if isinstance(exit.code, str):
                print(exit.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            torch.set_num_threads(threads)
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue() + shown)



@pytest.fixture
def one_thread():
    """For tests of tiny models: one thread is as fast, and it does not stall when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PROGRESS_BAR = re.compile(r"^\s*\d+%\|.*\|")


def message_lines(stderr):
    """The lines of stderr that are messages: progress-bar redraws (tqdm writes them with \r on a
    terminal, \n into a pipe) are not."""
    return [line for line in re.split(r"[\r\n]", stderr) if line.strip() and not PROGRESS_BAR.match(line)]


def assert_one_line_error(proc, *words):
    """A bad input: non-zero exit, one line on stderr that says what is wrong, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = message_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory):
    """A data dir whose cifar-10-batches-py/ holds 1,024 train and 512 test synthetic images."""
    root = tmp_path_factory.mktemp("small_cifar")
    train = cifar10.make_synthetic_images(1024, seed=10)
    test = cifar10.make_synthetic_images(512, seed=11)
    cifar10.write_cifar10_folder(root, *train, *test, [f"class-{k}" for k in range(10)])
    return root


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory):
    """A --data-dir with the --synthetic data already written (10,000 train + 10,000 test images)."""
    data_dir = tmp_path_factory.mktemp("data")
    cifar10.synthetic_cifar10(data_dir)
    return data_dir


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, synthetic_data_dir):
    """A width-8 checkpoint that train.py trained for 160 iterations on the --synthetic data (no snapshots)."""
    out = tmp_path_factory.mktemp("trained")
    proc = run_script("train.py", "--synthetic", "--data-dir", synthetic_data_dir, "--width", 8,
                      "--iterations", 160, "--checkpoint", out / "ckpt.pt", "--figures-dir", out / "figures",
                      "--snapshots", "none")
    assert proc.returncode == 0, proc.stderr
    return out / "ckpt.pt"

