"""Feature visualization: plot_feature_visualization.py and visualize/featurevis.py."""
import json
import math
import os

import pytest
import torch
from matplotlib.image import imread

import cifar10
import plot_feature_visualization
import checkpoint
import utils
from visualize import featurevis, page, scoring
from conftest import assert_one_line_error, run_in_process, run_script


@pytest.fixture(scope="module")
def trained(trained_checkpoint, synthetic_data_dir):
    """The trained width-8 model, its training data's colour statistics, and 2,000 test images."""
    model, _ = checkpoint.load_checkpoint(trained_checkpoint)
    root = cifar10.dataset_root(synthetic_data_dir, True)
    images = cifar10.load_cifar10(root, train=False)[0][:2000]
    return model, featurevis.colour_statistics(root), images


# --------------------------------------------------------------------------- the parts

def test_colour_statistics_are_the_training_pixels_and_cached(tmp_path, monkeypatch):
    train = cifar10.make_synthetic_images(300, seed=3)
    cifar10.write_cifar10_folder(tmp_path, *train, *cifar10.make_synthetic_images(10, seed=4), ["a"] * 10)
    mean, covariance = featurevis.colour_statistics(tmp_path)
    pixels = train[0].permute(1, 0, 2, 3).reshape(3, -1).double() / 255
    torch.testing.assert_close(mean, pixels.mean(1).float())
    torch.testing.assert_close(covariance, torch.cov(pixels, correction=0).float(), rtol=1e-5, atol=1e-7)
    assert (tmp_path / featurevis.COLOUR_STATISTICS_FILE).is_file()
    # the second call reads the cache, not the data ...
    monkeypatch.setattr(featurevis, "load_cifar10", lambda *a, **k: pytest.fail("the cache was not used"))
    cached = featurevis.colour_statistics(tmp_path)
    assert torch.equal(cached[0], mean) and torch.equal(cached[1], covariance)
    # ... until a training file changes
    batch = tmp_path / cifar10.CIFAR10_FOLDER / "data_batch_1"
    os.utime(batch, ns=(batch.stat().st_atime_ns, batch.stat().st_mtime_ns + 10 ** 9))
    monkeypatch.undo()
    torch.testing.assert_close(featurevis.colour_statistics(tmp_path)[1], covariance)


def test_fourier_image_colours_like_the_data_and_inverts_exactly():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 3, generator=g)
    covariance = a @ a.T / 10 + 0.01 * torch.eye(3)
    mean = torch.tensor([0.3, 0.5, 0.6])
    image = featurevis.FourierImage(mean, covariance)
    m = image.colour.double()
    # M M^T is the covariance up to one factor, that of its largest eigenvalue
    torch.testing.assert_close(m @ m.T, covariance.double() / torch.linalg.eigvalsh(covariance.double()).max(),
                               rtol=1e-5, atol=1e-6)
    # zero coefficients give the mean colour; unit coefficients give unit-variance decorrelated pixels
    flat = image.pixels(torch.zeros(image.shape(1)))
    torch.testing.assert_close(flat[0, :, 5, 7], mean)
    spectrum = torch.complex(*torch.randn(2, 64, 3, 32, 17, generator=g)) * image.scale
    assert torch.fft.irfft2(spectrum, s=(32, 32), norm="ortho").std().item() == pytest.approx(1, rel=0.05)
    # coefficients() is the inverse of pixels() on [eps, 1 - eps]
    pixels = torch.rand(2, 3, 32, 32, generator=g) * (1 - 2 * featurevis.FV_EPS) + featurevis.FV_EPS
    torch.testing.assert_close(image.pixels(image.coefficients(pixels)), pixels, rtol=0, atol=1e-5)
    # grey data (rank-1 covariance, as Fashion-MNIST in RGB): still invertible, colour damped
    grey = featurevis.FourierImage(mean, torch.full((3, 3), 0.1))
    torch.testing.assert_close(grey.pixels(grey.coefficients(pixels)), pixels, rtol=0, atol=1e-4)
    singular = torch.linalg.svdvals(grey.colour)
    assert singular[0] == pytest.approx(1) and singular[1:].max() < 0.05


def test_transforms_move_pixels_by_at_most_the_stated_ranges():
    g = torch.Generator().manual_seed(0)
    dot = torch.zeros(200, 1, 32, 32)
    dot[:, :, 9, 22] = 1  # a dot 7 px from the centre: zoom and rotation move it too
    moved = featurevis.random_transforms(dot, g)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    mass = moved.sum((1, 2, 3))
    y, x = ((moved[:, 0] * yy).sum((1, 2)) / mass, (moved[:, 0] * xx).sum((1, 2)) / mass)
    distance = torch.sqrt((y - 9) ** 2 + (x - 22) ** 2)
    # shift 2 px each way (2.83 diagonally), zoom 10 % of 9.9 px, rotation 5 degrees of 9.9 px
    radius = math.hypot(9 - 15.5, 22 - 15.5)
    bound = math.hypot(2, 2) + 0.1 * radius + radius * math.radians(5)
    assert distance.max() <= bound and distance.mean() > 0.5
    still = featurevis.random_transforms(dot, g, jitter=0, scale=(1, 1), degrees=0)
    torch.testing.assert_close(still, dot, rtol=0, atol=1e-6)


def test_objective_takes_each_images_own_channel():
    activations = torch.randn(4, 6, 3, 3)
    channels = [5, 0, 2, 2]
    torch.testing.assert_close(featurevis.objective_values(activations, torch.tensor(channels)),
                               torch.stack([activations[i, c].mean() for i, c in enumerate(channels)]))
    torch.testing.assert_close(featurevis.objective_values(activations, torch.tensor(channels), "neuron"),
                               torch.stack([activations[i, c, 1, 1] for i, c in enumerate(channels)]))


def test_high_frequency_share_of_known_images():
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    checkerboard = ((yy + xx) % 2).expand(1, 3, 32, 32)            # 0.5 cycles/pixel on each axis
    smooth = (0.5 + 0.3 * torch.cos(2 * math.pi * xx / 8)).expand(1, 3, 32, 32)  # 0.125 cycles/pixel
    noise = torch.rand(200, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    share = featurevis.high_frequency_share(torch.cat([checkerboard, smooth]))
    torch.testing.assert_close(share, torch.tensor([1.0, 0.0]), rtol=0, atol=1e-6)
    f = torch.sqrt(torch.fft.fftfreq(32)[:, None] ** 2 + torch.fft.fftfreq(32)[None] ** 2)
    expected = (f > 0.25).sum().item() / (f.numel() - 1)  # white noise: every frequency but DC alike
    assert featurevis.high_frequency_share(noise).mean().item() == pytest.approx(expected, abs=0.01)


def test_top_activating_scores_many_channels_in_one_pass(trained):
    model, _, images = trained
    channels = [3, 0, 7]
    indices, scores = scoring.top_activating(model, images[:300], "conv4_x", channels, k=2)
    assert indices.shape == scores.shape == (2, 3)
    for column, c in enumerate(channels):
        alone = scoring.top_activating(model, images[:300], "conv4_x", c, k=2)
        assert indices[:, column].tolist() == alone[0].tolist()
        torch.testing.assert_close(scores[:, column], alone[1])


# --------------------------------------------------------------------------- the properties

def test_patterns_are_reproducible_robust_and_smoother_than_pixel_ascent(trained):
    model, colour, images = trained
    layer, channels, steps, lr = "conv5_x", list(range(16)), 96, 0.1
    pixels, reached = featurevis.feature_visualization(model, layer, channels, colour, steps=steps, lr=lr, seed=0)
    assert pixels.shape == (16, 3, 32, 32) and 0 <= pixels.min() and pixels.max() <= 1
    assert all(p.grad is None for p in model.parameters())
    # the same seed gives the same images on a CPU; another seed does not
    short = dict(steps=10, lr=lr)
    again = [featurevis.feature_visualization(model, layer, channels, colour, **short, seed=s)[0] for s in (0, 0, 1)]
    assert torch.equal(again[0], again[1]) and (again[0] - again[2]).abs().max() > 0.05
    # robust: averaged over shifts of up to 2 px, most patterns beat the most exciting of 2,000 test
    # images (11 of 16 here; on the Fashion-MNIST network of the README, with the defaults, 15 of 16)
    top = scoring.top_activating(model, images, layer, channels)[0][0]
    rows = featurevis.feature_measures(model, layer, channels, "channel", pixels, images[top].float() / 255,
                                      *_pixel_baseline(model, layer, channels, colour, steps))
    assert sum(r["shifted"] > r["top_image"] for r in rows) >= 8
    # less speckle: a smaller share of the spectral energy above half the Nyquist frequency
    ours = sum(r["high_frequency"] for r in rows) / len(rows)
    plain = sum(r["high_frequency_pixel"] for r in rows) / len(rows)
    assert ours < 0.5 * plain


def _pixel_baseline(model, layer, channels, colour, steps):
    """(plain pixel-space gradient ascent from the same start, that start)."""
    origin = featurevis.feature_visualization(model, layer, channels, colour, steps=0, seed=0)[0]
    return featurevis.pixel_ascent(model, layer, channels, origin, steps, straight_through=True), origin


# --------------------------------------------------------------------------- the script

def test_script_from_top_images_writes_the_figure_and_patterns(trained_checkpoint, tmp_path, capsys):
    paths = plot_feature_visualization.main(["--checkpoint", str(trained_checkpoint), "--channels", "2,0-1",
                                             "--steps", "6", "--start", "top", "--figures-dir", str(tmp_path)])
    stem = "feature_visualization_conv5_x_top_channels2,0-1_steps6"  # every flag not at its default
    assert [p.name for p in paths] == [f"{stem}.png", f"{stem}.pt", f"{stem}.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)
    figure = imread(paths[0])
    assert figure.ndim == 3 and figure.shape[0] > 200 and figure.std() > 0.05
    saved = torch.load(paths[1], weights_only=True)
    assert saved["channels"] == [2, 0, 1] and saved["images"].shape == (3, 3, 32, 32)
    assert saved["images"].dtype == torch.float32 and 0 <= saved["images"].min() and saved["images"].max() <= 1
    assert f"wrote {paths[1]}" in capsys.readouterr().out


def test_script_measures(trained_checkpoint, tmp_path, capsys):
    paths = plot_feature_visualization.main(["--checkpoint", str(trained_checkpoint), "--channels", "1,3",
                                             "--steps", "4", "--objective", "neuron", "--measure",
                                             "--figures-dir", str(tmp_path)])
    stem = "feature_visualization_conv5_x_neuron_channels1,3_steps4"  # --measure only prints: not in the names
    assert [p.name for p in paths] == [f"{stem}.png", f"{stem}.pt", f"{stem}.json"]
    out = capsys.readouterr().out
    assert "for" in out and "of 2 channels" in out and "plain pixel-space gradient ascent with the same 4 steps" in out


@pytest.mark.parametrize("args, words", [
    (["--channels", "60-64"], ["--channels", "channel 64", "0..63"]),
    (["--channels", "three"], ["--channels", "0-15"]),
    (["--steps", "0"], ["--steps", "at least 1"]),
    (["--lr", "nan"], ["--lr", "finite", "nan"]),
    (["--penalty", "-1"], ["--penalty", "0 or above", "-1"]),
    (["--seed", str(2 ** 64)], ["--seed", "0..9223372036854775807"]),
])
def test_bad_values_name_the_flag_and_the_valid_range(trained_checkpoint, tmp_path, args, words):
    with pytest.raises(utils.UserError) as err:
        plot_feature_visualization.main([*args, "--checkpoint", str(trained_checkpoint), "--figures-dir", str(tmp_path)])
    assert all(word in str(err.value) for word in words), str(err.value)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_bad_input_gives_one_line(trained_checkpoint, tmp_path):
    proc = run_script("plot_feature_visualization.py", "--objective", "loudest", "--checkpoint", trained_checkpoint,
                      "--figures-dir", tmp_path)
    assert_one_line_error(proc, "--objective", "channel", "neuron")
    proc = run_script("plot_feature_visualization.py", "--channels", "0,99", "--checkpoint", trained_checkpoint,
                      "--figures-dir", tmp_path)
    assert_one_line_error(proc, "channel 99", "0..63")


def test_a_quick_feature_visualization_takes_fewer_steps_and_says_so(trained_checkpoint, tmp_path):
    proc = run_in_process("plot_feature_visualization.py", ["--checkpoint", str(trained_checkpoint), "--channels", "0",
                                                            "--quick", "--figures-dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "feature_visualization_conv5_x_channels0_quick.json").read_text())
    assert record["steps"] == featurevis.QUICK_FV_STEPS < featurevis.FV_STEPS
    assert record["figure"]["changed"] == {"--channels": "0", "--quick": True}
    (figure,) = page.classify_files(tmp_path)[0]["featurevis"]
    assert figure.caption.startswith(f"The quick run, a first look: {featurevis.QUICK_FV_STEPS} optimisation steps. ")
