"""The sanity checks (visualize/sanity.py, plot_sanity_checks.py): the rank correlation, the cascading
re-initialisation, and what the figure's JSON says on a trained network."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import cifar10

import data
from conftest import assert_one_line_error, run_script
from model import METHODS, ResNet
from visualize import sanity
from visualize.ascent import gradient_ascent
from visualize.context import load_run
from visualize.featurevis import FV_LR, colour_statistics, feature_visualization


def reference_ranks(values):
    """rank(v_i) = #{j: v_j < v_i} + (#{j: v_j = v_i} + 1) / 2, pair by pair."""
    v = np.asarray(values, dtype=np.float64).ravel()
    return np.array([(v < x).sum() + ((v == x).sum() + 1) / 2 for x in v])


def reference_spearman(a, b):
    return np.corrcoef(reference_ranks(a), reference_ranks(b))[0, 1]


@pytest.mark.parametrize("seed", range(4))
def test_spearman_equals_pearson_of_average_ranks_with_ties(seed):
    generator = torch.Generator().manual_seed(seed)
    # few distinct values: most entries are tied; and a 2-D map, as the pictures are
    a = torch.randint(0, 5, (12, 9), generator=generator).float()
    b = a + torch.randint(0, 3, (12, 9), generator=generator).float()
    np.testing.assert_allclose(sanity.average_ranks(a).numpy(), reference_ranks(a))
    assert sanity.average_ranks(a).sum().item() == pytest.approx(a.numel() * (a.numel() + 1) / 2)
    rho = sanity.spearman(a, b)
    assert rho == pytest.approx(reference_spearman(a, b), abs=1e-12)
    try:
        from scipy.stats import spearmanr  # not in requirements.txt: an extra check where it is installed
    except ImportError:
        return
    assert rho == pytest.approx(spearmanr(a.ravel().numpy(), b.ravel().numpy()).statistic, abs=1e-12)


def test_spearman_is_one_for_a_monotone_map_minus_one_reversed_and_nan_for_a_constant():
    a = torch.randn(200, generator=torch.Generator().manual_seed(0))
    assert sanity.spearman(a, a) == 1.0  # exactly: the trained column of the JSON
    assert sanity.spearman(a, torch.exp(3 * a)) == pytest.approx(1.0)
    assert sanity.spearman(a, -a) == pytest.approx(-1.0)
    assert math.isnan(sanity.spearman(a, torch.zeros(200)))
    assert math.isnan(sanity.spearman(torch.full((200,), 2.0), a))


def trained_like(width=4, seed=0):
    """A network whose every parameter and BN statistic differs from a fresh one's, as a trained one's."""
    torch.manual_seed(seed + 100)
    model = ResNet(width)
    with torch.no_grad():
        for tensor in [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]:
            tensor.add_(torch.rand_like(tensor) + 0.1)
    return model.eval()


def test_a_silent_trained_picture_is_left_out_and_a_redrawn_picture_gone_constant_kept_nothing():
    g = torch.Generator().manual_seed(2)
    trained, redrawn = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    trained[1] = 0   # the unit silent on start 1: no ranking to keep
    redrawn[2] = 0   # the re-initialised unit silent on start 2, where the trained one fired
    rho = sanity.similarities(redrawn, trained)
    assert rho[0].item() == pytest.approx(sanity.spearman(redrawn[0].abs().sum(0), trained[0].abs().sum(0)))
    assert math.isnan(rho[1].item()) and rho[2].item() == 0.0
    assert sanity.defined_mean(rho) == pytest.approx(rho[0].item() / 2)


def test_reinitialised_stages_are_a_freshly_built_networks_and_nothing_else_changes():
    model = trained_like()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    stages = sanity.cascade_depths("conv4_x")[:2]
    assert stages == ["conv4_x", "conv3_x"]
    randomised = sanity.reinitialised(model, stages, seed=7)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the caller's random state is as it was
    torch.manual_seed(7)
    fresh = ResNet(4).state_dict()
    for name, value in randomised.state_dict().items():
        source = fresh if name.split(".")[0] in stages else before
        assert torch.equal(value, source[name]), name
    # the BatchNorms are as a freshly built network's: weight 1, bias 0, running mean 0, variance 1
    for bn in (m for name in stages for m in randomised.stage(name).modules() if isinstance(m, nn.BatchNorm2d)):
        assert (bn.weight == 1).all() and (bn.bias == 0).all()
        assert (bn.running_mean == 0).all() and (bn.running_var == 1).all() and bn.num_batches_tracked == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the original untouched
    assert not randomised.training
    # another seed, other weights
    other = sanity.reinitialised(model, stages, seed=8)
    assert not torch.equal(other.conv4_x.block1.trunk.conv1.weight, randomised.conv4_x.block1.trunk.conv1.weight)


@pytest.fixture(scope="module")
def trained_run(trained_checkpoint):
    return load_run(trained_checkpoint, torch.device("cpu"))


def small_checks(run, seed, layer="conv5_x", channel=1, images=(4531, 4532, 4533)):
    colour = colour_statistics(cifar10.dataset_root(run.data_dir, run.trained_on_synthetic))
    x = data.normalize(run.images[list(images)])
    return sanity.sanity_checks(run.model, x, layer, channel, colour, seed=seed, fv_steps=8, pattern_steps=8)


def test_json_has_one_number_per_technique_and_depth_and_the_trained_column_is_one(trained_run, tmp_path,
                                                                                   one_thread):
    before = {k: v.clone() for k, v in trained_run.model.state_dict().items()}
    png, path = sanity.plot_sanity_checks(trained_run, "conv4_x", 2, [4531, 4540], tmp_path, seed=3,
                                          fv_steps=4, pattern_steps=4)
    assert png == tmp_path / "sanity_conv4_x_channel2.png" and png.stat().st_size > 0
    assert path == tmp_path / "sanity_conv4_x_channel2.json"
    record = json.loads(path.read_text())
    assert set(record) == {"layer", "channel", "images", "depths", "seed", "similarity"}
    assert (record["layer"], record["channel"], record["images"], record["seed"]) == ("conv4_x", 2, [4531, 4540], 3)
    assert record["depths"] == ["trained", "conv4_x", "conv3_x", "conv2_x", "conv1"]
    assert list(record["similarity"]) == list(sanity.TECHNIQUES)
    for name, values in record["similarity"].items():
        assert len(values) == len(record["depths"]), name
        assert values[0] == 1.0, name
        assert all(v is None or -1 <= v <= 1 for v in values), name
    # the loaded network, shared by plot_all.py's scripts, is as it was
    assert all(torch.equal(v, before[k]) for k, v in trained_run.model.state_dict().items())


def test_the_same_seed_gives_the_same_numbers_and_another_seed_other_ones(trained_run, one_thread):
    first, again, other = (small_checks(trained_run, seed) for seed in (0, 0, 1))
    assert first.similarity == again.similarity
    for name in sanity.TECHNIQUES:
        assert all(torch.equal(a, b) for a, b in zip(first.pictures[name], again.pictures[name])), name
    # the re-initialisation is the seed's: the randomised columns differ
    assert first.similarity["gradient"][1:] != other.similarity["gradient"][1:]


def test_the_plain_gradient_changes_with_the_units_own_stage_guided_backpropagation_barely(trained_run, one_thread):
    similarity = small_checks(trained_run, seed=0).similarity
    gradient, guided = similarity["gradient"], similarity["guided"]
    # Adebayo et al.'s finding: the gradient depends on the weights, guided backpropagation hardly on
    # those of the top stage (on this network: ~0.45 against ~0.97, over seeds and image sets)
    assert gradient[1] < guided[1] - 0.2
    assert gradient[-1] < 0.6  # with every stage up to the unit's random, little of the gradient is left
    assert all(not math.isnan(v) for v in gradient + guided)  # the unit fires on these images at every depth


def test_help_shows_the_defaults_and_a_bad_seed_is_one_line(trained_checkpoint, tmp_path):
    proc = run_script("plot_sanity_checks.py", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for default in ("--layer LAYER", "(default: conv5_x)", "(default: 1)", "(default: 4531-4546)", "(default: 0)"):
        assert default in text, default
    assert_one_line_error(run_script("plot_sanity_checks.py", "--checkpoint", trained_checkpoint, "--figures-dir",
                                     tmp_path, "--seed", "-1"), "--seed -1", "0..")
    assert not any(tmp_path.iterdir())


def one_depth_at_a_time(model, x, layer, channel, colour, seed, fv_steps, pattern_steps):
    """The cascade's pictures as first computed: each depth's network built (reinitialised) and drawn
    on its own, {technique: [r at each depth]}."""
    fv_start = feature_visualization(model, layer, [channel], colour, steps=0, seed=seed)[0]
    stages = sanity.cascade_depths(layer)
    pictures = {name: [] for name in sanity.TECHNIQUES}
    for k in range(len(stages) + 1):
        network = model if k == 0 else sanity.reinitialised(model, stages[:k], seed)
        for method in METHODS:
            pictures[method].append(network.reconstruct(x, layer, channel, path="both", method=method))
        fv = feature_visualization(network, layer, [channel], colour, steps=fv_steps, lr=FV_LR, seed=seed)[0]
        pictures["feature visualization"].append(fv - fv_start)
        pattern = gradient_ascent(network, x, layer, channel, steps=pattern_steps)
        pictures["gradient pattern"].append(data.denormalize(pattern) - data.denormalize(x))
    return pictures


@pytest.mark.parametrize("layer, channel", [("conv5_x", 1), ("conv3_x", 2)])
def test_the_depths_drawn_in_one_batch_are_each_depths_network_drawn_alone(trained_run, layer, channel, one_thread):
    """sanity_checks draws the optimisations of every depth in one batch (sanity.Cascade): the same
    pictures and similarities as building each depth's network and drawing it alone."""
    colour = colour_statistics(cifar10.dataset_root(trained_run.data_dir, trained_run.trained_on_synthetic))
    x = data.normalize(trained_run.images[[4531, 4532, 4533, 4540]])
    # few feature-visualization steps: from a re-initialised stage on, its rounding differences (a
    # ReLU gate that the summation order opens or shuts) grow step by step, as they do between thread
    # counts (docs/figures.md); 4 steps pin that each depth's copy has its own network, start and
    # transforms, which a mix-up would miss by far more than the tolerance
    settings = dict(seed=5, fv_steps=4, pattern_steps=12)
    checks = sanity.sanity_checks(trained_run.model, x, layer, channel, colour, **settings)
    alone = one_depth_at_a_time(trained_run.model, x, layer, channel, colour, **settings)
    assert checks.depths == ["trained", *sanity.cascade_depths(layer)]
    for name in sanity.TECHNIQUES:
        assert len(checks.pictures[name]) == len(alone[name]) == len(checks.depths), name
        for depth, batched, single in zip(checks.depths, checks.pictures[name], alone[name]):
            # equal up to summation order (batches of other sizes), relative to the picture's scale
            scale = single.abs().max().item()
            torch.testing.assert_close(batched, single, rtol=0, atol=1e-4 * scale + 1e-7, msg=f"{name} at {depth}")
    reference = sanity.similarity_of(checks.depths, alone)
    for name in sanity.TECHNIQUES:
        np.testing.assert_allclose(checks.similarity[name], reference.similarity[name], atol=1e-3, err_msg=name)
    # the randomised columns are other networks' pictures, not copies of the trained one
    assert not torch.allclose(checks.pictures["gradient pattern"][1], checks.pictures["gradient pattern"][0])
