"""Snapshots through training: which epochs are kept, that each holds the weights of the same run stopped
there, that a resumed run keeps them, and that every plot script takes one as --checkpoint."""
import pytest
import torch

import checkpoint
import snapshots
import utils
from model import ResNet
from conftest import assert_one_line_error, run_in_process
from test_train import train_small

# train_small's runs: 1,024 images at batch 64, 16 iterations an epoch


@pytest.mark.parametrize("text, last, epochs", [
    ("default", 6, [0, 1, 2, 5, 6]),
    ("default", 52, [0, 1, 2, 5, 10, 20, 30, 40, 52]),
    ("default", 40, [0, 1, 2, 5, 10, 20, 30, 40]),
    ("none", 6, []),
    ("3, 0,7", 7, [0, 3, 7]),
    ("every 5", 12, [0, 5, 10, 12]),
    ("every 1", 2, [0, 1, 2]),
])
def test_the_epochs_kept(text, last, epochs):
    assert snapshots.chosen_epochs(text, last) == epochs


@pytest.mark.parametrize("text, last, words", [
    ("0,0,3", 5, "names epoch 0 twice"),
    ("0,9", 5, "epoch 9 is past the run, whose last epoch is 5"),
    ("first and last", 5, "is not a list of epochs"),
    ("every 0", 5, "N of at least 1"),
    ("1-3", 5, "is not a list of epochs"),
])
def test_a_bad_choice_is_one_line(text, last, words):
    with pytest.raises(utils.UserError, match=words):
        snapshots.chosen_epochs(text, last)


def test_the_run_length_in_epochs_counts_a_partial_last_epoch():
    assert snapshots.run_epochs(32, 16) == 2 and snapshots.run_epochs(33, 16) == 3


def test_a_snapshot_holds_the_weights_of_the_run_stopped_at_that_epoch(small_data_dir, tmp_path, one_thread):
    three = train_small(small_data_dir, tmp_path / "three.pt", "--epochs", 3, "--snapshots", "every 1", figures=False)
    found = snapshots.find(tmp_path / "three.pt")
    assert list(found) == [0, 1, 2, 3]
    for epoch in (2,):
        stopped = train_small(small_data_dir, tmp_path / f"stopped{epoch}.pt", "--epochs", epoch, "--snapshots", "none",
                              figures=False)
        snap = torch.load(found[epoch], weights_only=True)
        assert snap["kind"] == "snapshot" and snap["epoch"] == epoch and snap["iteration"] == stopped["iteration"] == 16 * epoch
        assert snap["test_acc"] == stopped["history"]["test_acc"][-1]
        assert snap["history"] == stopped["history"] and snap["config"]["width"] == 4
        for name, tensor in stopped["model"].items():
            assert torch.equal(snap["model"][name], tensor), name
    # epoch 0: the initial weights, those of a fresh network of the seed, with its test accuracy measured
    initial = torch.load(found[0], weights_only=True)
    torch.manual_seed(0)
    fresh = ResNet(4, 10).state_dict()
    assert all(torch.equal(initial["model"][k], v) for k, v in fresh.items())
    assert initial["iteration"] == 0 and 0 <= initial["test_acc"] <= 1
    # the last: the run's checkpoint itself
    last = torch.load(found[3], weights_only=True)
    assert all(torch.equal(last["model"][k], v) for k, v in three["model"].items())


def test_a_resumed_run_keeps_its_snapshots_and_adds_the_rest(small_data_dir, tmp_path, one_thread):
    ckpt = tmp_path / "run.pt"
    # a run of 2 epochs cannot keep epoch 4: one line, nothing written
    proc = run_in_process("train.py", ["--data-dir", str(small_data_dir), "--width", "4", "--batch-size", "64",
                                       "--checkpoint", str(ckpt), "--epochs", "2", "--snapshots", "0,1,4"])
    assert_one_line_error(proc, "epoch 4 is past the run, whose last epoch is 2")
    assert not ckpt.exists() and not snapshots.folder(ckpt).exists()
    train_small(small_data_dir, ckpt, "--epochs", 1, "--snapshots", "every 1", figures=False)
    before = {epoch: path.read_bytes() for epoch, path in snapshots.find(ckpt).items()}
    assert list(before) == [0, 1]
    train_small(small_data_dir, ckpt, "--resume", "--epochs", 2, figures=False)  # its own choice: every 1
    after = snapshots.find(ckpt)
    assert list(after) == [0, 1, 2]
    assert all(after[epoch].read_bytes() == data for epoch, data in before.items())
    straight = train_small(small_data_dir, tmp_path / "straight.pt", "--epochs", 2, "--snapshots", "none", figures=False)
    resumed = torch.load(after[2], weights_only=True)
    assert all(torch.equal(resumed["model"][k], v) for k, v in straight["model"].items())
    # a new run over it starts its snapshots afresh
    train_small(small_data_dir, ckpt, "--overwrite", "--epochs", 1, "--snapshots", "1", figures=False)
    assert list(snapshots.find(ckpt)) == [1]


def test_a_snapshot_is_read_by_the_plot_scripts_but_not_resumed(small_data_dir, tmp_path, one_thread):
    ckpt = tmp_path / "run.pt"
    train_small(small_data_dir, ckpt, "--epochs", 1, "--snapshots", "0,1", figures=False)
    first = snapshots.path(ckpt, 0)
    snap = checkpoint.read_checkpoint(first)
    model, _ = checkpoint.load_checkpoint(first)  # the plot scripts' way in: the epoch-0 weights
    assert all(torch.equal(model.state_dict()[k], v) for k, v in snap["model"].items())
    figures = tmp_path / "figures"
    proc = run_in_process("plot_conv1_filters.py", ["--checkpoint", str(first), "--figures-dir", str(figures)])
    assert proc.returncode == 0, proc.stderr
    assert (figures / "conv1_filters_rgb.png").is_file()
    proc = run_in_process("plot_learning_progress.py", ["--checkpoint", str(snapshots.path(ckpt, 1)),
                                                        "--figures-dir", str(figures)])
    assert proc.returncode == 0, proc.stderr
    proc = run_in_process("train.py", ["--checkpoint", str(first), "--resume"])
    assert_one_line_error(proc, "is a snapshot", "run.pt")
    with pytest.raises(utils.UserError, match="not a snapshot"):
        snapshots.read(ckpt)
