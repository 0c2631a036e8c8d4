"""The plot scripts and their shared code in visualize.py: scores, gradient ascent, figures, bad input."""
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from matplotlib.image import imread

import bench
import data
import utils
import visualize
from conftest import run_script
from model import ResNet


@pytest.fixture(scope="module")
def test_images(synthetic_data_dir):
    return data.load_cifar10(data.dataset_root(synthetic_data_dir, True), train=False)[0]


# --------------------------------------------------------------------------- scores and gradient ascent

@pytest.mark.parametrize("layer, channel", [("conv1", 3), ("conv3_x", 5), ("conv5_x", 60)])
def test_top_activating_equals_the_one_image_at_a_time_loop(test_images, layer, channel):
    torch.manual_seed(0)
    model = ResNet(8).eval()
    images = test_images[:50]
    # the report's loop: each image alone through the whole network, the stage output captured
    loop_indices, loop = bench.per_image_top(model, images, layer, channel, k=len(images))
    assert loop.unique().numel() == len(loop) and loop.max() > 0  # a strict ranking to compare
    # batches of 16: three full ones and a partial one
    indices, scores = visualize.top_activating(model, images, layer, channel, k=10, batch_size=16)
    assert indices.tolist() == loop_indices[:10].tolist()
    torch.testing.assert_close(scores, loop[:10], rtol=1e-5, atol=1e-6)


def test_gradient_ascent_raises_the_activation_within_the_pixel_range(trained_checkpoint, test_images):
    model, _ = utils.load_checkpoint(trained_checkpoint)
    layer, channel = "conv5_x", 0
    (index,), _ = visualize.top_activating(model, test_images[:200], layer, channel)
    x0 = data.normalize(test_images[[index.item()]])
    results = {penalty: visualize.gradient_ascent(model, x0, layer, channel, steps=15, lr=0.05, penalty=penalty)
               for penalty in (0.0, 10.0)}
    with torch.no_grad():
        before = visualize.channel_scores(model, x0, layer, channel).item()
        after = visualize.channel_scores(model, results[0.0], layer, channel).item()
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
    rows, cols = visualize.grid_shape(n)
    assert rows <= cols <= rows + 1 and (rows - 1) * cols < n <= rows * cols
    maps = np.arange(n * 6, dtype=np.float32).reshape(n, 2, 3)
    mosaic = visualize.tile(maps, pad=1)
    assert mosaic.shape == (rows * 3 - 1, cols * 4 - 1)
    for i in range(n):
        r, c = divmod(i, cols)
        assert (mosaic[3 * r:3 * r + 2, 4 * c:4 * c + 3] == maps[i]).all()
    assert np.isnan(mosaic).sum() == mosaic.size - maps.size  # everything else is gap


def test_signed_display_maps_zero_to_grey_and_each_images_peak_to_an_end():
    r = torch.randn(4, 3, 5, 5) * torch.tensor([1.0, 10.0, 100.0, 1e-3]).view(4, 1, 1, 1)
    r[:, :, 0, 0] = 0
    shown = visualize.signed_to_display(r)  # (N, H, W, 3)
    assert shown.shape == (4, 5, 5, 3) and shown.min() >= 0 and shown.max() <= 1
    assert np.allclose(shown[:, 0, 0], 0.5)
    for image in shown:  # per image, the largest |r| reaches 0 or 1
        assert np.isclose(np.abs(image - 0.5).max(), 0.5)
    peak = np.abs(r.numpy()).max((1, 2, 3), keepdims=True).transpose(0, 2, 3, 1)
    np.testing.assert_allclose((shown - 0.5) * 2 * peak, r.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("text, expected", [("4531-4546", list(range(4531, 4547))), ("1,2,3", [1, 2, 3]),
                                            ("7", [7]), ("1, 5-7", [1, 5, 6, 7])])
def test_image_lists(text, expected):
    assert visualize.parse_indices(text) == expected


# --------------------------------------------------------------------------- the scripts, as a user runs them
# Each script starts Python and torch (~2-3 s); the runs are started together on a pool of two.

SCRIPT_ARGS = {
    "plot_conv1_filters.py": [],
    "plot_conv1_feature_map.py": ["--image-index", 5],
    "plot_conv5_feature_map.py": ["--image-index", 5],
    "plot_conv1_reconstructed_pattern.py": ["--images", "0-3,9"],
    "plot_conv5_reconstructed_pattern_shortcut.py": ["--images", "0-4"],
    "plot_conv5_reconstructed_pattern_trunk.py": ["--images", "0-4"],
    "plot_gradient_pattern.py": ["--steps", 20],
}


@pytest.fixture(scope="module")
def runs(trained_checkpoint, tmp_path_factory):
    """Every script on the trained width-8 checkpoint: the finished processes."""
    tmp = tmp_path_factory.mktemp("plots")
    jobs = {script: (script, [*args, "--checkpoint", trained_checkpoint, "--figures-dir", tmp / script])
            for script, args in SCRIPT_ARGS.items()}
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(run_script, script, *args) for name, (script, args) in jobs.items()}
        return {name: future.result() for name, future in futures.items()}, tmp


@pytest.mark.parametrize("script", SCRIPT_ARGS)
def test_script_writes_the_figures_it_prints(runs, script):
    procs, tmp = runs
    proc = procs[script]
    assert proc.returncode == 0, proc.stderr
    written = re.findall(r"^wrote (.+\.png)$", proc.stdout, flags=re.M)
    assert written and sorted(written) == sorted(str(p) for p in (tmp / script).iterdir())
    for path in written:
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.std() > 0.05, path


def test_conv1_filters_script_writes_each_input_channel_and_rgb(runs):
    procs, tmp = runs
    names = {p.name for p in (tmp / "plot_conv1_filters.py").iterdir()}
    assert names == {"conv1_filters_input_channel0.png", "conv1_filters_input_channel1.png",
                     "conv1_filters_input_channel2.png", "conv1_filters_rgb.png"}


def test_gradient_script_starts_from_the_top_image_and_raises_its_activation(runs, trained_checkpoint,
                                                                             test_images):
    out = runs[0]["plot_gradient_pattern.py"].stdout
    found = re.search(r"test image (\d+) .*excites conv5_x channel 0 most: feature-map sum ([\d.]+)", out)
    index, score = found.groups()
    model, _ = utils.load_checkpoint(trained_checkpoint)
    (expected_index,), (expected_score,) = visualize.top_activating(model, test_images, "conv5_x", 0)
    assert int(index) == expected_index.item() and float(score) == pytest.approx(expected_score.item(), abs=1e-4)
    before, after = map(float, re.search(r"activation: ([\d.]+) before, ([\d.]+) after 20 steps", out).groups())
    assert before == pytest.approx(float(score), abs=1e-4) and after > before
