"""The trust table (visualize/trust.py, plot_trust.py): each column against an independent computation
on a small network, the baselines' known answers, the verdicts, and every flag's range."""
import json

import pytest
import torch

import cifar10

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
    images, labels = cifar10.make_synthetic_images(6, seed=1)
    names = ("saliency", "Grad-CAM conv4_x")
    dependence, cascades = trust.class_map_dependence(model, images, labels, seed=3, names=names)
    faithful = trust.class_map_faithfulness(model, images, labels, seed=3, step=25, names=names)
    return model, images, labels, dependence, cascades, faithful


def mean(values):
    return trust.summary(values)[0]


def test_the_weight_and_class_columns_equal_the_spearman_of_independently_drawn_gradients(table, one_thread):
    model, images, labels, dependence, cascades, _ = table
    fresh = sanity.fresh_network(model, 3)
    others = trust.random_other_classes(labels, 10, 3)
    saliency = dependence["saliency"]
    assert mean(saliency["class"]) == pytest.approx(saliency_rho(model, model, images, labels, others), abs=1e-6)
    # every depth of the cascade, from conv5_x alone down to every stage; top and all are its ends
    assert len(cascades["saliency"]) == len(trust.DEPTHS) == 5
    for depth, rho in enumerate(cascades["saliency"], start=1):
        network = sanity.reinitialised(model, sanity.cascade_depths("conv5_x")[:depth], 3, fresh)
        assert rho == pytest.approx(saliency_rho(model, network, images, labels, labels), abs=1e-6)
    assert mean(saliency["weights: top"]) == pytest.approx(cascades["saliency"][0], abs=1e-12)
    assert mean(saliency["weights: all"]) == pytest.approx(cascades["saliency"][-1], abs=1e-12)


def test_the_baselines_depend_on_nothing_and_their_faithfulness_is_measured_like_a_maps(table):
    model, images, labels, dependence, _, faithful = table
    for name in trust.BASELINES:
        assert [mean(dependence[name][c]) for c in trust.DEPENDENCE] == [1.0, 1.0, 1.0]
    edge = faithfulness.edge_map(images)
    deletion = faithfulness.deletion(model, images, labels, edge, 25, 3)
    assert torch.allclose(faithful["Sobel edge map"]["deletion AUC"], deletion.auc)
    road = faithfulness.road(model, images, labels, faithfulness.random_map(6, 3), "LeRF", seed=3)
    assert mean(faithful["random map"]["ROAD LeRF"]) == pytest.approx(road.mean)
    assert faithful["random map"]["ROAD LeRF"].tolist() == road.correct.double().mean(1).tolist()


def test_the_standard_error_is_the_sample_deviation_over_root_n_of_the_defined_values():
    values = torch.tensor([0.1, 0.4, float("nan"), 0.7, 0.2], dtype=torch.float64)
    defined = [0.1, 0.4, 0.7, 0.2]
    m = sum(defined) / 4
    sd = (sum((v - m) ** 2 for v in defined) / 3) ** 0.5
    assert trust.summary(values) == pytest.approx((m, sd / 2))
    one = trust.summary(torch.tensor([0.3], dtype=torch.float64))
    assert one[0] == pytest.approx(0.3) and one[1] != one[1]  # no spread from one value: NaN
    assert all(v != v for v in trust.summary(torch.tensor([float("nan")], dtype=torch.float64)))


def test_a_random_other_class_is_never_the_target_and_reaches_every_other_class():
    targets = torch.arange(10).repeat(100)
    others = trust.random_other_classes(targets, 10, 0)
    assert not (others == targets).any()
    assert all(len(set(others[targets == c].tolist())) == 9 for c in range(10))


def row(kind, **columns):
    return trust.TrustRow(kind, {name.replace("_", " "): torch.tensor(v, dtype=torch.float64)
                                 for name, v in columns.items()})


def faithful_columns(morf, lerf):
    return {"deletion_AUC": [0.5] * len(morf), "insertion_AUC": [0.5] * len(morf), "ROAD_MoRF": morf, "ROAD_LeRF": lerf}


def test_verdicts_are_given_only_two_standard_errors_from_the_line_else_unresolved():
    weights = lambda top, everything: {"weights:_top": top, "weights:_all": everything}
    rows = {"random map": row("baseline", **faithful_columns([0.6, 0.6, 0.6, 0.6], [0.6, 0.6, 0.6, 0.6])),
            "Sobel edge map": row("baseline", **faithful_columns([0.5, 0.5, 0.5, 0.5], [0.6, 0.6, 0.7, 0.6])),
            # gaps 0.6 against 0, 0.125: far above both, tight; rho far below 0.5 (a redrawn map gone constant is 0)
            "good": row("class map", **weights([0.1, 0.2, 0.1, 0.2], [0.0] * 4), **{"class": [0.2, 0.3, 0.2, 0.3]},
                        **faithful_columns([0.2, 0.2, 0.3, 0.3], [0.8, 0.8, 0.9, 0.9])),
            # rho 0.45 +- 0.15 straddles 0.5; the gap beats the random map's but by less than its spread
            "close": row("class map", **weights([0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]),
                         **{"class": [0.2, 0.8, 0.2, 0.6]}, **faithful_columns([0.6, 0.3, 0.6, 0.6], [0.6, 0.9, 0.6, 0.6])),
            # rho 0.9 with no spread: fails however few images; the gap is the random map's exactly
            "guided": row("unit picture", **weights([0.9, 0.9], [0.2, 0.2])),
            # every trained map constant (a unit silent on every image): nothing to measure
            "silent": row("unit picture", **weights([float("nan")] * 2, [float("nan")] * 2)),
            "same": row("class map", **weights([0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]), **{"class": [0.9] * 4},
                        **faithful_columns([0.6] * 4, [0.6] * 4))}
    rows = trust.verdicts(rows)
    assert rows["good"].passes == {"weights": "pass", "class": "pass", "faithful": "pass"}
    assert rows["close"].passes == {"weights": "pass", "class": "unresolved", "faithful": "unresolved"}
    assert rows["guided"].passes == {"weights": "fail"}
    assert rows["silent"].passes == {"weights": "unresolved"}
    one = {"random map": row("baseline", **faithful_columns([0.6], [0.6])),
           "Sobel edge map": row("baseline", **faithful_columns([0.5], [0.6])),
           "good": row("class map", **weights([0.1], [0.1]), **faithful_columns([0.1], [0.9]))}
    assert trust.verdicts(one)["good"].passes["faithful"] == "unresolved"  # one image: no spread
    assert rows["same"].passes == {"weights": "pass", "class": "fail", "faithful": "fail"}
    assert rows["random map"].passes == {}


def test_the_randomisation_starts_from_the_class_evidence_figures_maps(tiny_checkpoint, one_thread):
    """plot_class_evidence.py's maps of the report's images and the trust table's trained maps are one
    computation (context.class_maps), and equal attribute's own."""
    from visualize import context, evidence
    from visualize.attribution import attribute
    run = context.load_run(str(tiny_checkpoint), torch.device("cpu"))
    indices = [3, 5, 8]
    targets = trust.predicted_or_true(run, indices, "predicted")
    drawn = evidence.class_evidence(run, indices, targets, [("smoothgrad", None)], {"n": 50, "sigma": 0.15, "seed": 0})
    again = context.class_maps(run, indices, targets, "smoothgrad")
    assert again is drawn["smoothgrad"]
    assert torch.equal(again, attribute(run.model, run.images[indices], targets, "smoothgrad").float())


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
    (["--step-percent", "0"], ["--step-percent 0", "above 0 and at most 100"]),
    (["--step-percent", "120"], ["--step-percent 120", "above 0 and at most 100"]),
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


def test_the_default_count_is_a_few_hundred_or_a_smaller_splits_whole():
    assert trust.default_count(10_000) == trust.COUNT == 256
    assert trust.default_count(100) == 100
    assert trust.table_suffix(100, "predicted", 0, 5, 0.01, trust.UNIT_IMAGES, 100) == ""
    assert trust.table_suffix(100, "predicted", 0, 5, 0.01, trust.UNIT_IMAGES, 512) == "_count100"
    # a quick run's defaults are its own: few images, and its name says it is the quick run
    assert trust.default_count(10_000, quick=True) == trust.QUICK_COUNT < trust.COUNT
    assert trust.table_suffix(trust.QUICK_COUNT, "predicted", 0, 5, 0.01, list(range(4531, 4535)), 10_000,
                              quick=True) == "_quick"
    assert trust.table_suffix(trust.COUNT, "predicted", 0, 5, 0.01, trust.UNIT_IMAGES, 10_000,
                              quick=True) == "_images4531-4546_count256_quick"


def test_the_script_writes_the_table_and_its_json(tiny_checkpoint, tmp_path, one_thread):
    proc = run_in_process("plot_trust.py", ["--checkpoint", str(tiny_checkpoint), "--figures-dir", str(tmp_path),
                                            "--count", "2", "--step-percent", "50", "--images", "0-1"])
    assert proc.returncode == 0, proc.stderr
    name = "trust_images0-1_count2_step50"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.json", f"{name}.png"]
    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert record["count"] == 2 and record["step_percent"] == 50 and record["unit"]["images"] == [0, 1]
    assert set(record["rows"]) == {*sanity.TECHNIQUES, *trust.CLASS_MAP_NAMES, *trust.BASELINES}
    assert "class" not in record["rows"]["guided"] and "deletion AUC" in record["rows"]["occlusion"]
    occlusion = record["rows"]["occlusion"]
    assert "deletion AUC SE" in occlusion and len(occlusion["cascade"]) == len(record["depths"]) == 5
    assert all(verdict in trust.VERDICTS for row in record["rows"].values() for verdict in row["passes"].values())
