"""Windows and macOS, stood in for on Linux: the code runs where the POSIX-only modules and calls do not
exist (conftest.WITHOUT_POSIX_ONLY), and the checkpoint's claim is filelock's, which locks on all three."""
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import utils
from conftest import ROOT, run_script, script_env, without_posix_only_env

MODULES = sorted({p.stem for p in [*ROOT.glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]}
                 | {f"visualize.{p.stem}" for p in (ROOT / "visualize").glob("*.py") if p.stem != "__init__"})


def test_every_module_imports_and_the_sitecustomize_takes_the_posix_only_calls_away(tmp_path):
    env = without_posix_only_env(tmp_path / "site")
    code = ("import importlib, os, signal, sys\n"
            "sys.path.insert(1, 'benchmarks')\n"
            "for name in ('fcntl', 'resource'):\n"
            "    try:\n        importlib.import_module(name)\n    except ImportError:\n        pass\n"
            "    else:\n        raise SystemExit(name + ' imported')\n"
            "assert not any(hasattr(os, n) for n in ('pread', 'pwrite', 'pathconf'))\n"
            "assert not hasattr(signal, 'pthread_sigmask')\n"
            "try:\n    open('/proc/cpuinfo')\nexcept FileNotFoundError:\n    pass\n"
            "else:\n    raise SystemExit('/proc opened')\n"
            f"for name in {MODULES!r}:\n    importlib.import_module(name)\n"
            "import speed, checkpoint, utils, torch\n"
            "print(speed.cpu_model(), checkpoint._boot_id(), utils.path_limits('.'))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=script_env(env), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    model, boot, limits = proc.stdout.split(" ", 2)
    assert model and boot == "None" and limits.strip() == f"({utils.NAME_MAX_FALLBACK}, None)"


def test_train_resume_and_a_plot_script_run_without_the_posix_only_calls(small_data_dir, tmp_path):
    """A short run, then its resume, equal one run of the same length; a plot script reads the result."""
    env = without_posix_only_env(tmp_path / "site")
    common = ["--data-dir", small_data_dir, "--width", 4, "--batch-size", 64, "--figures-dir", tmp_path / "figures"]
    for args in (["--iterations", 10], ["--iterations", 18, "--resume"]):
        proc = run_script("train.py", *common, "--checkpoint", tmp_path / "split.pt", *args, env=env)
        assert proc.returncode == 0, proc.stderr
    proc = run_script("train.py", *common, "--checkpoint", tmp_path / "whole.pt", "--iterations", 18)
    assert proc.returncode == 0, proc.stderr
    split, whole = (checkpoint.read_checkpoint(tmp_path / name) for name in ("split.pt", "whole.pt"))
    assert split["iteration"] == whole["iteration"] == 18
    for key, value in whole["model"].items():
        assert torch.equal(split["model"][key], value), key
    assert not list(tmp_path.glob("split.pt.*"))  # the claim's lock and record went with the run
    proc = run_script("plot_conv1_filters.py", "--checkpoint", tmp_path / "split.pt", "--figures-dir",
                      tmp_path / "plots", env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "plots" / "conv1_filters_rgb.png").is_file()


HOLD = """
import sys
sys.path.insert(0, {root!r})
import checkpoint
with checkpoint.Claim({path!r}):
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_two_claims_on_one_checkpoint_refuse_each_other_across_processes(tmp_path):
    path = tmp_path / "run" / "c.pt"
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT), path=str(path))], cwd=ROOT,
                              env=script_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(utils.UserError, match=rf"is in use by another run \(pid {holder.pid}, started "):
            checkpoint.Claim(path)
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0
    assert not path.parent.exists()  # released: its lock and record removed, and the folder made for them
    with checkpoint.Claim(path) as claim:  # free again
        assert claim.held
        with pytest.raises(utils.UserError, match=rf"pid {os.getpid()}, started"):
            checkpoint.Claim(path)  # a second claim in this very process is refused too
    assert not path.parent.exists()  # the folder made for the claim went with it
