"""Faithfulness (visualize/faithfulness.py): deletion and insertion against their closed form on a model
whose logit is a known linear function of the pixels, ROAD's imputer against its defining equations,
and ROAD with nothing removed against the model's accuracy."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import cifar10

import data
from model import ResNet
from visualize import faithfulness


class LinearLogit(nn.Module):
    """A model with the repo's stage interface (scoring.classify runs it) whose logits are
    (0, <a, x>) for the normalised image x: every stage is the identity and the head is the sum."""

    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(a)

    def stage(self, name):
        return nn.Identity()

    def head(self, x):
        return torch.stack([torch.zeros(len(x)), (self.a * x).flatten(1).sum(1)], 1)


def test_deletion_curve_and_auc_equal_their_closed_form_on_a_linear_logit():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 32, 32), generator=generator, dtype=torch.uint8)
    a = torch.randn(3, 32, 32, generator=generator) * 0.05
    model = LinearLogit(a)
    x = data.normalize(images)
    contributions = a * x  # (N, 3, H, W): the logit is their sum, and deletion (x -> 0) removes them
    curve = faithfulness.deletion(model, images, torch.ones(3, dtype=torch.long), contributions, step=5)

    # closed form: rank the pixels by sum_c |a_c x_c|; after removing the n most relevant, the logit is
    # z - (their contributions), and the target's probability sigmoid of it
    c = contributions.double().numpy()
    counts = [round(min(k * 5, 100) / 100 * 1024) for k in range(21)]
    fractions = np.array(counts) / 1024
    for i in range(3):
        order = np.argsort(-np.abs(c[i]).sum(0).ravel(), kind="stable")
        removed = np.concatenate([[0], np.cumsum(c[i].sum(0).ravel()[order])])
        expected = 1 / (1 + np.exp(-(c[i].sum() - removed[counts])))
        np.testing.assert_allclose(curve.probabilities[i].numpy(), expected, atol=1e-5)
        auc = sum((expected[k] + expected[k + 1]) / 2 * (fractions[k + 1] - fractions[k]) for k in range(20))
        assert curve.auc[i].item() == pytest.approx(auc, abs=1e-5)
    assert curve.fractions == pytest.approx(list(fractions))


def test_insertion_starts_from_the_blurred_image_and_ends_at_the_image():
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=generator, dtype=torch.uint8)
    model = LinearLogit(torch.randn(3, 32, 32, generator=generator) * 0.05)
    targets = torch.ones(2, dtype=torch.long)
    curve = faithfulness.insertion(model, images, targets, faithfulness.random_map(2), step=10)
    x = data.normalize(images)
    ends = faithfulness.target_probabilities(model, torch.cat([faithfulness.gaussian_blur(x), x]), targets.repeat(2))
    np.testing.assert_allclose(curve.probabilities[:, 0].numpy(), ends[:2].numpy(), atol=1e-6)
    np.testing.assert_allclose(curve.probabilities[:, -1].numpy(), ends[2:].numpy(), atol=1e-6)


def test_gaussian_blur_keeps_a_constant_and_the_mean_of_a_periodic_image():
    x = torch.full((1, 3, 32, 32), 0.7)
    assert torch.allclose(faithfulness.gaussian_blur(x), x, atol=1e-6)
    stripes = (torch.arange(32) % 2).float().expand(1, 3, 32, 32)
    inner = faithfulness.gaussian_blur(stripes)[..., 8:-8, 8:-8]
    assert torch.allclose(inner, torch.full_like(inner, 0.5), atol=1e-3)  # sigma 2 averages out 1-px stripes


def test_step_counts_and_the_trapezoid_of_a_constant_curve():
    assert faithfulness.step_counts(1024, 5)[:3] == [0, 51, 102] and faithfulness.step_counts(1024, 5)[-1] == 1024
    assert faithfulness.step_counts(100, 30) == [0, 30, 60, 90, 100]  # the last step is shorter
    fractions = [0, 0.3, 0.6, 0.9, 1.0]
    assert faithfulness.trapezoid(fractions, torch.full((2, 5), 0.25)).tolist() == pytest.approx([0.25, 0.25])
    assert faithfulness.trapezoid(fractions, torch.tensor(fractions)).item() == pytest.approx(0.5)


def test_ranks_order_distinct_values_and_break_ties_without_position():
    maps = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    places = faithfulness.ranks(maps)
    relevance = maps.abs().sum(1).flatten(1)
    assert torch.equal(places, torch.argsort(torch.argsort(relevance, 1, descending=True), 1))
    flat = faithfulness.ranks(torch.zeros(1, 32, 32))[0]
    assert sorted(flat.tolist()) == list(range(1024))
    assert flat[:512].float().mean() != pytest.approx(255.5, abs=20)  # not the first rows first


def test_relevance_upsamples_a_stage_map_bilinearly():
    cam = torch.rand(2, 4, 4)
    expected = torch.nn.functional.interpolate(cam[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(faithfulness.relevance(cam), expected)


def test_edge_map_of_a_vertical_step_is_four_beside_the_step():
    images = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    images[..., 16:] = 255
    edges = faithfulness.edge_map(images)[0]
    expected = torch.zeros(32, 32)
    expected[:, 15:17] = 4  # gx = (1 + 2 + 1) * 1 on each side of the step, gy = 0
    assert torch.allclose(edges, expected)


def ramp():
    i, j = torch.meshgrid(torch.arange(32).double(), torch.arange(32).double(), indexing="ij")
    return torch.stack([0.1 + 0.01 * i + 0.02 * j, 0.9 - 0.015 * i, 0.3 + 0.005 * (i + j)])[None]


def test_imputer_without_noise_keeps_a_linear_ramp_exactly():
    removed = torch.rand(4, 32, 32, generator=torch.Generator().manual_seed(3)) < 0.9
    removed[:, [0, -1], :] = False  # at the border the neighbourhood is one-sided, and a ramp's mean moves
    removed[:, :, [0, -1]] = False
    removed[0, 1:-1, 1:-1] = True  # one 30x30 hole: the hardest system
    images = ramp().expand(4, -1, -1, -1)
    out = faithfulness.road_impute(images, removed, noise=0, tol=1e-13)
    assert out.dtype == torch.float64
    assert (out - images).abs().max().item() < 1e-9


def reference_weighted_mean(image, i, j):
    """sum_q w_q v(q) / sum_q w_q over the 8 neighbours of (i, j) inside the image, pixel by pixel."""
    total, weights = 0.0, 0.0
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            if (di, dj) != (0, 0) and 0 <= i + di < image.shape[-2] and 0 <= j + dj < image.shape[-1]:
                w = 1 / 12 if di and dj else 1 / 6
                total, weights = total + w * image[..., i + di, j + dj], weights + w
    return total / weights


def test_imputer_without_noise_gives_each_removed_pixel_the_weighted_mean_of_its_neighbours():
    generator = torch.Generator().manual_seed(4)
    images = torch.rand(2, 3, 12, 12, generator=generator).double()
    removed = torch.rand(2, 12, 12, generator=generator) < 0.6  # the border included
    out = faithfulness.road_impute(images, removed, noise=0, tol=1e-13)
    assert torch.equal(out[~removed[:, None].expand_as(out)], images[~removed[:, None].expand_as(images)])
    for n, i, j in removed.nonzero().tolist():
        assert torch.allclose(out[n, :, i, j], reference_weighted_mean(out[n], i, j), atol=1e-10)


def test_imputer_noise_has_the_standard_deviation_asked_for_on_removed_pixels_only():
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    removed = torch.rand(8, 32, 32, generator=torch.Generator().manual_seed(6)) < 0.5
    clean = faithfulness.road_impute(images, removed, noise=0)
    noisy = faithfulness.road_impute(images, removed, noise=0.05, generator=torch.Generator().manual_seed(7))
    difference = noisy - clean
    mask = removed[:, None].expand_as(difference)
    assert difference[mask].std().item() == pytest.approx(0.05, rel=0.05)
    assert difference[~mask].abs().max().item() == 0


def test_road_removing_nothing_gives_the_models_accuracy():
    torch.manual_seed(8)
    model = ResNet(4).eval()
    images, labels = cifar10.make_synthetic_images(64, seed=9)
    x = data.normalize(images)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == labels).double().mean().item()
    scores = faithfulness.road(model, images, labels, faithfulness.random_map(64), levels=(0,), noise=0)
    assert scores.accuracy == [pytest.approx(accuracy)]
    # and deletion's first point is the unchanged image's probability
    curve = faithfulness.deletion(model, images[:4], labels[:4], faithfulness.random_map(4), step=50)
    with torch.no_grad():
        p = model(x[:4]).softmax(1).gather(1, labels[:4, None])[:, 0]
    np.testing.assert_allclose(curve.probabilities[:, 0].numpy(), p.numpy(), atol=1e-6)


def test_road_morf_removes_the_most_relevant_pixels_and_lerf_the_least():
    # a model that reads only the top-left 8x8 square, white on black: MoRF at 10 % of a map marking
    # the square removes it, and the imputation fills it from its black neighbours, so the class goes;
    # LeRF at 90 % removes everything but the 103 most relevant pixels, the square among them, and it stays
    a = torch.zeros(3, 32, 32)
    a[:, :8, :8] = 1.0
    model = LinearLogit(a)
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    images[..., :8, :8] = 255
    targets = torch.ones(2, dtype=torch.long)
    square = torch.zeros(2, 32, 32)
    square[:, :8, :8] = 1 + torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(10))
    assert faithfulness.road(model, images, targets, square, "MoRF", levels=(0, 10), noise=0).accuracy == [1.0, 0.0]
    assert faithfulness.road(model, images, targets, square, "LeRF", levels=(90,), noise=0).accuracy == [1.0]
