"""Bad input, one table: every row is a command a user could type. Each must exit non-zero with one
line that says what is wrong (the row's words are in it), no traceback, and nothing lost: every
file in the row's folder (a checkpoint, a file in the way) is byte-for-byte as before, and nothing
new was written there.

Most rows are checks of arguments and files, so they run in this process: the script's main(argv)
as its `__main__` runs it, under utils.run_cli (what every script's `__main__` is, checked below),
with stdout, stderr and warnings captured; a Python+torch start-up per row would cost ~1.5 s. The
rows in SUBPROCESS run as real processes (a real exit through each kind of script), and so do the
tests below the table whose point is more than one process: runs raced on one checkpoint, a run
stopped or killed while it holds one. In the arguments, {tmp} is the row's own folder, {data} a
small dataset in the CIFAR-10 format and {good} a copy, in the row's folder, of a checkpoint that
train.py wrote (width 4, batch 64, 3 iterations on {data}). train.py rows get, before their own
arguments, `--data-dir {data} --width 4 --batch-size 64 --checkpoint {tmp}/c.pt --figures-dir
{tmp}/figures`; plot rows `--checkpoint {good} --figures-dir {tmp}/figures`. argparse keeps the last
value of a flag, so a row's own flags override these.
"""
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import checkpoint
import cifar10
from visualize import progress
from conftest import ROOT, assert_one_line_error, message_lines, run_in_process, run_script, script_env

TRAIN, PLOT = "train.py", "plot_conv1_filters.py"


def file_at(name, content=b"in the way"):
    """Setup: a regular file at {tmp}/name (its parent folders made)."""
    def make(tmp, good):
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(content)
    return make


def folder_at(name):
    """Setup: a folder at {tmp}/name holding one file."""
    def make(tmp, good):
        (tmp / name).mkdir(parents=True)
        (tmp / name / "kept.txt").write_text("kept")
    return make


def checkpoint_at(name, change=None):
    """Setup: the good checkpoint at {tmp}/name, after change(ckpt) where given."""
    def make(tmp, good):
        if change is None:
            shutil.copyfile(good, tmp / name)
            return
        ckpt = torch.load(good, weights_only=True)
        change(ckpt)
        torch.save(ckpt, tmp / name)
    return make


def poison_weights(ckpt):
    ckpt["model"]["conv1.conv.weight"][0, 0, 0, 0] = float("nan")


def diverging(ckpt):
    """A run whose Adam steps are huge: resumed, its loss becomes NaN within the first stretch."""
    ckpt["config"]["lr"] = 1e30
    for group in ckpt["optimizer"]["param_groups"]:
        group["lr"] = group["initial_lr"] = 1e30


def missing_devices():
    """Device names torch knows that this machine lacks."""
    names = ["meta", "hpu", "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"]
    if not torch.backends.mps.is_available():
        names.append("mps")
    return names


def load_error(tmp):
    """torch.load's own reason for refusing the truncated checkpoint, to find whole in the line."""
    try:
        torch.load(tmp / "c.pt", weights_only=True)
    except Exception as err:
        return " ".join(str(err).split())
    raise AssertionError("the truncated checkpoint loaded")


# (name, script, arguments, words the line must hold, setup(tmp, good) or None)
OUTPUT_ROWS = [  # train.py checks where it will write before any work; so do the plot scripts
    ("figures dir is a file", TRAIN, [], ["--figures-dir", "is a file", "a folder must go"], file_at("figures")),
    ("figures dir under a file", TRAIN, ["--figures-dir", "{tmp}/f/figures"], ["cannot be made", "is a file"],
     file_at("f")),
    ("figure is a folder", TRAIN, [], ["train_loss.png is a folder"], folder_at("figures/train_loss.png")),
    ("checkpoint is a folder", TRAIN, ["--overwrite"], ["--checkpoint", "is a folder", "a file must go"],
     folder_at("c.pt")),
    ("checkpoint under a file", TRAIN, ["--checkpoint", "{tmp}/f/c.pt"], ["cannot be made", "is a file"],
     file_at("f")),
    ("history CSV is a folder", TRAIN, [], ["history CSV", "c.csv is a folder"], folder_at("c.csv")),
    ("snapshots folder is a file", TRAIN, [], ["snapshots' folder", "c.snapshots is a file", "a folder must go"],
     file_at("c.snapshots")),
    ("checkpoint in new folders, bad flag", TRAIN, ["--checkpoint", "{tmp}/new/deeper/c.pt", "--lr", "0"],
     ["--lr must be"], None),  # the folders made for its claim go with it
    ("checkpoint is the CSV", TRAIN, ["--checkpoint", "{tmp}/run.csv"], ["ends in .csv", "run.pt"], None),
    ("figures dir is the checkpoint", TRAIN, ["--checkpoint", "{tmp}/out", "--figures-dir", "{tmp}/out"],
     ["is where the checkpoint"], None),
    ("unwritable folder (Linux)", TRAIN, ["--figures-dir", "/proc/self/figures"], ["cannot be written"], None),
    ("plot figures dir is a file", PLOT, [], ["--figures-dir", "is a file"], file_at("figures")),
    ("plot figures dir under a file", "plot_gradient_pattern.py", ["--figures-dir", "{tmp}/f/figures"],
     ["cannot be made"], file_at("f")),
    # a name longer than the file system's limit (255 bytes on most), and a path longer than PATH_MAX
    ("figures dir name too long", TRAIN, ["--figures-dir", "{tmp}/" + "f" * 300], ["--figures-dir", "300 bytes",
                                                                               "pass a shorter name"], None),
    ("plot figures dir name too long", PLOT, ["--figures-dir", "{tmp}/" + "f" * 300], ["--figures-dir", "300 bytes"],
     None),
    ("figures dir path too long", TRAIN, ["--figures-dir", "{tmp}/" + "/".join(["f" * 200] * 25)],
     ["--figures-dir", "pass a shorter path"], None),
    ("checkpoint name too long", TRAIN, ["--checkpoint", "{tmp}/" + "c" * 300 + ".pt"],
     ["is longer than the file system allows", "pass a shorter path"], None),
    ("plot checkpoint name too long", PLOT, ["--checkpoint", "{tmp}/" + "c" * 300 + ".pt"],
     ["is longer than the file system allows"], None),
]
FLAG_ROWS = [  # every flag is range-checked, and argparse's errors are one line too
    ("lr nan", TRAIN, ["--lr", "nan"], ["--lr must be a finite number above 0", "nan"], None),
    ("lr 0", TRAIN, ["--lr", "0"], ["--lr must be a finite number above 0"], None),
    ("snapshot twice", TRAIN, ["--snapshots", "0,3,0"], ["--snapshots", "names epoch 0 twice"], None),
    ("snapshot past the run", TRAIN, ["--epochs", "2", "--snapshots", "0,3"], ["epoch 3 is past the run", "0..2"],
     None),
    ("snapshots no list", TRAIN, ["--snapshots", "often"], ["--snapshots 'often' is not a list of epochs"], None),
    ("no snapshots", "plot_feature_evolution.py", [], ["has no snapshots", "--snapshots"], None),
    ("dynamics threshold", "plot_learning_dynamics.py", ["--threshold", "1.5"], ["--threshold 1.5", "(0, 1]"], None),
    ("weight decay negative", TRAIN, ["--weight-decay", "-0.001"], ["--weight-decay must be a finite number"], None),
    ("lr gamma 0", TRAIN, ["--lr-gamma", "0"], ["--lr-gamma must lie in (0, 1]"], None),
    ("lr gamma above 1", TRAIN, ["--lr-gamma", "1.5"], ["--lr-gamma must lie in (0, 1]"], None),
    ("width beyond memory", TRAIN, ["--width", "100000"], ["--width 100000", "needs about", "GiB", "free"], None),
    ("batch beyond memory", TRAIN, ["--batch-size", "1000000000"], ["--batch-size 1000000000", "needs about"], None),
    ("iterations 0", TRAIN, ["--iterations", "0"], ["--iterations must be at least 1"], None),
    ("train flag type", TRAIN, ["--epochs", "many"], ["--epochs", "invalid int value", "--help"], None),
    ("layer", "plot_conv5_feature_map.py", ["--layer", "conv6_x"], ["conv1, conv2_x, conv3_x, conv4_x, conv5_x"], None),
    ("channel", "plot_conv5_reconstructed_pattern_trunk.py", ["--channel", "32"], ["has 32 channels", "0..31"], None),
    ("plot flag type", "plot_gradient_pattern.py", ["--channel", "one"], ["--channel", "invalid int"], None),
    ("image index", "plot_conv1_feature_map.py", ["--image-index", "512"], ["512", "0..511"], None),
    ("image list", "plot_conv1_reconstructed_pattern.py", ["--images", "500-505,512"], ["512", "0..511"], None),
    ("image syntax", "plot_conv5_reconstructed_pattern_shortcut.py", ["--images", "first"], ["4531-4546", "1,2,3"],
     None),
    ("too many images", "plot_conv1_reconstructed_pattern.py", ["--images", "0-9999"],
     ["names 10000", "at most 64"], None),
    ("deconvnet path", "plot_conv1_reconstructed_pattern.py", ["--path", "sideways"], ["both, shortcut, trunk"], None),
    ("reconstruction scale", "plot_conv1_reconstructed_pattern.py", ["--scale", "global"],
     ["--scale", "'image', 'shared'"], None),
    ("reconstruction method", "plot_conv5_reconstructed_pattern_trunk.py", ["--method", "sideways"],
     ["--method", "'sideways'", "'deconvnet', 'guided', 'gradient'"], None),
    ("feature-map channels", "plot_conv5_feature_map.py", ["--channels", "30-32"],
     ["--channels: channel 32", "has 32 channels", "0..31"], None),
    ("feature-map channels syntax", "plot_conv1_feature_map.py", ["--channels", "many"],
     ["--channels 'many'", "0-15", "1,2,3"], None),
    ("atlas layer", "plot_unit_atlas.py", ["--layer", "conv2_x,conv9_x"], ["conv9_x", "conv5_x"], None),
    ("atlas channels", "plot_unit_atlas.py", ["--channels", "0-999999999"], ["--channels", "at most 32"], None),
    ("steps 0", "plot_gradient_pattern.py", ["--steps", "0"], ["--steps must be at least 1"], None),
    ("ascent lr nan", "plot_gradient_pattern.py", ["--lr", "nan"], ["--lr must be a finite number above 0"], None),
    ("ascent lr 0", "plot_gradient_pattern.py", ["--lr", "0"], ["--lr must be a finite number above 0"], None),
    ("penalty negative", "plot_gradient_pattern.py", ["--penalty", "-1"], ["--penalty must be a finite number"], None),
    ("penalty inf", "plot_gradient_pattern.py", ["--penalty", "inf"], ["--penalty must be a finite number"], None),
    *[(f"device {name}", TRAIN, ["--device", name], [f"--device {name}"], None) for name in missing_devices()],
    ("plot device", PLOT, ["--device", "meta"], ["--device meta"], None),
]
CHECKPOINT_ROWS = [  # a missing, damaged or foreign checkpoint; a run that would be lost
    ("resume without checkpoint", TRAIN, ["--resume"], ["no checkpoint at", "drop --resume"], None),
    ("resume garbage", TRAIN, ["--resume"], ["not a readable checkpoint"], file_at("c.pt", b"\x00garbage" * 100)),
    ("resume truncated", TRAIN, ["--resume"], ["not a readable checkpoint", load_error],
     lambda tmp, good: (tmp / "c.pt").write_bytes(good.read_bytes()[:5000])),
    ("resume foreign", TRAIN, ["--resume"], ["not a train.py checkpoint", "missing model"],
     lambda tmp, good: torch.save({"weights": torch.zeros(3)}, tmp / "c.pt")),
    ("resume config not a dict", TRAIN, ["--resume"], ["its config is a list"],
     checkpoint_at("c.pt", lambda c: c.update(config=[4, 64]))),
    ("resume config lacks lr", TRAIN, ["--resume"], ["its config lacks lr"],
     checkpoint_at("c.pt", lambda c: c["config"].pop("lr"))),
    ("resume NaN weights", TRAIN, ["--resume", "--iterations", "6"], ["NaN or inf", "conv1.conv.weight"],
     checkpoint_at("c.pt", poison_weights)),
    ("resume other width", TRAIN, ["--resume", "--width", "16"], ["--width 4, not 16"], checkpoint_at("c.pt")),
    ("resume finished run", TRAIN, ["--resume"], ["already finished 3 iterations", "--epochs"], checkpoint_at("c.pt")),
    ("resume and overwrite", TRAIN, ["--resume", "--overwrite"], ["--resume", "--overwrite", "one of them"],
     checkpoint_at("c.pt")),
    ("existing checkpoint", TRAIN, [], ["already exists", "--resume", "--overwrite"], file_at("c.pt", b"precious")),
    ("NaN loss over an earlier run", TRAIN, ["--overwrite", "--lr", "1e30", "--iterations", "2"],
     ["the loss became", "no checkpoint of this run was written yet", "still the earlier run's", "--lr"],
     checkpoint_at("c.pt")),
    ("NaN loss on resume", TRAIN, ["--resume", "--iterations", "5"],
     ["the loss became", "holds the last good state, iteration 3"], checkpoint_at("c.pt", diverging)),
    ("plot missing checkpoint", PLOT, ["--checkpoint", "{tmp}/none.pt"], ["not found", "train.py"], None),
    ("plot corrupt checkpoint", "plot_gradient_pattern.py", ["--checkpoint", "{tmp}/c.pt"],
     ["not a readable checkpoint", "train again"], file_at("c.pt", b"PK\x03\x04 not really a zip archive" * 10)),
    ("plot config lacks width", PLOT, ["--checkpoint", "{tmp}/c.pt"], ["its config lacks width"],
     checkpoint_at("c.pt", lambda c: c["config"].pop("width"))),
    ("plot NaN weights", "plot_conv5_feature_map.py", ["--checkpoint", "{tmp}/c.pt"], ["NaN or inf"],
     checkpoint_at("c.pt", poison_weights)),
]


class RunsCode:
    """A pickle that, loaded by plain pickle.load, creates the file `marker`: a stand-in for any code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def dataset_at(poison=None, drop=()):
    """Setup: a small dataset in the CIFAR-10 format at {tmp}/d, its file `poison` replaced by a pickle
    that would create {tmp}/code-ran if it were run (the rows' check that nothing new appears in {tmp}
    proves it was not), the files in `drop` removed."""
    def make(tmp, good):
        folder = cifar10.write_cifar10_folder(tmp / "d", *cifar10.make_synthetic_images(50, seed=1),
                                           *cifar10.make_synthetic_images(20, seed=2), [f"c{k}" for k in range(10)])
        if poison:
            (folder / poison).write_bytes(pickle.dumps(RunsCode(tmp / "code-ran"), protocol=2))
        for name in drop:
            (folder / name).unlink()
    return make


def empty_split(name):
    """Setup: the small dataset at {tmp}/d with `name` holding no images (batches.meta: no class names)."""
    def make(tmp, good):
        dataset_at()(tmp, good)
        folder = tmp / "d" / cifar10.CIFAR10_FOLDER
        empty = ({b"label_names": [], b"num_vis": 3072} if name == "batches.meta" else
                 {b"batch_label": name.encode(), b"labels": [], b"data": np.zeros((0, 3072), np.uint8),
                  b"filenames": []})
        (folder / name).write_bytes(pickle.dumps(empty, protocol=2))
    return make


DATA_FILE_ROWS = [  # data files are data: a pickle that carries code is refused unread, in each kind of file
    ("code in a training batch", TRAIN, ["--data-dir", "{tmp}/d"], ["data_batch_2 was refused unread", "posix.system"],
     dataset_at("data_batch_2")),
    ("code in the test batch", "plot_conv1_feature_map.py", ["--data-dir", "{tmp}/d", "--image-index", "0"],
     ["test_batch was refused unread"], dataset_at("test_batch")),
    ("code in batches.meta", TRAIN, ["--data-dir", "{tmp}/d"], ["batches.meta was refused unread"],
     dataset_at("batches.meta")),
    ("training batches missing", TRAIN, ["--data-dir", "{tmp}/d"], ["lacks data_batch_3, data_batch_5"],
     dataset_at(drop=["data_batch_3", "data_batch_5"])),
    # an empty split, in any of the seven files (it once ended in ZeroDivisionError)
    *[(f"{name} empty", TRAIN, ["--data-dir", "{tmp}/d"], [f"{name} holds no images", "at least one"],
       empty_split(name)) for name in cifar10.DATASET_FILES if name != "batches.meta"],
    ("test_batch empty, plot", "plot_conv1_feature_map.py", ["--data-dir", "{tmp}/d", "--image-index", "0"],
     ["test_batch holds no images"], empty_split("test_batch")),
    ("batches.meta without class names", TRAIN, ["--data-dir", "{tmp}/d"],
     ["batches.meta has no list of class names"], empty_split("batches.meta")),
]

ROWS = {row[0]: row for row in OUTPUT_ROWS + FLAG_ROWS + CHECKPOINT_ROWS + DATA_FILE_ROWS}


# A real exit through each kind of script: an argparse error, a UserError before any work and one
# after training began (signal handlers installed), a plot script's UserError.
SUBPROCESS = {"train flag type", "existing checkpoint", "NaN loss on resume", "plot missing checkpoint"}


def files_under(folder):
    """{relative path: bytes, or None for a folder}: everything under `folder`."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def test_every_script_runs_its_main_under_run_cli():
    """What makes a row run in this process the same as the command: each script's `__main__` is just this."""
    scripts = {row[1] for row in ROWS.values()}
    for script in scripts:
        assert (ROOT / script).read_text().endswith('\nif __name__ == "__main__":\n    utils.run_cli(main)\n'), script


@pytest.fixture(scope="module")
def good_checkpoint(small_data_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.pt"
    proc = run_in_process(TRAIN, ["--data-dir", str(small_data_dir), "--width", "4", "--batch-size", "64",
                                  "--iterations", "3", "--checkpoint", str(path),
                                  "--figures-dir", str(path.parent / "figures")])
    assert proc.returncode == 0, proc.stderr
    return path


def row_args(script, args, given):
    if script == TRAIN:
        defaults = ["--data-dir", "{data}", "--width", "4", "--batch-size", "64", "--checkpoint", "{tmp}/c.pt",
                    "--figures-dir", "{tmp}/figures"]
    else:
        defaults = ["--checkpoint", "{good}", "--figures-dir", "{tmp}/figures"]
    return [a.format(**given) for a in defaults + args]


@pytest.fixture(scope="module")
def runs(good_checkpoint, small_data_dir, tmp_path_factory):
    """{row name: (finished process, the row's folder, its files before)}."""
    jobs = {}
    for name, (_, script, args, _, setup) in ROWS.items():
        tmp = tmp_path_factory.mktemp("row")
        shutil.copyfile(good_checkpoint, tmp / "good.pt")
        if setup:
            setup(tmp, good_checkpoint)
        given = {"tmp": tmp, "data": small_data_dir, "good": tmp / "good.pt"}
        jobs[name] = (script, row_args(script, args, given), tmp, files_under(tmp))
    with ThreadPoolExecutor(2) as pool:  # the processes start while the other rows run here
        procs = {name: pool.submit(run_script, script, *args, timeout=120)
                 for name, (script, args, _, _) in jobs.items() if name in SUBPROCESS}
        procs.update({name: run_in_process(script, args)
                      for name, (script, args, _, _) in jobs.items() if name not in SUBPROCESS})
        procs = {name: p if isinstance(p, subprocess.CompletedProcess) else p.result() for name, p in procs.items()}
    return {name: (procs[name], tmp, before) for name, (_, _, tmp, before) in jobs.items()}


@pytest.mark.parametrize("name", ROWS)
def test_bad_input_gets_one_line_and_loses_nothing(runs, name):
    proc, tmp, before = runs[name]
    words = [w(tmp) if callable(w) else w for w in ROWS[name][3]]
    assert_one_line_error(proc, *words)
    assert files_under(tmp) == before  # nothing changed, nothing new: no checkpoint, CSV, figure or lock file



# --------------------------------------------------------------------------- one run per checkpoint

IN_USE = ["is in use by another run", "started", "wait for it to end", "another --checkpoint"]


def train_cmd(data_dir, folder, *args):
    return [sys.executable, str(ROOT / TRAIN), "--data-dir", str(data_dir), "--width", "4", "--batch-size", "64",
            "--checkpoint", str(folder / "c.pt"), "--figures-dir", str(folder / "figures"), *map(str, args)]


def lock_of(folder):
    return folder / "c.pt.lock"


def claim_record_of(folder):
    """Who holds the claim on folder/c.pt, written by its holder once it has the lock."""
    return folder / "c.pt.claim"


def test_two_runs_raced_on_one_checkpoint_one_wins_and_the_other_is_refused(small_data_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("kept")
    before = files_under(tmp_path)
    cmd = train_cmd(small_data_dir, tmp_path, "--iterations", 20)
    racers = [subprocess.Popen(cmd, cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
              for _ in range(2)]  # started together: both reach the claim long before either could end
    done = [(p, *p.communicate(timeout=180)) for p in racers]
    winners = [(p, out, err) for p, out, err in done if p.returncode == 0]
    losers = [(p, out, err) for p, out, err in done if p.returncode != 0]
    assert len(winners) == len(losers) == 1, [err for _, _, err in done]
    (winner, _, _), (loser, _, err) = winners[0], losers[0]
    # refused at its start (not "already exists" after the winner's end): naming the winner
    assert_one_line_error(subprocess.CompletedProcess(cmd, loser.returncode, "", err), *IN_USE,
                          f"{tmp_path / 'c.pt'} is in use", f"pid {winner.pid},")
    ckpt = checkpoint.read_checkpoint(tmp_path / "c.pt")  # the winner's, whole
    assert ckpt["iteration"] == 20 and len(ckpt["history"]["train_loss"]) == 20
    after = files_under(tmp_path)
    assert {k: after[k] for k in before} == before  # what was there is untouched
    new = set(after) - set(before)  # and the only new files are the winner's outputs: no lock file
    assert new == {"c.pt", "c.csv", "figures", *(f"figures/{n}.png" for n in progress.PROGRESS_FIGURES),
                   "c.snapshots", *(f"c.snapshots/epoch_00{e}.pt" for e in range(3))}  # 20 iterations: epochs 0-2


def start_owner(small_data_dir, folder, log):
    """A train.py run resuming {folder}/c.pt for as long as it is let, frozen (SIGSTOP) once it holds its
    claim, so that it writes nothing while the others try. Its stderr goes to `log`."""
    with open(log, "w") as err:
        owner = subprocess.Popen(train_cmd(small_data_dir, folder, "--resume", "--iterations", 10 ** 6), cwd=ROOT,
                                 env=script_env(),
                                 stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 120
    while True:
        try:
            if json.loads(claim_record_of(folder).read_text())["pid"] == owner.pid:
                break
        except (OSError, ValueError, KeyError):
            pass
        if owner.poll() is not None or time.monotonic() > deadline:
            owner.kill()
            owner.wait()
            raise AssertionError(f"the owner never held its claim: {log.read_text()[-2000:]}")
        time.sleep(0.005)
    os.kill(owner.pid, signal.SIGSTOP)
    return owner


def test_a_checkpoint_in_use_is_refused_and_a_killed_owners_claim_is_taken_over(
        small_data_dir, good_checkpoint, tmp_path, monkeypatch):
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copyfile(good_checkpoint, folder / "c.pt")
    owner = start_owner(small_data_dir, folder, tmp_path / "owner.err")
    try:
        before = files_under(folder)
        attempts = {"resume": ["--resume"], "new run": [], "overwrite": ["--overwrite"],
                    "resume, relative path": ["--resume", "--checkpoint", "c.pt"]}
        for what, args in attempts.items():
            given = {"tmp": folder, "data": small_data_dir}
            with monkeypatch.context() as m:
                m.chdir(folder if "relative" in what else ROOT)  # the same claim from any working directory
                proc = run_in_process(TRAIN, row_args(TRAIN, args, given))
            assert_one_line_error(proc, *IN_USE, f"{folder / 'c.pt'} is in use", f"pid {owner.pid},")
            assert files_under(folder) == before, what
        # the plot scripts only read: never blocked
        proc = run_in_process(PLOT, ["--checkpoint", str(folder / "c.pt"), "--figures-dir", str(tmp_path / "plots")])
        assert proc.returncode == 0, proc.stderr
        assert files_under(folder) == before
    finally:
        owner.kill()  # SIGKILL, frozen: no chance to release anything
        owner.wait(timeout=60)
    assert claim_record_of(folder).exists()  # the claim it left
    proc = run_in_process(TRAIN, row_args(TRAIN, ["--resume", "--iterations", "5"], {"tmp": folder,
                                                                                      "data": small_data_dir}))
    assert proc.returncode == 0, proc.stderr
    lines = message_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    for word in (f"{folder / 'c.pt'} was left claimed by pid {owner.pid},", "ended without releasing it",
                 "takes it over"):
        assert word in lines[0], lines[0]
    assert checkpoint.read_checkpoint(folder / "c.pt")["iteration"] == 5  # trained on from the owner's checkpoint
    assert not lock_of(folder).exists() and not claim_record_of(folder).exists()


def test_a_claim_left_before_a_reboot_is_taken_over_even_if_its_pid_is_running_again(small_data_dir, tmp_path):
    """After a reboot the old pid may be another live process (here: this one); no lock is held, so it is stale."""
    claim_record_of(tmp_path).write_text(json.dumps(dict(pid=os.getpid(), started=time.time() - 3600,
                                                 host=socket.gethostname(), boot="an-earlier-boot")))
    proc = run_in_process(TRAIN, row_args(TRAIN, ["--iterations", "2"], {"tmp": tmp_path, "data": small_data_dir}))
    assert proc.returncode == 0, proc.stderr
    lines = message_lines(proc.stderr)
    assert len(lines) == 1 and f"pid {os.getpid()}," in lines[0] and "the machine has restarted since" in lines[0], lines
    assert checkpoint.read_checkpoint(tmp_path / "c.pt")["iteration"] == 2
    assert sorted(os.listdir(tmp_path)) == ["c.csv", "c.pt", "c.snapshots", "figures"]  # the lock went with the run
