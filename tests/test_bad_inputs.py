"""Bad input, one table: every row is a command a user could type. Each must exit non-zero with one
line that says what is wrong (the row's words are in it), no traceback, and nothing lost: every
file in the row's folder (a checkpoint, a file in the way) is byte-for-byte as before, and nothing
new was written there.

The rows run as subprocesses, two at a time, in one module fixture (each one starts Python and
torch, ~1.5 s on an idle core). In the arguments, {tmp} is the row's own folder, {data} a small
dataset in the CIFAR-10 format and {good} a copy, in the row's folder, of a checkpoint that
train.py wrote (width 4, batch 64, 3 iterations on {data}). train.py rows get, before their own
arguments, `--data-dir {data} --width 4 --batch-size 64 --checkpoint {tmp}/c.pt --figures-dir
{tmp}/figures`; plot rows `--checkpoint {good} --figures-dir {tmp}/figures`. argparse keeps the last
value of a flag, so a row's own flags override these.
"""
import os
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import data
from conftest import assert_one_line_error, run_script

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
    ("checkpoint is the CSV", TRAIN, ["--checkpoint", "{tmp}/run.csv"], ["ends in .csv", "run.pt"], None),
    ("figures dir is the checkpoint", TRAIN, ["--checkpoint", "{tmp}/out", "--figures-dir", "{tmp}/out"],
     ["is where the checkpoint"], None),
    ("unwritable folder (Linux)", TRAIN, ["--figures-dir", "/proc/self/figures"], ["cannot be written"], None),
    ("plot figures dir is a file", PLOT, [], ["--figures-dir", "is a file"], file_at("figures")),
    ("plot figures dir under a file", "plot_gradient_pattern.py", ["--figures-dir", "{tmp}/f/figures"],
     ["cannot be made"], file_at("f")),
]
FLAG_ROWS = [  # every flag is range-checked, and argparse's errors are one line too
    ("lr nan", TRAIN, ["--lr", "nan"], ["--lr must be a finite number above 0", "nan"], None),
    ("lr 0", TRAIN, ["--lr", "0"], ["--lr must be a finite number above 0"], None),
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
        folder = data.write_cifar10_folder(tmp / "d", *data.make_synthetic_images(50, seed=1),
                                           *data.make_synthetic_images(20, seed=2), [f"c{k}" for k in range(10)])
        if poison:
            (folder / poison).write_bytes(pickle.dumps(RunsCode(tmp / "code-ran"), protocol=2))
        for name in drop:
            (folder / name).unlink()
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
]

ROWS = {row[0]: row for row in OUTPUT_ROWS + FLAG_ROWS + CHECKPOINT_ROWS + DATA_FILE_ROWS}


def files_under(folder):
    """{relative path: bytes, or None for a folder}: everything under `folder`."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def good_checkpoint(small_data_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.pt"
    proc = run_script(TRAIN, "--data-dir", small_data_dir, "--width", 4, "--batch-size", 64, "--iterations", 3,
                      "--checkpoint", path, "--figures-dir", path.parent / "figures")
    assert proc.returncode == 0, proc.stderr
    return path


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
        if script == TRAIN:
            defaults = ["--data-dir", "{data}", "--width", "4", "--batch-size", "64", "--checkpoint", "{tmp}/c.pt",
                        "--figures-dir", "{tmp}/figures"]
        else:
            defaults = ["--checkpoint", "{good}", "--figures-dir", "{tmp}/figures"]
        jobs[name] = (script, [a.format(**given) for a in defaults + args], tmp, files_under(tmp))
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(run_script, script, *args, timeout=120)
                   for name, (script, args, _, _) in jobs.items()}
        return {name: (futures[name].result(), tmp, before) for name, (_, _, tmp, before) in jobs.items()}


@pytest.mark.parametrize("name", ROWS)
def test_bad_input_gets_one_line_and_loses_nothing(runs, name):
    proc, tmp, before = runs[name]
    words = [w(tmp) if callable(w) else w for w in ROWS[name][3]]
    assert_one_line_error(proc, *words)
    assert files_under(tmp) == before  # nothing changed, nothing new: no checkpoint, CSV or figure
