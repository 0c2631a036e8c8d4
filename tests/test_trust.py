"""The trust table (visualize/trust.py, plot_trust.py): each column against an independent computation
on a small network, the baselines' known answers, the verdicts, and every flag's range."""
import json

import pytest
import torch

import data
from conftest import assert_one_line_error, run_in_process
from model import ResNet
from visualize import faithfulness, sanity, trust


def small_network(seed=0):
    torch.manual_seed(seed)
    model = ResNet(4).double().eval()  # float64: rank ties of the maps do not hang on rounding
    with torch.no_grad():  # BN statistics unlike a fresh network's, so re-initialising changes the maps
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
    return model


def saliency_rho(model, other_model, images, targets, other_targets):
    """The mean Spearman rho of sum_c |dy/dx| of two networks or targets, by plain autograd, image by image."""
    x = data.normalize(images).double()
    rhos = []
    for i in range(len(x)):
        maps = []
        for network, target in ((model, targets[i]), (other_model, other_targets[i])):
            xi = x[i:i + 1].clone().requires_grad_(True)
            network(xi)[0, target].backward()
            maps.append(xi.grad.abs().sum(1))
        rhos.append(sanity.spearman(*maps))
    return sum(rhos) / len(rhos)


@pytest.fixture(scope="module")
def table():
    model = small_network()
    images, labels = data.make_synthetic_images(6, seed=1)
    values = trust.class_map_trust(model, images, labels, seed=3, step=25, names=("saliency", "Grad-CAM conv4_x"))
    return model, images, labels, values


def test_the_weight_and_class_columns_equal_the_spearman_of_independently_drawn_gradients(table, one_thread):
    model, images, labels, values = table
    top = sanity.reinitialised(model, ["conv5_x"], 3)
    everything = sanity.reinitialised(model, sanity.cascade_depths("conv5_x"), 3)
    others = trust.random_other_classes(labels, 10, 3)
    assert values["saliency"]["weights: top"] == pytest.approx(saliency_rho(model, top, images, labels, labels), abs=1e-6)
    assert values["saliency"]["weights: all"] == pytest.approx(
        saliency_rho(model, everything, images, labels, labels), abs=1e-6)
    assert values["saliency"]["class"] == pytest.approx(saliency_rho(model, model, images, labels, others), abs=1e-6)


def test_the_baselines_depend_on_nothing_and_their_faithfulness_is_measured_like_a_maps(table):
    model, images, labels, values = table
    for name in trust.BASELINES:
        assert [values[name][c] for c in ("weights: top", "weights: all", "class")] == [1.0, 1.0, 1.0]
    edge = faithfulness.edge_map(images)
    assert values["Sobel edge map"]["deletion AUC"] == pytest.approx(
        faithfulness.deletion(model, images, labels, edge, 25, 3).mean_auc)
    assert values["random map"]["ROAD LeRF"] == pytest.approx(
        faithfulness.road(model, images, labels, faithfulness.random_map(6, 3), "LeRF", seed=3).mean)


def test_a_random_other_class_is_never_the_target_and_reaches_every_other_class():
    targets = torch.arange(10).repeat(100)
    others = trust.random_other_classes(targets, 10, 0)
    assert not (others == targets).any()
    assert all(len(set(others[targets == c].tolist())) == 9 for c in range(10))


def test_verdicts_compare_the_road_gap_with_both_baselines_and_count_a_constant_map_as_changed():
    base = {"deletion AUC": 0.5, "insertion AUC": 0.5, "ROAD MoRF": 0.6, "ROAD LeRF": 0.7}
    good = {"weights: top": 0.2, "weights: all": float("nan"), "class": 0.3, "deletion AUC": 0.9,
            "insertion AUC": 0.1, "ROAD MoRF": 0.3, "ROAD LeRF": 0.9}
    rows = {"random map": trust.TrustRow("baseline", dict(base)),
            "Sobel edge map": trust.TrustRow("baseline", {**base, "ROAD MoRF": 0.2}),
            "good": trust.TrustRow("class map", dict(good)),
            "close": trust.TrustRow("class map", {**good, "class": 0.5, "ROAD MoRF": 0.45}),
            "guided": trust.TrustRow("unit picture", {"weights: top": 0.91, "weights: all": 0.4})}
    rows = trust.verdicts(rows)
    assert rows["good"].passes == {"weights": True, "class": True, "faithful": True}  # gap 0.6 > 0.1, 0.5
    assert rows["close"].passes == {"weights": True, "class": False, "faithful": False}  # gap 0.45: narrower than the edge map's
    assert rows["guided"].passes == {"weights": False}
    assert rows["random map"].passes == {}


@pytest.fixture(scope="module")
def tiny_checkpoint(small_data_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("trust") / "tiny.pt"
    proc = run_in_process("train.py", ["--data-dir", str(small_data_dir), "--width", "4", "--batch-size", "64",
                                       "--iterations", "2", "--checkpoint", str(path),
                                       "--figures-dir", str(path.parent / "figures")])
    assert proc.returncode == 0, proc.stderr
    return path


@pytest.mark.parametrize("args, words", [
    (["--target", "bag"], ["--target 'bag'", "predicted, true"]),
    (["--step", "0"], ["--step 0", "above 0 and at most 100"]),
    (["--step", "120"], ["--step 120", "above 0 and at most 100"]),
    (["--noise", "-0.1"], ["--noise -0.1", "0 or above"]),
    (["--count", "0"], ["--count 0", "at least 1"]),
    (["--count", "513"], ["--count 513", "512 images", "1..512"]),
    (["--seed", "-1"], ["--seed -1", "0.."]),
    (["--images", "4531-4546"], ["4531", "0..511"]),
])
def test_every_flag_out_of_range_gets_one_line_naming_the_valid_values(tiny_checkpoint, tmp_path, args, words):
    proc = run_in_process("plot_trust.py", ["--checkpoint", str(tiny_checkpoint), "--figures-dir", str(tmp_path),
                                            "--images", "0-3", *args])  # the split has 512 images
    assert proc.returncode == 2
    assert_one_line_error(proc, *words)
    assert not list(tmp_path.iterdir())


def test_the_script_writes_the_table_and_its_json(tiny_checkpoint, tmp_path, one_thread):
    proc = run_in_process("plot_trust.py", ["--checkpoint", str(tiny_checkpoint), "--figures-dir", str(tmp_path),
                                            "--count", "2", "--step", "50", "--images", "0-1"])
    assert proc.returncode == 0, proc.stderr
    name = "trust_images0-1_count2_step50"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.json", f"{name}.png"]
    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert record["count"] == 2 and record["step_percent"] == 50 and record["unit"]["images"] == [0, 1]
    assert set(record["rows"]) == {*sanity.TECHNIQUES, *trust.CLASS_MAP_NAMES, *trust.BASELINES}
    assert "class" not in record["rows"]["guided"] and "deletion AUC" in record["rows"]["occlusion"]
