"""The unit atlas (plot_unit_atlas.py) and plot_all.py: receptive fields, top-9 search, crops, JSON."""
import json
import re

import numpy as np
import pytest
import torch
from matplotlib.image import imread

import cifar10

import data
import plot_all
import plot_unit_atlas
import checkpoint
import utils
from visualize import atlas, cli, page, scoring, units
from conftest import assert_one_line_error, run_in_process, run_script, without_posix_only_env
from model import STAGES, ResNet
from test_units import direct_selectivity, hooked_predictions


# --------------------------------------------------------------------------- receptive fields

@pytest.fixture(scope="module")
def bump_fields():
    """{layer: (H, W, 32, 32) bool}: for every unit of every stage, the input pixels whose change
    changes it, found by experiment rather than from the architecture.

    With every weight positive, BN an identity scale and an all-positive input, no ReLU is ever 0,
    so a large bump at one pixel raises every unit that sees that pixel (it also wins each max-pool
    window it enters) and no other. One batch: the plain input and one bumped copy per pixel.
    """
    torch.manual_seed(0)
    model = ResNet(4).double().eval()
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            w = torch.rand_like(m.weight) + 0.5
            m.weight.data = w / w[0].sum()  # positive, and sums near 1 keep the values near 1
        elif isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.fill_(1), m.bias.data.zero_(), m.running_mean.zero_(), m.running_var.fill_(1)
    x = torch.ones(1 + 32 * 32, 3, 32, 32, dtype=torch.float64)
    pixels = torch.arange(32 * 32)
    x[1 + pixels, :, pixels // 32, pixels % 32] += 1e6
    with torch.no_grad(), model.capture(*STAGES) as acts:
        model(x)
    fields = {}
    for layer in STAGES:
        a = acts[layer][:, 0]  # (1 + 1024, H, W)
        assert a.min() > 0  # no ReLU gated anything
        changed = a[1:] != a[0]  # (1024 pixels, H, W)
        fields[layer] = changed.permute(1, 2, 0).reshape(*a.shape[1:], 32, 32)
    return fields


def test_receptive_fields_equal_the_pixels_that_change_each_unit(bump_fields):
    model = ResNet(8)
    for layer, fields in bump_fields.items():
        for row in range(fields.shape[0]):
            for col in range(fields.shape[1]):
                top, left, bottom, right = model.receptive_field(layer, row, col)
                box = torch.zeros(32, 32, dtype=torch.bool)
                box[top:bottom + 1, left:right + 1] = True
                assert torch.equal(fields[row, col], box), (layer, row, col)
    # unclipped, far from the borders: the textbook recurrence, each layer adding (kernel - 1) times
    # the product of the strides below it (conv1 3x3, pool 3x3/2, then 3x3 convs at strides 2, 4, 8, 16)
    sizes = {name: model.receptive_field(name, 2000, 2000, clip=False) for name in STAGES}
    assert {name: (b[2] - b[0] + 1, b[3] - b[1] + 1) for name, b in sizes.items()} == {
        "conv1": (3, 3), "conv2_x": (21, 21), "conv3_x": (49, 49), "conv4_x": (105, 105), "conv5_x": (217, 217)}


def test_field_canvas_puts_the_patch_where_the_image_lies_in_the_field():
    outside = np.array(atlas.OUTSIDE_IMAGE, dtype=np.float32)
    patch = np.random.default_rng(0).random((11, 15, 3), dtype=np.float32)
    # a 21x21 field reaching 10 rows above the image and 6 columns left of it: the patch sits at (10, 6)
    canvas = atlas.field_canvas(patch, [0, 0, 10, 14], [-10, -6, 10, 14], 32)
    assert canvas.shape == (21, 21, 3)
    np.testing.assert_array_equal(canvas[10:21, 6:21], patch)
    mask = np.ones((21, 21), dtype=bool)
    mask[10:21, 6:21] = False
    assert (canvas[mask] == outside).all()
    # a 49x49 field cut by the top border only: a 32x32 canvas, the patch at its bottom
    patch = patch[:, :1].repeat(32, axis=1)[:1].repeat(25, axis=0)  # (25, 32, 3)
    canvas = atlas.field_canvas(patch, [0, 0, 24, 31], [-24, -8, 24, 40], 32)
    assert canvas.shape == (32, 32, 3)
    np.testing.assert_array_equal(canvas[7:], patch)
    assert (canvas[:7] == outside).all()


# --------------------------------------------------------------------------- the atlas script

ATLAS_LAYERS = ["conv1", "conv2_x", "conv3_x", "conv5_x"]  # fields of 3, 21, 49 (cut) and 217 (whole image)
ATLAS_CHANNELS = [0, 3, 7]
NAMED = "_channels0,3,7"  # the file names carry the --channels given


@pytest.fixture(scope="module")
def atlas_run(trained_checkpoint, small_data_dir, tmp_path_factory):
    """plot_unit_atlas.main on the width-8 checkpoint and the 512 small test images."""
    out = tmp_path_factory.mktemp("atlas")
    argv = ["--checkpoint", str(trained_checkpoint), "--data-dir", str(small_data_dir), "--no-synthetic",
            "--figures-dir", str(out), "--layer", ",".join(ATLAS_LAYERS),
            "--channels", ",".join(map(str, ATLAS_CHANNELS))]
    written = plot_unit_atlas.main(argv)
    parser = cli.plot_parser("")
    return written, out, parser.load(parser.parse_args(argv[:7]))


def brute_force_top9(acts, layer, channel):
    """The 9 images with the largest activation of `channel` anywhere in `layer`'s maps `acts[layer]`
    (captured by ResNet.capture): (image, activation, row, col) each, by plain Python sorting."""
    fmap = acts[layer][:, channel]
    peak = fmap.flatten(1).max(1).values.tolist()
    top = sorted(range(len(fmap)), key=lambda i: (-peak[i], i))[:9]
    result = []
    for i in top:
        row, col = (fmap[i] == fmap[i].max()).nonzero()[0].tolist()  # first position of the maximum
        result.append((i, peak[i], row, col))
    return result


def test_atlas_writes_a_png_and_json_per_layer(atlas_run):
    written, out, _ = atlas_run
    expected = [out / f"atlas_{layer}{NAMED}.{ext}" for layer in ATLAS_LAYERS for ext in ("png", "json")]
    assert written == expected and sorted(out.iterdir()) == sorted(expected)
    for layer in ATLAS_LAYERS:
        image = imread(out / f"atlas_{layer}{NAMED}.png")
        assert image.shape[0] > 300 and image.std() > 0.05
        record = json.loads((out / f"atlas_{layer}{NAMED}.json").read_text())
        assert set(record) == {"figure", "layer", "checkpoint", "method", "units"} and record["layer"] == layer
        assert record["method"] == "deconvnet"
        assert [unit["channel"] for unit in record["units"]] == ATLAS_CHANNELS
        for unit in record["units"]:
            assert set(unit) == {"channel", "top", "classes", "selectivity", "leading_class", "ablation"}
            assert len(unit["top"]) == 9
            assert all(set(e) == {"image", "activation", "row", "col", "box"} for e in unit["top"])
            assert len(unit["classes"]) == 9 and all(isinstance(c, str) for c in unit["classes"])
            assert isinstance(unit["selectivity"], float) and 0 <= unit["selectivity"] <= 1
            assert unit["leading_class"] is None or isinstance(unit["leading_class"], str)
            a = unit["ablation"]
            assert set(a) == {"images", "accuracy", "unablated_accuracy", "class", "class_accuracy",
                              "class_unablated_accuracy", "class_drop"}
            assert isinstance(a["images"], int) and isinstance(a["class"], str)
            assert all(isinstance(a[key], float) and 0 <= a[key] <= 1 for key in
                       ("accuracy", "unablated_accuracy", "class_accuracy", "class_unablated_accuracy"))


def test_atlas_unit_numbers_equal_the_captured_activations_and_the_hooked_network(atlas_run):
    """classes, selectivity and ablation of every unit in the JSON, each from an independent route:
    the labels, ResNet.capture over the whole test split, the network with the channel hooked to 0."""
    _, out, run = atlas_run
    x = data.normalize(run.images)
    with torch.no_grad(), run.model.capture(*ATLAS_LAYERS) as acts:  # all 512 images in one batch
        logits = run.model(x)
    unablated = logits.argmax(1)
    right_before = unablated == run.labels
    for layer in ATLAS_LAYERS:
        selectivity = direct_selectivity(acts[layer], run.labels)
        means = acts[layer].double().mean((2, 3))
        for unit in json.loads((out / f"atlas_{layer}{NAMED}.json").read_text())["units"]:
            channel = unit["channel"]
            assert unit["classes"] == [run.classes[run.labels[e["image"]]] for e in unit["top"]]
            assert unit["selectivity"] == pytest.approx(selectivity[channel], rel=1e-5, abs=1e-9)
            mu = [means[run.labels == c, channel].mean().item() for c in range(len(run.classes))]
            assert unit["leading_class"] == (run.classes[mu.index(max(mu))] if max(mu) > 0 else None)
            right = hooked_predictions(run.model, x, layer, channel) == run.labels
            a = unit["ablation"]
            assert a["images"] == 512  # the default, 1000, capped at the split's 512
            assert a["unablated_accuracy"] == pytest.approx(right_before.double().mean().item())
            assert a["accuracy"] == pytest.approx(right.double().mean().item())
            k = run.classes.index(a["class"])
            mine = run.labels == k
            assert a["class_accuracy"] == pytest.approx(right[mine].double().mean().item())
            assert a["class_unablated_accuracy"] == pytest.approx(right_before[mine].double().mean().item())
            drops = [(right_before[run.labels == c].double().mean() - right[run.labels == c].double().mean()).item()
                     for c in range(len(run.classes))]
            assert a["class_drop"] == pytest.approx(max(drops)) and drops.index(max(drops)) == k


def test_atlas_method_projects_by_it_and_names_the_files(trained_checkpoint, small_data_dir, tmp_path):
    argv = ["--checkpoint", str(trained_checkpoint), "--data-dir", str(small_data_dir), "--no-synthetic",
            "--figures-dir", str(tmp_path), "--layer", "conv4_x", "--channels", "2", "--method", "gradient",
            "--ablation-images", "40"]
    written = plot_unit_atlas.main(argv)
    stem = "atlas_conv4_x_gradient_channels2_ablation-images40"  # and every other flag not at its default
    assert written == [tmp_path / f"{stem}.png", tmp_path / f"{stem}.json"]
    record = json.loads(written[1].read_text())
    assert record["method"] == "gradient" and record["units"][0]["ablation"]["images"] == 40
    parser = cli.plot_parser("")
    run = parser.load(parser.parse_args(argv[:7]))
    unit = record["units"][0]
    projections, _ = atlas.atlas_crops(run, "conv4_x", unit, method="gradient")
    recon = run.model.reconstruct(data.normalize(run.images[[e["image"] for e in unit["top"]]]), "conv4_x", 2,
                                  top1=True, method="gradient")
    shown = 0.5 + recon / (2 * recon.abs().max())
    for entry, projection, s in zip(unit["top"], projections, shown):
        top, left, bottom, right = entry["box"]
        np.testing.assert_allclose(projection, s[:, top:bottom + 1, left:right + 1].permute(1, 2, 0).numpy(), atol=1e-6)
    deconvnet, _ = atlas.atlas_crops(run, "conv4_x", unit)
    assert any(not np.allclose(a, b) for a, b in zip(projections, deconvnet))  # the method made a difference


def test_atlas_top9_and_boxes_equal_brute_force_and_the_measured_fields(atlas_run, bump_fields):
    _, out, run = atlas_run
    with torch.no_grad(), run.model.capture(*ATLAS_LAYERS) as acts:  # all 512 images in one batch
        run.model(data.normalize(run.images))
    for layer in ATLAS_LAYERS:
        record = json.loads((out / f"atlas_{layer}{NAMED}.json").read_text())
        for unit in record["units"]:
            expected = brute_force_top9(acts, layer, unit["channel"])
            assert [e["image"] for e in unit["top"]] == [i for i, *_ in expected]
            assert [(e["row"], e["col"]) for e in unit["top"]] == [(r, c) for *_, r, c in expected]
            np.testing.assert_allclose([e["activation"] for e in unit["top"]], [a for _, a, *_ in expected],
                                       rtol=1e-5, atol=1e-6)
            activations = [e["activation"] for e in unit["top"]]
            assert activations == sorted(activations, reverse=True)
            for entry in unit["top"]:
                top, left, bottom, right = entry["box"]
                field = bump_fields[layer][entry["row"], entry["col"]]
                rows, cols = field.any(1).nonzero().flatten(), field.any(0).nonzero().flatten()
                assert [top, left, bottom, right] == [rows.min(), cols.min(), rows.max(), cols.max()]


def test_atlas_crops_are_the_boxes_and_hold_the_whole_projection(atlas_run):
    _, out, run = atlas_run
    for layer in ATLAS_LAYERS:
        for unit in json.loads((out / f"atlas_{layer}{NAMED}.json").read_text())["units"]:
            projections, patches = atlas.atlas_crops(run, layer, unit)
            indices = [e["image"] for e in unit["top"]]
            recon = run.model.reconstruct(data.normalize(run.images[indices]), layer, unit["channel"], top1=True)
            shown = 0.5 + recon / (2 * recon.abs().max())  # one scale for the channel's 9
            for entry, projection, patch, r, s in zip(unit["top"], projections, patches, recon, shown):
                top, left, bottom, right = entry["box"]
                pixels = run.images[entry["image"], :, top:bottom + 1, left:right + 1].permute(1, 2, 0) / 255
                np.testing.assert_allclose(patch, pixels.numpy(), atol=1e-6)
                np.testing.assert_allclose(projection, s[:, top:bottom + 1, left:right + 1].permute(1, 2, 0).numpy(),
                                           atol=1e-6)
                inside = torch.zeros(32, 32, dtype=torch.bool)
                inside[top:bottom + 1, left:right + 1] = True
                assert (r[:, ~inside] == 0).all()  # nothing of the projection is cropped away
                assert (r[:, inside] != 0).any() == (entry["activation"] > 0)


def test_atlas_bad_channels_and_layers_name_the_valid_range(trained_checkpoint, small_data_dir, tmp_path):
    common = ["--checkpoint", str(trained_checkpoint), "--data-dir", str(small_data_dir), "--no-synthetic",
              "--figures-dir", str(tmp_path / "bad")]
    cases = {("--layer", "conv2_x,conv5_x", "--channels", "0-8"): "conv2_x of this width-8 network has 8 channels; choose 0..7",
             ("--channels", "first"): "--channels 'first' is not a list of channel indices",
             ("--layer", "conv2_x,conv6_x"): "conv1, conv2_x, conv3_x, conv4_x, conv5_x",
             ("--layer", ","): "names no stage",
             ("--ablation-images", "513"): "--ablation-images 513 is out of range: the test split has 512 images; "
                                           "choose 1..512",
             ("--ablation-images", "0"): "choose 1..512"}
    for args, message in cases.items():
        with pytest.raises(utils.UserError, match=re.escape(message)):
            plot_unit_atlas.main([*common, *args])
    assert not (tmp_path / "bad").exists()
    # and as a user sees it: one line, no traceback
    assert_one_line_error(run_script("plot_unit_atlas.py", *common, "--channels", "64"),
                          "channel 64 is out of range", "0..7")


# --------------------------------------------------------------------------- plot_all.py

def test_plot_all_writes_every_figure_in_one_process(trained_checkpoint, tmp_path, synthetic_data_dir):
    """Run where the POSIX-only modules and calls do not exist (as on Windows and macOS), with --quick:
    the scripts whose numbers are estimates take fewer images (their full counts are tested on their own)."""
    env = without_posix_only_env(tmp_path.parent / f"{tmp_path.name}-site")
    proc = run_script("plot_all.py", "--quick", "--checkpoint", trained_checkpoint, "--figures-dir", tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    written = re.findall(r"^wrote (.+)$", proc.stdout, flags=re.M)
    assert sorted(written) == sorted(map(str, tmp_path.iterdir()))
    names = {p.name for p in tmp_path.iterdir()}
    figures = {"train_accuracy", "train_loss", "test_accuracy", "test_loss", "conv1_filters_rgb",
               "conv1_feature_maps_image7876", "conv5_x_feature_maps_image7876",
               "conv1_channel0_reconstructions", "conv5_x_channel1_reconstructions_shortcut",
               "conv5_x_channel1_reconstructions_trunk", "gradient_pattern_conv5_x_channel0",
               "feature_visualization_conv5_x_quick", "sanity_conv5_x_channel1_quick", "class_evidence", "trust_quick",
               "invariance", "occlusion", *(f"atlas_{layer}_quick" for layer in atlas.ATLAS_LAYERS.split(",")),
               *(f"conv1_filters_input_channel{c}" for c in range(3))}
    expected = {f"{stem}.{ext}" for stem in figures for ext in ("png", "json")}  # each figure and its record
    assert names == expected | {"feature_visualization_conv5_x_quick.pt", "index.html"}
    for name in plot_all.SCRIPTS:
        assert re.search(rf"^{name}\.py: \d+ files in [\d.]+ s$", proc.stdout, flags=re.M), name
    assert "plot_feature_evolution.py, plot_learning_dynamics.py: skipped" in proc.stdout  # a run without snapshots
    # the gradient pattern's search, served by the atlas's shared pass, finds the image that
    # top_activating's own pass finds
    model, _ = checkpoint.load_checkpoint(trained_checkpoint)
    images = cifar10.load_cifar10(cifar10.dataset_root(synthetic_data_dir, True), train=False)[0]
    (index,), _ = scoring.top_activating(model, images, "conv5_x", 0)
    assert re.search(rf"test image {index.item()} \(.*\) excites conv5_x channel 0 most", proc.stdout)
    # default channels: 0-15, or every channel of a stage with fewer (conv2_x has 8 at width 8)
    record = json.loads((tmp_path / "atlas_conv2_x_quick.json").read_text())
    assert [unit["channel"] for unit in record["units"]] == list(range(8))


def test_plot_all_quick_takes_fewer_images_where_a_number_is_an_estimate_and_says_so(monkeypatch, trained_checkpoint,
                                                                                      tmp_path):
    monkeypatch.setattr(plot_all, "SCRIPTS", ("plot_sanity_checks",))
    common = ["--checkpoint", str(trained_checkpoint), "--figures-dir", str(tmp_path)]
    for quick in (["--quick"], []):  # the quick run, then the full one beside it
        proc = run_in_process("plot_all.py", [*common, *quick])
        assert proc.returncode == 0, proc.stderr
    quick = json.loads((tmp_path / "sanity_conv5_x_channel1_quick.json").read_text())
    full = json.loads((tmp_path / "sanity_conv5_x_channel1.json").read_text())
    assert quick["images"] == list(range(4531, 4535)) and full["images"] == list(range(4531, 4547))
    assert quick["figure"]["changed"] == {"--quick": True} and full["figure"]["changed"] == {}
    sections, _, others = page.classify_files(tmp_path)
    captions = {f.name: f.caption for found in sections.values() for f in found}
    assert captions["sanity_conv5_x_channel1_quick.png"].startswith(
        "The quick run, a first look: the similarities on 4 test images. ")
    assert not captions["sanity_conv5_x_channel1.png"].startswith("The quick run") and not others


def test_a_quick_atlas_ablates_on_fewer_images_and_says_so(trained_checkpoint, small_data_dir, tmp_path):
    common = ["--checkpoint", str(trained_checkpoint), "--data-dir", str(small_data_dir), "--no-synthetic",
              "--figures-dir", str(tmp_path), "--layer", "conv5_x", "--channels", "0-1"]
    paths = plot_unit_atlas.main([*common, "--quick"])
    assert [p.name for p in paths] == ["atlas_conv5_x_channels0-1_quick.png", "atlas_conv5_x_channels0-1_quick.json"]
    record = json.loads(paths[1].read_text())
    assert {unit["ablation"]["images"] for unit in record["units"]} == {units.QUICK_ABLATION_IMAGES}
    given = json.loads(plot_unit_atlas.main([*common, "--quick", "--ablation-images", "7"])[1].read_text())
    assert {unit["ablation"]["images"] for unit in given["units"]} == {7}  # a flag given wins
    sections, _, _ = page.classify_files(tmp_path)
    assert [f.caption.split(". ")[0] for f in sections["atlas"]] == [
        "The quick run, a first look: the accuracy drops on 7 test images",
        f"The quick run, a first look: the accuracy drops on {units.QUICK_ABLATION_IMAGES} test images"]
