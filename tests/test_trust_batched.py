"""The trust table against a straightforward computation: its dependence columns are the Spearman rho of
the maps drawn network by network; the deletion and insertion curves with their end points shared by all
maps equal each curve computed point by point; the BatchNorms folded leave the table as it was; plot_trust.py's
parts are timed."""
import pytest
import torch

import cifar10

import data
from model import ResNet
from visualize import faithfulness, sanity, trust
from visualize.attribution import attribute
from visualize.context import load_run


def small_network(seed=0):
    torch.manual_seed(seed)
    model = ResNet(4).double().eval()  # float64: the maps agree to rounding, far below the tolerance
    with torch.no_grad():  # BN statistics unlike a fresh network's, so re-initialising changes the maps
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def images():
    return cifar10.make_synthetic_images(3, seed=1)


def test_the_tables_dependence_columns_are_the_spearman_of_the_maps_drawn_network_by_network(images, one_thread):
    model = small_network()
    pictures, labels = images
    names = ("Grad-CAM conv3_x", "occlusion")
    dependence, cascades = trust.class_map_dependence(model, pictures, labels, seed=3, names=names)
    fresh = sanity.fresh_network(model, 3)
    others = trust.random_other_classes(labels, 10, 3)
    for name, method, layer in trust.CLASS_MAPS:
        if name not in names:
            continue
        options = {"layer": layer} if layer else {}
        trained = attribute(model, pictures, labels, method, **options)
        rhos = [trust.per_image_similarity(trained, attribute(
            sanity.reinitialised(model, trust.DEPTHS[:k], 3, fresh).eval(), pictures, labels, method, **options))
            for k in range(1, len(trust.DEPTHS) + 1)]
        # the table draws with the BatchNorms folded (model.fold_batchnorm), these with them: the maps agree
        # to rounding, and a Grad-CAM value a rounding away from its ReLU's 0 may rank either side of the
        # zeros, which moves rho by about 1e-6
        assert cascades[name] == pytest.approx([sanity.defined_mean(r) for r in rhos], abs=1e-5)
        assert torch.allclose(dependence[name]["weights: all"], rhos[-1], atol=1e-5, equal_nan=True)
        other = trust.per_image_similarity(trained, attribute(model, pictures, others, method, **options))
        assert torch.allclose(dependence[name]["class"], other, atol=1e-5, equal_nan=True)


def point_by_point(model, images, targets, maps, kind, step):
    """A curve the plain way: each step's image built pixel set by pixel set and sent through model(x) alone."""
    x = data.normalize(images).double()
    start, end = (x, torch.zeros_like(x)) if kind == "deletion" else (faithfulness.gaussian_blur(x), x)
    places = faithfulness.ranks(maps, 0)
    counts = faithfulness.step_counts(32 * 32, step)
    curves = torch.empty(len(x), len(counts), dtype=torch.float64)
    with torch.no_grad():
        for i in range(len(x)):
            for j, count in enumerate(counts):
                changed = (places[i] < count).view(1, 32, 32)
                image = torch.where(changed, end[i], start[i])
                curves[i, j] = model(image[None]).softmax(1)[0, targets[i]]
    return curves


def test_curves_with_shared_end_points_equal_each_map_computed_point_by_point(images, one_thread):
    model = small_network()
    pictures, labels = images
    maps = {"random": faithfulness.random_map(3, 5), "edge": faithfulness.edge_map(pictures)}
    curves = faithfulness.perturbation_curves(model, pictures, labels, maps, step=20)
    for name, m in maps.items():
        for kind in ("deletion", "insertion"):
            expected = point_by_point(model, pictures, labels, m, kind, 20)
            # target_probabilities takes the softmax in float32
            torch.testing.assert_close(curves[name][kind].probabilities, expected, rtol=1e-6, atol=1e-7)
            assert torch.allclose(curves[name][kind].auc, faithfulness.trapezoid(curves[name][kind].fractions, expected),
                                  atol=1e-7)
    whole = faithfulness.perturbation_curves(model, pictures, labels, maps, ("deletion",), step=100)
    assert whole["edge"]["deletion"].probabilities.shape == (3, 2)  # a step of 100 %: the end points alone


def test_the_faithfulness_parts_are_timed(images, one_thread):
    model = small_network()
    pictures, labels = images
    times = {}
    trust.class_map_faithfulness(model, pictures, labels, step=50, names=("saliency",), times=times)
    assert set(times) == {"faithfulness maps", "deletion/insertion", "ROAD"} <= set(trust.PARTS)
    assert all(seconds > 0 for seconds in times.values())


def test_the_parts_plot_trust_prints_are_what_bench_figures_reads():
    import bench_figures
    times = {part: 1.25 * i for i, part in enumerate(trust.PARTS)}
    printed = f"wrote trust.png\n{trust.part_lines(times)}\nplot_trust.py: 2 files in 3.0 s\n"
    assert bench_figures.trust_parts(printed) == {part: round(seconds, 1) for part, seconds in times.items()}


def test_the_table_drawn_with_the_batchnorms_folded_equals_the_table_drawn_with_them(trained_checkpoint, monkeypatch,
                                                                                   one_thread):
    # float32, a network that learned (its BatchNorm statistics are the data's): what a user's table computes
    run = load_run(trained_checkpoint, torch.device("cpu"))
    images = run.images[:16]
    targets = faithfulness.predictions(run.model, data.normalize(images))
    names = ("Grad-CAM conv4_x", "saliency", "occlusion")

    def table():
        dependence, cascades = trust.class_map_dependence(run.model, images[:6], targets[:6], names=names)
        return dependence, cascades, trust.class_map_faithfulness(run.model, images, targets, step=10, names=names)

    folded = table()
    monkeypatch.setattr(trust, "fold_batchnorm", lambda model, copy=True: model.eval())  # the BatchNorms kept
    kept = table()
    # The maps agree to rounding, but a ranking follows rounding where values tie in exact arithmetic (an
    # upsampled Grad-CAM's mirrored pixels) or a ReLU gate sits a rounding away from 0 (a gradient): one
    # pixel's place moves a deletion curve by up to a step, and may change which pixels ROAD imputes and
    # so one classification of the 16 images x 9 levels (1/144 of the mean). Each column's mean stays
    # within that, far below the table's last digit. The baselines' maps do not depend on the network: their
    # curves agree to float32 rounding.
    for name in (*names, *trust.BASELINES):
        for column in trust.COLUMNS:
            part = 2 if column in trust.FAITHFULNESS else 0
            tolerance = 1.5 / (9 * len(images)) if column.startswith("ROAD") else 5e-3
            assert trust.summary(folded[part][name][column])[0] == pytest.approx(
                trust.summary(kept[part][name][column])[0], abs=tolerance, nan_ok=True)
    for name in trust.BASELINES:
        for column in ("deletion AUC", "insertion AUC"):
            torch.testing.assert_close(folded[2][name][column], kept[2][name][column], atol=1e-6, rtol=0)
    for name, cascade in folded[1].items():  # each depth's mean rho
        assert cascade == pytest.approx(kept[1][name], abs=5e-3)
