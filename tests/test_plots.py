"""The plot scripts and their shared code in visualize/: scores, gradient ascent, figures, bad input."""
import re

import numpy as np
import pytest
import torch
from matplotlib.image import imread

import bench_figures
import checkpoint
import cifar10
import data
import utils
from visualize import ascent, cli, drawing, figures, scoring
from visualize.context import PlotRun
from conftest import run_in_process
from model import METHODS, ResNet


@pytest.fixture(scope="module")
def test_images(synthetic_data_dir):
    return cifar10.load_cifar10(cifar10.dataset_root(synthetic_data_dir, True), train=False)[0]


# --------------------------------------------------------------------------- scores and gradient ascent

@pytest.mark.parametrize("layer, channel", [("conv1", 3), ("conv3_x", 5), ("conv5_x", 60)])
def test_top_activating_equals_the_one_image_at_a_time_loop(test_images, layer, channel):
    torch.manual_seed(0)
    model = ResNet(8).eval()
    images = test_images[:50]
    # the report's loop: each image alone through the whole network, the stage output captured
    loop_indices, loop = bench_figures.per_image_top(model, images, layer, channel, k=len(images))
    assert loop.unique().numel() == len(loop) and loop.max() > 0  # a strict ranking to compare
    # batches of 16: three full ones and a partial one
    indices, scores = scoring.top_activating(model, images, layer, channel, k=10, batch_size=16)
    assert indices.tolist() == loop_indices[:10].tolist()
    torch.testing.assert_close(scores, loop[:10], rtol=1e-5, atol=1e-6)


def test_gradient_ascent_raises_the_activation_within_the_pixel_range(trained_checkpoint, test_images):
    model, _ = checkpoint.load_checkpoint(trained_checkpoint)
    layer, channel = "conv5_x", 0
    (index,), _ = scoring.top_activating(model, test_images[:200], layer, channel)
    x0 = data.normalize(test_images[[index.item()]])
    results = {penalty: ascent.gradient_ascent(model, x0, layer, channel, steps=15, lr=0.05, penalty=penalty)
               for penalty in (0.0, 10.0)}
    with torch.no_grad():
        before = scoring.channel_scores(model, x0, layer, channel).item()
        after = scoring.channel_scores(model, results[0.0], layer, channel).item()
    assert before > 0 and after > 1.2 * before
    for x in results.values():
        # undo normalize by hand: data.denormalize would clamp to [0, 1] and hide any excursion
        pixels = x * torch.tensor(data.CIFAR10_STD).view(1, 3, 1, 1) + torch.tensor(data.CIFAR10_MEAN).view(1, 3, 1, 1)
        assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    # lambda * ||x - x0||^2 holds the pattern near its start image
    assert (results[10.0] - x0).norm() < 0.5 * (results[0.0] - x0).norm()
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- figure helpers

@pytest.mark.parametrize("n", [1, 2, 3, 16, 17, 64, 512])
def test_grids_are_near_square_and_filled_row_by_row(n):
    rows, cols = drawing.grid_shape(n)
    assert rows <= cols <= rows + 1 and (rows - 1) * cols < n <= rows * cols
    maps = np.arange(n * 6, dtype=np.float32).reshape(n, 2, 3)
    mosaic = drawing.tile(maps, pad=1)
    assert mosaic.shape == (rows * 3 - 1, cols * 4 - 1)
    for i in range(n):
        r, c = divmod(i, cols)
        assert (mosaic[3 * r:3 * r + 2, 4 * c:4 * c + 3] == maps[i]).all()
    assert np.isnan(mosaic).sum() == mosaic.size - maps.size  # everything else is gap


def test_signed_display_maps_zero_to_grey_and_each_images_peak_to_an_end():
    r = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 10.0, 100.0, 1e-3]).view(4, 1, 1, 1)
    r[:, :, 0, 0] = 0
    shown = drawing.signed_to_display(r)  # (N, H, W, 3)
    assert shown.shape == (4, 5, 5, 3) and shown.min() >= 0 and shown.max() <= 1
    assert np.allclose(shown[:, 0, 0], 0.5)
    for image in shown:  # per image, the largest |r| reaches 0 or 1
        assert np.isclose(np.abs(image - 0.5).max(), 0.5)
    peak = np.abs(r.numpy()).max((1, 2, 3), keepdims=True).transpose(0, 2, 3, 1)
    # r / max|r| of its image, to float32 rounding of numbers in [-1, 1]
    np.testing.assert_allclose((shown - 0.5) * 2, r.permute(0, 2, 3, 1).numpy() / peak, rtol=0, atol=1e-6)


@pytest.mark.parametrize("text, expected", [("4531-4546", list(range(4531, 4547))), ("1,2,3", [1, 2, 3]),
                                            ("7", [7]), ("1, 5-7", [1, 5, 6, 7])])
def test_image_lists(text, expected):
    assert cli.parse_indices(text) == expected


# --------------------------------------------------------------------------- the scripts, as a user runs them

SCRIPT_ARGS = {
    "plot_conv1_filters.py": [],
    "plot_conv1_feature_map.py": ["--image-index", 5],
    "plot_conv5_feature_map.py": ["--image-index", 5],
    "plot_conv1_reconstructed_pattern.py": ["--images", "0-3,9"],
    "plot_conv5_reconstructed_pattern_shortcut.py": ["--images", "0-4"],
    "plot_conv5_reconstructed_pattern_trunk.py": ["--images", "0-4"],
    "plot_gradient_pattern.py": ["--steps", 20],
    # other choices than the report's: written beside its figures, under other names
    "plot_conv5_reconstructed_pattern_trunk.py --top1 --scale shared": ["--images", "0-4", "--top1", "--scale", "shared"],
    "plot_conv5_feature_map.py --channels": ["--image-index", 5, "--channels", "2,5-7"],
    "plot_conv5_reconstructed_pattern_trunk.py --method guided": ["--images", "0-4", "--method", "guided"],
}
SCRIPT_FILES = {  # the figures of the scripts whose names say what they show (each with its JSON)
    "plot_conv5_reconstructed_pattern_trunk.py": ["conv5_x_channel1_reconstructions_trunk_images0-4"],
    "plot_conv5_reconstructed_pattern_trunk.py --top1 --scale shared":
        ["conv5_x_channel1_reconstructions_trunk_top1_sharedscale_images0-4"],
    "plot_conv5_feature_map.py": ["conv5_x_feature_maps_image5"],
    "plot_conv5_feature_map.py --channels": ["conv5_x_feature_maps_image5_channels2,5-7"],
    "plot_conv5_reconstructed_pattern_trunk.py --method guided":
        ["conv5_x_channel1_reconstructions_trunk_guided_images0-4"],
    "plot_gradient_pattern.py": ["gradient_pattern_conv5_x_channel0_steps20"],
}


@pytest.fixture(scope="module")
def runs(trained_checkpoint, tmp_path_factory):
    """Every script on the trained width-8 checkpoint, run here as its `__main__` would run it: the
    finished runs."""
    tmp = tmp_path_factory.mktemp("plots")
    jobs = {run: (run.split()[0], [*args, "--checkpoint", trained_checkpoint, "--figures-dir", tmp / run])
            for run, args in SCRIPT_ARGS.items()}
    return {name: run_in_process(script, [str(a) for a in args]) for name, (script, args) in jobs.items()}, tmp


@pytest.mark.parametrize("script", SCRIPT_ARGS)
def test_script_writes_the_figures_it_prints(runs, script):
    procs, tmp = runs
    proc = procs[script]
    assert proc.returncode == 0, proc.stderr
    written = re.findall(r"^wrote (.+)$", proc.stdout, flags=re.M)
    assert written and sorted(written) == sorted(str(p) for p in (tmp / script).iterdir())
    for path in (p for p in written if p.endswith(".png")):
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.std() > 0.05, path


@pytest.mark.parametrize("script", SCRIPT_FILES)
def test_file_names_say_what_the_figure_shows(runs, script):
    assert sorted(p.name for p in (runs[1] / script).iterdir()) == sorted(
        f"{stem}.{ext}" for stem in SCRIPT_FILES[script] for ext in ("json", "png"))


def test_conv1_filters_script_writes_each_input_channel_and_rgb(runs):
    procs, tmp = runs
    names = {p.name for p in (tmp / "plot_conv1_filters.py").iterdir()}
    assert names == {f"conv1_filters_{what}.{ext}" for what in ("input_channel0", "input_channel1", "input_channel2",
                                                               "rgb") for ext in ("png", "json")}


def test_gradient_script_starts_from_the_top_image_and_raises_its_activation(runs, trained_checkpoint,
                                                                             test_images):
    out = runs[0]["plot_gradient_pattern.py"].stdout
    found = re.search(r"test image (\d+) .*excites conv5_x channel 0 most: feature-map sum ([\d.]+)", out)
    index, score = found.groups()
    model, _ = checkpoint.load_checkpoint(trained_checkpoint)
    (expected_index,), (expected_score,) = scoring.top_activating(model, test_images, "conv5_x", 0)
    assert int(index) == expected_index.item() and float(score) == pytest.approx(expected_score.item(), abs=1e-4)
    before, after = map(float, re.search(r"activation: ([\d.]+) before, ([\d.]+) after 20 steps", out).groups())
    assert before == pytest.approx(float(score), abs=1e-4) and after > before



# --------------------------------------------------------------------------- honest reconstructions and readable maps

@pytest.fixture(scope="module")
def plot_run():
    """What PlotParser.load hands a plot function: a width-8 network whose BN layers have random statistics
    and shifts (so that some channels are silent on some images), and 32 random test images."""
    torch.manual_seed(0)
    model = ResNet(8)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        with torch.no_grad():
            bn.running_mean.normal_(0, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.bias.normal_(-0.3, 0.3)
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    return PlotRun(model=model.eval(), checkpoint={}, device=torch.device("cpu"), caption="test", images=images,
                   labels=[0] * len(images), classes=["class-0"])


def captured(model, images, layer):
    """The stage's output for the images by an independent route: the whole network's forward pass, hooked."""
    with torch.no_grad(), model.capture(layer) as acts:
        model(data.normalize(images))
    return acts[layer]


@pytest.mark.parametrize("top1", [False, True])
def test_reconstruction_panels_state_the_activation_and_which_images_are_silent(plot_run, top1):
    run, indices = plot_run, list(range(24))
    layer = "conv5_x"
    fmaps = captured(run.model, run.images[indices], layer)
    peaks = fmaps.amax((2, 3))  # (images, channels)
    silent = peaks == 0
    # a channel silent on some of the images and active on others
    channel = next(c for c in range(fmaps.shape[1]) if 0 < silent[:, c].sum() < len(indices) - 1)
    p = figures.reconstruction_panels(run, indices, layer, channel, "trunk", top1=top1)
    torch.testing.assert_close(p.peak, peaks[:, channel], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p.total, fmaps[:, channel].sum((1, 2)), rtol=1e-5, atol=1e-4)
    assert p.silent.tolist() == silent[:, channel].tolist()
    # nothing to project from a silent image: its reconstruction is 0 and shows as plain grey
    assert (p.recon[p.silent] == 0).all() and np.all(p.shown[p.silent.numpy()] == 0.5)
    assert (p.recon[~p.silent].abs().amax((1, 2, 3)) > 0).all()


def test_reconstruction_panels_project_by_the_method_asked_for(plot_run):
    run, indices, layer, channel = plot_run, list(range(6)), "conv4_x", 3
    x = data.normalize(run.images[indices])
    panels = {}
    for method in METHODS:
        for path, top1 in (("both", False), ("shortcut", True)):
            p = figures.reconstruction_panels(run, indices, layer, channel, path, top1=top1, method=method)
            expected = run.model.reconstruct(x, layer, channel, path=path, top1=top1, method=method)
            torch.testing.assert_close(p.recon, expected, rtol=0, atol=0)
            panels[method, path] = p.recon
    # the three differ above conv1, so a method that was not passed on would show
    assert not torch.allclose(panels["deconvnet", "both"], panels["guided", "both"])
    assert not torch.allclose(panels["guided", "both"], panels["gradient", "both"])


def test_shared_scale_keeps_the_relative_strength_of_the_panels(plot_run):
    run, indices = plot_run, list(range(12))
    own = figures.reconstruction_panels(run, indices, "conv4_x", 3, "both", scale="image")
    shared = figures.reconstruction_panels(run, indices, "conv4_x", 3, "both", scale="shared")
    torch.testing.assert_close(own.recon, shared.recon)
    r = shared.recon.permute(0, 2, 3, 1).numpy()
    peak = np.abs(r).max((1, 2, 3))  # max|r| of each image
    assert len(set(peak.round(6))) > 2  # panels of different strengths, to tell the scales apart
    # image scale: every panel reaches black or white; shared: only the strongest does, the others in proportion
    np.testing.assert_allclose(np.abs(own.shown - 0.5).max((1, 2, 3)), 0.5 * (peak > 0), atol=1e-6)
    np.testing.assert_allclose(np.abs(shared.shown - 0.5).max((1, 2, 3)), 0.5 * peak / peak.max(), atol=1e-6)
    np.testing.assert_allclose((shared.shown - 0.5) * 2 * peak.max(), r, atol=1e-6 * peak.max())
    assert shared.m.tolist() == pytest.approx([peak.max()] * 12) and own.m.tolist() == pytest.approx(peak.tolist())


def test_feature_maps_of_a_large_stage_are_its_most_active_channels_labelled(plot_run, monkeypatch):
    monkeypatch.setattr(figures, "FEATURE_MAP_TILES", 16)  # conv5_x of width 8 has 64 channels: show 16
    run = plot_run
    fmaps = captured(run.model, run.images[[5]], "conv5_x")[0]
    peaks = fmaps.amax((1, 2))
    t = figures.feature_map_tiles(run, 5, "conv5_x")
    torch.testing.assert_close(t.maps, fmaps, rtol=1e-5, atol=1e-5)
    chosen, rest = t.channels, [c for c in range(64) if c not in t.channels]
    assert len(set(chosen)) == 16 and peaks[chosen].min() >= peaks[rest].max()  # the 16 largest maxima...
    assert peaks[chosen].tolist() == sorted(peaks[chosen].tolist(), reverse=True)  # ...most active first
    for c, label in zip(chosen, t.labels, strict=True):
        index, value = label.split(": ")
        assert int(index) == c and float(value) == pytest.approx(peaks[c].item(), rel=5e-3, abs=1e-6)
    assert t.name == "conv5_x_feature_maps_image5"
    # a stage of few channels shows them all in index order, found by the row and column ticks
    t = figures.feature_map_tiles(run, 5, "conv1")
    assert t.channels == list(range(8)) and t.labels is None
    # channels chosen by hand: in their order, named in the file
    t = figures.feature_map_tiles(run, 5, "conv5_x", [7, 2, 3])
    assert t.channels == [7, 2, 3] and t.name == "conv5_x_feature_maps_image5_channels7,2-3"


@pytest.mark.parametrize("n, labelled", [(64, False), (512, False), (7, True), (64, True)])
def test_every_map_of_a_mosaic_can_be_found_by_its_index(n, labelled):
    maps = torch.arange(n, dtype=torch.float32).view(n, 1, 1).expand(n, 2, 2)  # map i holds the value i
    fig = drawing.new_figure(11, 5.6)
    ax = fig.add_subplot()
    labels = [f"{i}: x" for i in range(n)] if labelled else None
    drawing.show_mosaic(fig, ax, maps, labels=labels, index_ticks=not labelled)
    mosaic = ax.get_images()[0].get_array()  # the gaps are masked
    found = []
    if labelled:  # straight below each label, the first map is the labelled one
        assert [t.get_text() for t in ax.texts] == labels
        for text in ax.texts:
            x, y = text.get_position()
            below = mosaic[round(y):, round(x)]
            found.append(below.compressed()[0])
            assert found[-1] == int(text.get_text().split(":")[0])
    else:  # the map at row label r and column label +c is map r + c
        rows = [int(t.get_text()) for t in ax.get_yticklabels()]
        cols = [int(t.get_text()) for t in ax.get_xticklabels()]
        for y, r in zip(ax.get_yticks(), rows):
            for x, c in zip(ax.get_xticks(), cols):
                if r + c < n:
                    found.append(mosaic[round(y), round(x)])
                    assert found[-1] == r + c
    assert sorted(found) == list(range(n))


def chosen_channels(text, model, layer):
    """--channels as a script takes it: parsed, checked against the network (PlotParser.load), then `layer`'s."""
    choice = cli.channel_choice(text)
    choice.check(model, [layer])
    return choice.of(model, layer)


def test_channel_lists():
    model = ResNet(8)
    assert chosen_channels("auto", model, "conv5_x") is None
    assert chosen_channels("all", model, "conv3_x") == list(range(16))
    assert chosen_channels("0-2,7", model, "conv1") == [0, 1, 2, 7]
    for indices in ([0, 1, 2, 5], [7, 2, 3], [4], [3, 4, 5, 6, 1, 1]):
        assert cli.parse_indices(drawing.format_indices(indices)) == indices
    with pytest.raises(utils.UserError, match=r"--channels: channel 64 is out of range.*0\.\.63"):
        chosen_channels("60-64", model, "conv5_x")
