"""Learning dynamics: linear CKA and the linear probe against known answers, the feature evolution's tiles
against the unit atlas, and both scripts end to end on a run's snapshots."""
import json
import math

import numpy as np
import pytest
import torch

import snapshots
from conftest import assert_one_line_error, run_in_process
from data import normalize
from model import STAGES
from test_train import train_small
from visualize import atlas, dynamics, evolution
from visualize.context import load_run, load_snapshots
from visualize.scoring import stage_output


# --------------------------------------------------------------------------- linear CKA

def hsic_cka(x, y):
    """The reference: CKA as normalised centred HSIC of the plain Gram matrices, tr(K H L H) / (n - 1)^2."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    n = len(x)
    h = torch.eye(n, dtype=torch.float64) - 1 / n
    hsic = lambda k, l: torch.trace(k @ h @ l @ h) / (n - 1) ** 2
    k, l = x @ x.T, y @ y.T
    return (hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l))).item()


def feature_cka(x, y):
    """The reference in feature space: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), columns centred."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    x, y = x - x.mean(0), y - y.mean(0)
    return ((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())).item()


def test_cka_of_a_representation_with_itself_is_one_and_its_gram_form_is_centred_hsic():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 4, 4, generator=g) + 5  # an offset: the centring matters
    y = torch.randn(40, 30, generator=g) + x.flatten(1)[:, :30] * 0.5
    assert dynamics.linear_cka(x, x) == pytest.approx(1, abs=1e-12)
    assert dynamics.linear_cka(x, y) == pytest.approx(hsic_cka(x, y), abs=1e-6)
    assert dynamics.linear_cka(x, y) == pytest.approx(feature_cka(x, y), abs=1e-6)
    assert 0 < dynamics.linear_cka(x, y) < 1


def test_cka_is_unchanged_by_an_orthogonal_map_and_an_isotropic_scale():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 20, generator=g, dtype=torch.float64), torch.randn(50, 12, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    base = dynamics.linear_cka(x, y)
    assert dynamics.linear_cka(x @ q, y) == pytest.approx(base, abs=1e-12)
    assert dynamics.linear_cka(7.5 * x, y) == pytest.approx(base, abs=1e-12)
    assert dynamics.linear_cka(x @ q * 0.01, x) == pytest.approx(1, abs=1e-12)


def test_cka_of_one_feature_each_is_their_squared_correlation():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(100, 1, generator=g, dtype=torch.float64)
    b = a + torch.randn(100, 1, generator=g, dtype=torch.float64)
    r = np.corrcoef(a[:, 0].numpy(), b[:, 0].numpy())[0, 1]
    assert dynamics.linear_cka(a, b) == pytest.approx(r ** 2, abs=1e-12)
    assert math.isnan(dynamics.linear_cka(torch.ones(10, 3), a[:10]))  # a constant (silent) stage


def test_a_stage_converges_from_the_first_epoch_it_stays_at_or_above_the_threshold():
    epochs = [0, 1, 2, 5, 10]
    assert dynamics.converged_epoch(epochs, [0.5, 0.95, 0.85, 0.92, 1.0], 0.9) == 5
    assert dynamics.converged_epoch(epochs, [0.9, 0.95, 0.91, 0.92, 1.0], 0.9) == 0
    assert dynamics.converged_epoch(epochs, [0.9, math.nan, 0.91, 0.92, 1.0], 0.9) == 2
    assert dynamics.converged_epoch(epochs, [0.9, 0.95, 0.91, 0.92, 0.8], 0.9) is None


# --------------------------------------------------------------------------- the linear probe

def test_the_probe_reads_a_linear_code_of_the_label_and_nothing_from_shuffled_labels():
    g = torch.Generator().manual_seed(3)
    classes, n = 10, 1000
    labels = torch.randint(0, classes, (2 * n,), generator=g)
    mixing = torch.randn(classes, 16, generator=g)
    features = torch.nn.functional.one_hot(labels, classes).double() @ mixing.double() \
        + 0.05 * torch.randn(2 * n, 16, generator=g, dtype=torch.float64)
    assert dynamics.probe_accuracy(features[:n], labels[:n], features[n:], labels[n:], classes) >= 0.99
    shuffled = labels[torch.randperm(2 * n, generator=g)]
    chance = dynamics.probe_accuracy(features[:n], shuffled[:n], features[n:], shuffled[n:], classes)
    assert abs(chance - 1 / classes) < 0.04  # 4 standard errors of a fraction of 1,000 at 0.1


# --------------------------------------------------------------------------- on a run's snapshots

@pytest.fixture(scope="module")
def snapshot_run(small_data_dir, tmp_path_factory):
    """A width-4 run of 2 epochs on the small data, with its default snapshots: epochs 0, 1 and 2."""
    ckpt = tmp_path_factory.mktemp("snapshots") / "run.pt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_small(small_data_dir, ckpt, "--epochs", 2, figures=False)
    finally:
        torch.set_num_threads(threads)
    assert list(snapshots.find(ckpt)) == [0, 1, 2]
    return ckpt


def test_a_tile_is_the_atlas_top1_of_the_unit_drawn_from_that_snapshot(snapshot_run, one_thread):
    device = torch.device("cpu")
    runs = load_snapshots(snapshot_run, device)
    channels = {"conv2_x": [0, 3], "conv4_x": [1]}
    grid = evolution.feature_evolution(runs, channels)
    for (epoch, run, units), (_, path) in zip(grid, snapshots.find(snapshot_run).items()):
        alone = load_run(path, device)  # that snapshot loaded as any plot script loads a checkpoint
        assert torch.equal(alone.model.fc.weight, run.model.fc.weight)
        atlas_units = atlas.unit_atlas(alone, channels, k=1, ablation_images=8)
        for layer, layer_channels in channels.items():
            with torch.inference_mode():
                out = stage_output(alone.model, normalize(alone.images), layer)  # the whole test split at once
            for unit, atlas_unit, channel in zip(units[layer], atlas_units[layer], layer_channels):
                assert unit["top"] == atlas_unit["top"]
                peak = out[:, channel].flatten(1).amax(1)
                assert unit["top"][0]["image"] == int(peak.argmax())  # the largest single activation of the split
                assert unit["top"][0]["activation"] == pytest.approx(peak.max().item(), rel=1e-5)
                np.testing.assert_array_equal(atlas.unit_block(run, layer, unit),
                                              atlas.unit_block(alone, layer, dict(atlas_unit, top=atlas_unit["top"])))
    # the snapshots differ: epoch 0's network is not epoch 2's
    assert not torch.equal(runs[0][1].model.fc.weight, runs[-1][1].model.fc.weight)


def test_both_scripts_draw_from_the_snapshots_and_plot_all_draws_them(snapshot_run, tmp_path, monkeypatch, one_thread):
    figures = tmp_path / "figures"
    proc = run_in_process("plot_feature_evolution.py", ["--checkpoint", str(snapshot_run), "--figures-dir", str(figures),
                                                        "--layer", "conv2_x,conv5_x", "--channels", "0-2"])
    assert proc.returncode == 0, proc.stderr
    record = json.loads((figures / "evolution_conv5_x_channels0-2.json").read_text())
    assert record["figure"]["kind"] == "feature_evolution" and record["figure"]["changed"]["--channels"] == "0-2"
    assert record["epochs"] == [0, 1, 2] and [u["channel"] for u in record["units"]] == [0, 1, 2]
    assert [tile["iteration"] for tile in record["units"][0]["tiles"]] == [0, 16, 32]
    assert (figures / "evolution_conv2_x_channels0-2.png").is_file()

    import plot_all
    monkeypatch.setattr(plot_all, "SCRIPTS", ("plot_conv1_filters",))
    proc = run_in_process("plot_all.py", ["--checkpoint", str(snapshot_run), "--figures-dir", str(figures)])
    assert proc.returncode == 0, proc.stderr
    assert "plot_learning_dynamics.py: 2 files" in proc.stdout and "CKA to the last" in proc.stdout
    names = {p.name for p in figures.iterdir()}
    assert {"dynamics.png", "dynamics.json", "evolution_conv2_x.png", "evolution_conv5_x.json"} <= names
    page = (figures / "index.html").read_text(encoding="utf-8")
    assert 'id="training"' in page and "evolution_conv2_x.png" in page.split('id="training"')[1].split("</section>")[0]

    record = json.loads((figures / "dynamics.json").read_text())
    assert record["figure"]["kind"] == "learning_dynamics"
    assert record["figure"]["command"].startswith("python plot_learning_dynamics.py")  # run by plot_all.py
    # the defaults, cut to the small data's 512 test and 1,024 training images
    assert record["epochs"] == [0, 1, 2] and record["images"] == 512 and record["count"] == 64
    assert record["probe_images"] == 1024
    last = torch.load(snapshots.path(snapshot_run, 2), weights_only=True)
    assert record["test_acc"][-1] == last["test_acc"]
    for layer in STAGES:
        stage = record["stages"][layer]
        assert stage["cka"][-1] == pytest.approx(1)  # the last snapshot against itself
        assert stage["converged_epoch"] == dynamics.converged_epoch(record["epochs"], stage["cka"], 0.9)
        assert all(0 <= a <= 1 for a in stage["probe_accuracy"]) and all(0 <= s <= 1 for s in stage["selectivity"])
    # CKA of the first snapshot, measured here from its own stage outputs on the first 512 test images
    run0, run2 = (load_run(snapshots.path(snapshot_run, e), torch.device("cpu")) for e in (0, 2))
    with torch.inference_mode():
        x0, x2 = (stage_output(r.model, normalize(r.images), "conv3_x") for r in (run0, run2))
    assert record["stages"]["conv3_x"]["cka"][0] == pytest.approx(feature_cka(x0, x2), abs=1e-5)
    for name in ("Grad-CAM conv4_x", "saliency"):
        assert len(record["evidence"][name]["ROAD gap"]) == 3


def test_without_snapshots_the_scripts_say_so_in_one_line(snapshot_run, tmp_path):
    alone = tmp_path / "alone.pt"  # the run's checkpoint, without its snapshots beside it
    alone.write_bytes(snapshot_run.read_bytes())
    for script in ("plot_feature_evolution.py", "plot_learning_dynamics.py"):
        proc = run_in_process(script, ["--checkpoint", str(alone), "--figures-dir", str(tmp_path / "figures")])
        assert_one_line_error(proc, "has no snapshots", "--snapshots")


def test_the_quick_run_is_the_full_computation_on_fewer_images_and_says_so(snapshot_run, tmp_path, monkeypatch,
                                                                           one_thread):
    figures = tmp_path / "figures"
    common = ["--checkpoint", str(snapshot_run), "--figures-dir", str(figures)]
    import plot_all
    monkeypatch.setattr(plot_all, "SCRIPTS", ("plot_conv1_filters",))
    assert run_in_process("plot_all.py", common + ["--quick"]).returncode == 0  # runs both with --quick
    sizes = ["--images", str(dynamics.QUICK_IMAGES), "--probe-images", str(dynamics.QUICK_PROBE_IMAGES),
             "--count", str(dynamics.QUICK_COUNT)]
    assert run_in_process("plot_learning_dynamics.py", common + sizes).returncode == 0
    quick = json.loads((figures / "dynamics_quick.json").read_text())
    full = json.loads((figures / "dynamics_images250_probe1000_count16.json").read_text())
    assert (quick["images"], quick["probe_images"], quick["count"]) == (250, 1000, 16)
    assert quick["figure"]["flags"]["--quick"] is True and "--images" not in quick["figure"]["changed"]
    assert quick["stages"] == full["stages"] and quick["evidence"] == full["evidence"]  # the split is 512 < 2,000
    evolution_quick = json.loads((figures / "evolution_conv2_x_quick.json").read_text())
    assert evolution_quick["figure"]["flags"]["--quick"] is True and evolution_quick["images"] == 512
    page = (figures / "index.html").read_text(encoding="utf-8")
    assert "The quick run, a first look: the CKA on 250 test images" in page
    assert "The quick run, a first look: the strongest activations over the first 512 test images" in page


def test_a_quick_tile_is_the_strongest_activation_over_the_first_images_only(snapshot_run, one_thread):
    run = load_snapshots(snapshot_run, torch.device("cpu"))[0][1]
    quick = evolution.snapshot_units(run, {"conv3_x": [0, 1, 2]}, count=100)["conv3_x"]
    with torch.inference_mode():
        out = stage_output(run.model, normalize(run.images[:100]), "conv3_x")
    for channel, unit in enumerate(quick):
        peak = out[:, channel].flatten(1).amax(1)
        assert unit["top"][0]["image"] == int(peak.argmax()) < 100
        assert unit["top"][0]["activation"] == pytest.approx(peak.max().item(), rel=1e-5)
