"""train.py end to end: it learns, it resumes exactly, it never loses a checkpoint, it rejects bad input."""
import csv
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import checkpoint
import cifar10
import steps
from conftest import PROGRESS_BAR, ROOT, run_in_process, script_env
from model import ResNet
from visualize import progress


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_training_on_synthetic_data_reaches_high_test_accuracy(trained_checkpoint, synthetic_data_dir):
    ckpt = load(trained_checkpoint)
    history = ckpt["history"]
    assert ckpt["iteration"] == 160 and len(history["train_acc"]) == len(history["train_loss"]) == 160
    # 10,000 images at batch 128: epochs end at 79 and 158 iterations; the run's end is evaluated too
    assert history["test_iteration"] == [79, 158, 160] and history["test_epoch"] == [1, 2, 2]
    assert history["test_acc"][-1] >= 0.95, history["test_acc"]
    # ...which is learned: the same network untrained is near chance on the same test set
    untrained = checkpoint.build_model({**ckpt, "model": ResNet(8).state_dict()})
    images, labels, _ = cifar10.load_cifar10(cifar10.dataset_root(synthetic_data_dir, True), train=False)
    assert steps.evaluate(untrained, images, labels)[0] < 0.3
    model, _ = checkpoint.load_checkpoint(trained_checkpoint)
    acc, loss = steps.evaluate(model, images, labels)
    assert acc == pytest.approx(history["test_acc"][-1]) and loss == pytest.approx(history["test_loss"][-1], rel=1e-4)
    assert ckpt["config"]["width"] == 8 and ckpt["config"]["synthetic"] is True
    # a CPU run unasked trains as the report did: fp32, NCHW, eager; the config records what the run used
    # (a run this short skips the probe and takes the rules' default, fp32 NCHW on every CPU)
    assert (ckpt["config"]["precision"] == "fp32" and not any(ckpt["config"][key] for key in
            ("channels_last", "cuda_graph", "compile"))) or torch.cuda.is_available()
    assert ckpt["config"]["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")


def test_history_csv_and_learning_progress_figures(trained_checkpoint):
    history = load(trained_checkpoint)["history"]
    with open(trained_checkpoint.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 160
    assert [float(r["train_acc"]) for r in rows] == pytest.approx(history["train_acc"], abs=1e-6)
    # 160 iterations: the loss is averaged over windows of 16 (curve_window), each written on its last row
    means = {int(r["iteration"]): float(r["train_loss_mean100"]) for r in rows if r["train_loss_mean100"]}
    assert list(means) == list(range(16, 161, 16))
    assert list(means.values()) == pytest.approx(np.reshape(history["train_loss"], (10, 16)).mean(1), rel=1e-5)
    assert [int(r["iteration"]) for r in rows if r["test_acc"]] == [79, 158, 160]
    from matplotlib.image import imread
    for name in ("train_accuracy", "train_loss", "test_accuracy", "test_loss"):
        png = imread(trained_checkpoint.parent / "figures" / f"{name}.png")
        assert png.shape[0] > 100 and png.std() > 0


def history_of(n, steps_per_epoch=79):
    """A history of n iterations, evaluated after each epoch of steps_per_epoch and at the end, whose last
    batch of each epoch (partial in a real run) has accuracy 0: the false dip the figure must not draw."""
    g = torch.Generator().manual_seed(n)
    ends = list(range(steps_per_epoch, n + 1, steps_per_epoch))
    acc = (0.5 + 0.4 * torch.rand(n, generator=g)).tolist()
    for end in ends:
        acc[end - 1] = 0.0
    tests = ends + ([n] if n % steps_per_epoch else [])
    return dict(train_loss=torch.rand(n, generator=g).tolist(), train_acc=acc, test_iteration=tests,
                test_epoch=[min(it // steps_per_epoch, len(ends)) for it in tests],
                test_acc=[0.8] * len(tests), test_loss=[0.5] * len(tests)), ends


@pytest.mark.parametrize("n, window", [(30, 3), (300, 30), (1000, 100), (20332, 100)])
def test_train_curves_fit_any_run_length(n, window, tmp_path):
    history, ends = history_of(n)
    curves = progress.progress_curves(history)
    loss, acc = curves["train_loss"], curves["train_accuracy"]
    assert loss["window"] == acc["window"] == window
    # the loss: the mean of each complete window, drawn at the window's centre (iterations k*w+1 .. (k+1)*w)
    k = np.arange(n // window)
    x, y = loss["mean"]
    np.testing.assert_allclose(y, np.reshape(history["train_loss"][:len(k) * window], (-1, window)).mean(1))
    np.testing.assert_allclose(x, ((k * window + 1) + (k + 1) * window) / 2)
    assert len(x) >= 10 and loss["each"] == (list(range(1, n + 1)), history["train_loss"])
    # the accuracy leaves out the last batch of each epoch, in the faint curve and in the means
    assert progress.epoch_last_iterations(history) == set(ends)
    a = np.array(history["train_acc"])
    kept = np.ones(n, bool)
    kept[np.array(ends, dtype=int) - 1] = False
    x, y = acc["mean"]
    np.testing.assert_allclose(y, [a[i * window:(i + 1) * window][kept[i * window:(i + 1) * window]].mean() for i in k])
    np.testing.assert_allclose(x, ((k * window + 1) + (k + 1) * window) / 2)
    assert acc["each"][0] == [i for i in range(1, n + 1) if kept[i - 1]] and min(acc["each"][1]) >= 0.5
    if n == 300:
        paths = progress.save_progress_figures(history, tmp_path, "test")
        assert [p.name for p in paths] == ["train_accuracy.png", "train_loss.png", "test_accuracy.png", "test_loss.png"]


def train_small(data_dir, ckpt, *args, figures=True):
    """A width-4, batch-64 run on 1,024 images (16 iterations an epoch), in this process (no start-up to
    pay); figures: --figures-dir beside ckpt."""
    figures = ["--figures-dir", ckpt.parent / "figures"] if figures else []
    proc = run_in_process("train.py", [str(a) for a in ("--data-dir", data_dir, "--width", 4, "--batch-size", 64,
                                                        "--checkpoint", ckpt, *figures, *args)])
    assert proc.returncode == 0, proc.stderr
    return load(ckpt)


def assert_same_run(a, b):
    """b (stopped and resumed) ends exactly where a (one run) does; b may hold extra evaluations."""
    for key in ("iteration", "epoch", "scheduler"):
        assert a[key] == b[key], key
    for key in ("train_loss", "train_acc"):
        assert a["history"][key] == b["history"][key], key
    evaluations = lambda h: list(zip(h["test_iteration"], h["test_epoch"], h["test_acc"], h["test_loss"]))
    assert set(evaluations(a["history"])) <= set(evaluations(b["history"]))
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for i, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), (i, k)


def test_resume_after_an_epoch_and_extending_a_finished_run_equal_one_run(small_data_dir, tmp_path):
    straight = train_small(small_data_dir, tmp_path / "straight.pt", "--epochs", 2)
    train_small(small_data_dir, tmp_path / "split.pt", "--epochs", 1)
    resumed = train_small(small_data_dir, tmp_path / "split.pt", "--resume", "--epochs", 2)
    assert straight["iteration"] == 32 and straight["epoch"] == 2
    assert_same_run(straight, resumed)


def test_resume_mid_epoch_equals_one_run_and_draws_into_the_runs_figures_dir(small_data_dir, tmp_path):
    straight = train_small(small_data_dir, tmp_path / "straight.pt", "--epochs", 2, "--iterations", 21)
    (tmp_path / "split").mkdir()
    figure = tmp_path / "split" / "figures" / "test_accuracy.png"
    first = train_small(small_data_dir, tmp_path / "split" / "c.pt", "--epochs", 2, "--iterations", 5)
    drawn = figure.read_bytes()  # one evaluation, at iteration 5
    # no --figures-dir: the resumed run draws where it drew before (not into ./figures)
    resumed = train_small(small_data_dir, tmp_path / "split" / "c.pt", "--resume", "--iterations", 21, figures=False)
    assert_same_run(straight, resumed)
    assert resumed["config"]["figures_dir"] == first["config"]["figures_dir"] == str(figure.parent)
    assert figure.read_bytes() != drawn  # redrawn with the evaluations at 16 and 21


def test_sigterm_saves_a_checkpoint_that_resumes_to_the_same_weights(small_data_dir, tmp_path):
    ckpt = tmp_path / "run.pt"
    cmd = [sys.executable, str(ROOT / "train.py"), "--data-dir", str(small_data_dir), "--width", 4,
           "--batch-size", 64, "--epochs", 100, "--checkpoint", str(ckpt), "--figures-dir", str(tmp_path)]
    proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert "training a width-4" in proc.stdout.readline()  # the loop (and its signal handler) is set up
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "continue with --resume" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.glob("run.*")) == ["run.csv", "run.pt", "run.snapshots"]  # claim released
    stopped = load(ckpt)
    assert 0 < stopped["iteration"] < 1600
    target = stopped["iteration"] + 20
    resumed = train_small(small_data_dir, ckpt, "--resume", "--iterations", target)
    straight = train_small(small_data_dir, tmp_path / "straight.pt", "--epochs", 100, "--iterations", target)
    assert_same_run(straight, resumed)


def test_a_second_signal_right_after_the_first_stops_at_once(small_data_dir, tmp_path):
    """Ctrl-C twice in quick succession ends the run promptly with one line, wherever the second lands
    (the first starts the save of a checkpoint and the writer's thread; the second may interrupt either)."""
    for attempt, gap in enumerate((0, 0.003, 0.03)):
        ckpt = tmp_path / f"run{attempt}.pt"
        cmd = [sys.executable, str(ROOT / "train.py"), "--data-dir", small_data_dir, "--width", 4, "--batch-size", 64,
               "--epochs", 100, "--checkpoint", ckpt, "--figures-dir", tmp_path]
        proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=script_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE,
                                text=True)
        assert "training a width-4" in proc.stdout.readline()  # the handler is installed
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        time.sleep(gap)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"hung after two SIGINTs {gap} s apart")
        lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not PROGRESS_BAR.match(line)]
        assert proc.returncode == 130 and len(lines) == 1, err
        assert lines[0].startswith(("stopped by signal 2", "stopped at once by a second signal (2)")), err
        if ckpt.exists():  # whole, whichever save it holds
            assert load(ckpt)["iteration"] >= 1
        assert not ckpt.with_name(ckpt.name + ".lock").exists()  # released before os._exit, too


KILLER = """
import sys, torch
sys.path.insert(0, {root!r})
import checkpoint
big = torch.arange(4_000_000, dtype=torch.float64)
print("ready", flush=True)
i = 0
while True:
    i += 1
    checkpoint.save_atomic({{"version": i, "payload": big + i}}, {path!r})
"""


def test_atomic_save_survives_a_kill_mid_save(tmp_path):
    path = tmp_path / "ckpt.pt"
    versions = set()
    for delay in (0.3, 0.55, 0.8, 1.1):
        proc = subprocess.Popen([sys.executable, "-c", KILLER.format(root=str(ROOT), path=str(path))],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.kill()  # SIGKILL: no chance to clean up
        proc.wait()
        saved = torch.load(path, weights_only=True)  # always a whole checkpoint, old or new
        assert torch.equal(saved["payload"], torch.arange(4_000_000, dtype=torch.float64) + saved["version"])
        versions.add(saved["version"])
    assert len(versions) > 1  # the kills did land while saves were going on
