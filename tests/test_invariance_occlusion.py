"""Zeiler & Fergus's invariance and occlusion experiments (visualize.invariance, visualize.occlusion):
the identity transforms change nothing, a translation is a shift of the array, a rotation by 90 degrees
is rot90, the distances are those of the representations computed one image at a time, and the
occlusion maps are those of a loop that occludes one position at a time; every ranged flag's bad value
gets one line. Small float64 networks with random BatchNorm statistics (test_attribution's)."""
import json
import math

import pytest
import torch

from conftest import assert_one_line_error, run_in_process
from data import normalize
from test_attribution import random_network
from utils import UserError
from visualize import invariance
from visualize.invariance import Sweep, affine_matrices, parse_sweep, transform
from visualize.occlusion import occlusion_maps, square_centres


@pytest.fixture(scope="module")
def model():
    return random_network(width=4, seed=3)


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))


LABELS = torch.tensor([2, 0, 9])


# --------------------------------------------------------------------------- invariance

def test_the_identity_transforms_give_distance_0_and_the_unperturbed_probability(model, images):
    sweeps = {"translation": Sweep(0, 0, 1), "scale": Sweep(1, 1, 1), "rotation": Sweep(0, 360, 360)}
    curves, (norms, p_original) = invariance.invariance(model, images, LABELS, sweeps, batch_size=4)
    assert curves["rotation"].values == [0, 360]
    for c in curves.values():
        for name in invariance.REPRESENTATIONS:
            assert c.distance[name].abs().max() < 1e-12 * norms[name].max()
            assert c.relative[name].abs().max() < 1e-12
        torch.testing.assert_close(c.probability, p_original.expand_as(c.probability), rtol=1e-12, atol=1e-15)
    with torch.no_grad():
        expected = model(normalize(images).double()).softmax(1)[torch.arange(3), LABELS]
    torch.testing.assert_close(p_original, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("shift", [-8, -3, 1, 5, 32])
def test_a_translation_is_the_array_shifted_and_its_border_filled_with_the_mean_colour(images, shift):
    x = normalize(images).double()
    moved = transform(x, affine_matrices("translation", [shift]).expand(len(x), 2, 3))
    expected = torch.zeros_like(x)  # 0 in normalised space: the data's mean colour
    if shift >= 0:
        expected[..., shift:, :] = x[..., :32 - shift, :]
    else:
        expected[..., :32 + shift, :] = x[..., -shift:, :]
    torch.testing.assert_close(moved, expected, rtol=0, atol=1e-12)


def test_a_rotation_by_90_degrees_is_rot90_counter_clockwise_and_scale_2_enlarges_about_the_centre(images):
    x = normalize(images).double()
    turned = transform(x, affine_matrices("rotation", [90]).expand(len(x), 2, 3))
    torch.testing.assert_close(turned, torch.rot90(x, 1, dims=(2, 3)), rtol=0, atol=1e-12)
    # enlarged twice about the centre 15.5: output pixel 16 reads input position 15.75 (bilinear: 1/4 of 15, 3/4 of 16)
    enlarged = transform(x, affine_matrices("scale", [2]).expand(len(x), 2, 3))
    torch.testing.assert_close(enlarged[..., 16, 16], (0.25 * 0.25 * x[..., 15, 15] + 0.75 * 0.25 * x[..., 16, 15]
                                                       + 0.25 * 0.75 * x[..., 15, 16] + 0.75 * 0.75 * x[..., 16, 16]))


def test_the_distances_are_those_of_each_transformed_image_on_its_own(model, images):
    sweeps = {"translation": Sweep(-2, 4, 3), "rotation": Sweep(30, 30, 1)}
    curves, (norms, _) = invariance.invariance(model, images, LABELS, sweeps, batch_size=2)
    assert list(curves) == ["translation", "rotation"] and curves["translation"].values == [-2, 1, 4]

    def reps(x):  # conv1, conv5_x and the pooled features, through the modules one by one
        with torch.no_grad():
            a = model.conv1(x)
            b = model.conv5_x(model.conv4_x(model.conv3_x(model.conv2_x(a))))
            return {"conv1": a.flatten(), "conv5_x": b.flatten(), "pooled": b.mean((2, 3)).flatten()}, model(x)
    for kind, c in curves.items():
        for k, value in enumerate(c.values):
            for i in range(len(images)):
                x = normalize(images[[i]]).double()
                original, _ = reps(x)
                moved, logits = reps(transform(x, affine_matrices(kind, [value])))
                for name in invariance.REPRESENTATIONS:
                    distance = (moved[name] - original[name]).norm()
                    torch.testing.assert_close(c.distance[name][k, i], distance, rtol=1e-10, atol=1e-12)
                    torch.testing.assert_close(c.relative[name][k, i], distance / original[name].norm(), rtol=1e-10,
                                               atol=1e-12)
                    torch.testing.assert_close(norms[name][i], original[name].norm(), rtol=1e-12, atol=0)
                torch.testing.assert_close(c.probability[k, i], logits.softmax(1)[0, LABELS[i]], rtol=1e-10,
                                           atol=1e-14)


@pytest.mark.parametrize("text, kind, values", [("0.6:1.6:0.05", "scale", 21), ("-8:8:1", "translation", 17),
                                                ("0:360:10", "rotation", 37), ("0:1:0.3", "scale", None)])
def test_a_sweep_runs_from_first_to_last_by_step(text, kind, values):
    if values is None:  # 0 is no scale
        with pytest.raises(UserError, match="0.1..10"):
            parse_sweep(text, kind)
        return
    sweep = parse_sweep(text, kind)
    assert len(sweep.values) == values and sweep.values[0] == sweep.first and sweep.values[-1] == sweep.last
    assert str(sweep) == text and all(math.isclose(b - a, sweep.step) for a, b in zip(sweep.values, sweep.values[1:]))


# --------------------------------------------------------------------------- occlusion

@pytest.mark.parametrize("k, s, batch_size", [(8, 7, 7), (32, 1, 100)])
def test_occlusion_maps_equal_the_loop_that_occludes_one_position_at_a_time(model, images, k, s, batch_size):
    images = images[:2]
    maps = occlusion_maps(model, images, LABELS[:2], k, s, batch_size)
    starts = sorted(set(range(0, 32 - k + 1, s)) | {32 - k})
    assert maps.starts == starts
    for i in range(len(images)):
        x = normalize(images[[i]]).double()
        with torch.no_grad():
            unoccluded = model.conv5_x(model.conv4_x(model.conv3_x(model.conv2_x(model.conv1(x)))))
            channel = int(unoccluded.sum((2, 3)).argmax())
            assert int(maps.channel[i]) == channel
            torch.testing.assert_close(maps.total[i], unoccluded[0, channel].sum())
            for r, top in enumerate(starts):
                for c, left in enumerate(starts):
                    occluded = x.clone()
                    occluded[..., top:top + k, left:left + k] = 0  # the mean colour
                    features = model.conv5_x(model.conv4_x(model.conv3_x(model.conv2_x(model.conv1(occluded)))))
                    logits = model(occluded)[0]
                    torch.testing.assert_close(maps.activation[i, r, c], features[0, channel].sum(),  # (b)
                                               rtol=1e-10, atol=1e-12)
                    torch.testing.assert_close(maps.occluded_logits[i, r, c], logits, rtol=1e-10, atol=1e-12)
                    torch.testing.assert_close(maps.probability[i, r, c], logits.softmax(0)[LABELS[i]],  # (d)
                                               rtol=1e-10, atol=1e-14)
                    assert maps.predicted[i, r, c] == logits.argmax()  # (e)


def test_the_most_probable_class_is_the_argmax_of_the_logits_behind_the_probability(model, images):
    maps = occlusion_maps(model, images, LABELS, 6, 3)
    assert torch.equal(maps.predicted, maps.occluded_logits.argmax(-1))
    expected = torch.stack([maps.occluded_logits[i].softmax(-1)[..., LABELS[i]] for i in range(len(images))])
    torch.testing.assert_close(maps.probability, expected, rtol=1e-12, atol=1e-15)


def test_each_value_is_drawn_at_its_squares_centre():
    # squares at 0, 4, ..., 24 of side 8: centres 3.5, 7.5, ..., 27.5, cells 4 wide around them
    assert square_centres(list(range(0, 25, 4)), 8).tolist() == [1.5, 5.5, 9.5, 13.5, 17.5, 21.5, 25.5, 29.5]
    assert square_centres([0], 32).tolist() == [-0.5, 31.5]  # one square, the whole image


# --------------------------------------------------------------------------- the scripts

BAD_FLAGS = [
    ("plot_occlusion.py", ["--size", "0"], ["--size 0", "1..32"]),
    ("plot_occlusion.py", ["--size", "33"], ["--size 33", "1..32"]),
    ("plot_occlusion.py", ["--stride", "0"], ["--stride 0", "1..32"]),
    ("plot_occlusion.py", ["--stride", "40"], ["--stride 40", "1..32"]),
    ("plot_occlusion.py", ["--images", "1-99"], ["at most 64"]),
    ("plot_invariance.py", ["--translation=-8:8"], ["--translation", "first:last:step"]),
    ("plot_invariance.py", ["--translation=-8:8:0"], ["--translation", "has no step"]),
    ("plot_invariance.py", ["--scale", "1.6:0.6:0.1"], ["--scale", "has no step"]),
    ("plot_invariance.py", ["--rotation", "0:360:-10"], ["--rotation", "has no step"]),
    ("plot_invariance.py", ["--translation=-40:0:1"], ["--translation", "-32..32"]),
    ("plot_invariance.py", ["--scale", "0:2:0.5"], ["--scale", "0.1..10"]),
    ("plot_invariance.py", ["--rotation", "0:360:nan"], ["--rotation", "finite"]),
    ("plot_invariance.py", ["--rotation", "0:3600:1"], ["--rotation", "at most 1000"]),
]


@pytest.mark.parametrize("script, args, words", BAD_FLAGS)
def test_every_ranged_flag_out_of_range_gets_one_line(tmp_path, script, args, words):
    proc = run_in_process(script, [*args, "--checkpoint", str(tmp_path / "none.pt"), "--figures-dir", str(tmp_path)])
    assert_one_line_error(proc, *words)
    assert list(tmp_path.iterdir()) == []


def test_the_scripts_write_their_figures_and_json_named_by_their_flags(trained_checkpoint, tmp_path):
    proc = run_in_process("plot_occlusion.py", ["--checkpoint", str(trained_checkpoint), "--figures-dir",
                                                str(tmp_path), "--images", "3,7", "--stride", "6"])
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "occlusion_images3,7_stride6.json").read_text(encoding="utf-8"))
    assert record["figure"]["changed"] == {"--images": "3,7", "--stride": "6"}
    assert record["starts"] == [0, 6, 12, 18, 24] and [r["index"] for r in record["per_image"]] == [3, 7]
    assert len(record["per_image"][0]["true_probability"]) == 5 and len(record["per_image"][0]["predicted"][0]) == 5
    assert record["per_image"][0]["projections"]["images"][0] == 3
    proc = run_in_process("plot_invariance.py", ["--checkpoint", str(trained_checkpoint), "--figures-dir",
                                                 str(tmp_path), "--images", "0-1", "--translation=-2:2:2",
                                                 "--scale", "1:1.5:0.5", "--rotation", "0:90:90"])
    assert proc.returncode == 0, proc.stderr
    stem = "invariance_images0-1_translation--2-2-2_scale1-1.5-0.5_rotation0-90-90"
    record = json.loads((tmp_path / f"{stem}.json").read_text(encoding="utf-8"))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("invariance")) == [f"{stem}.json",
                                                                                             f"{stem}.png"]
    assert record["transformations"]["translation"]["values"] == [-2, 0, 2]
    assert record["transformations"]["translation"]["distance"]["pooled"][1] == [0.0, 0.0]  # the identity
    assert record["figure"]["command"].startswith(
        "python plot_invariance.py --images 0-1 --translation=-2:2:2 --scale 1:1.5:0.5 --rotation 0:90:90 ")
