"""Class evidence (visualize.attribution): the papers' known answers, each against an independent
reference, on small float64 networks (so identities hold to rounding), and the figure's bad input."""
import json

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import cifar10
import data
from conftest import assert_one_line_error, run_in_process
from model import ResNet
from visualize.attribution import ATTRIBUTION_METHODS, GRADCAM_LAYERS, attribute, check_options


def random_network(width=4, seed=0):
    """A float64 ResNet in eval mode whose BatchNorms have random statistics and affine weights, so
    that no stage is the identity-like map a freshly built network's BatchNorm is."""
    torch.manual_seed(seed)
    model = ResNet(width)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.4)
    return model.double().eval()


@pytest.fixture(scope="module")
def model():
    return random_network()


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


TARGETS = torch.tensor([0, 3, 7, 3])


def normalised(images):
    return data.normalize(images).double()


def logit(model, x, c):
    return model(x)[:, c]


def one_image_gradient(model, x, c):
    """dy_c/dx for one normalised image (1, 3, 32, 32), through model(x) itself."""
    x = x.clone().requires_grad_(True)
    logit(model, x, c).sum().backward()
    return x.grad


# --------------------------------------------------------------------------- Grad-CAM

def test_gradcam_at_conv5_x_is_cam(model, images):
    with model.capture("conv5_x") as acts:
        model(normalised(images))
    a = acts["conv5_x"].detach()  # (N, 8 width, 2, 2)
    w = model.fc.weight.detach()[TARGETS]  # (N, 8 width): w_ck of each image's class
    cam = F.relu(torch.einsum("nk,nkhw->nhw", w, a)) / (a.shape[2] * a.shape[3])
    assert cam.max() > 0  # something to compare
    got = attribute(model, images, TARGETS, "gradcam", layer="conv5_x", upsample=False)
    assert got.shape == (4, 2, 2) and got.dtype == torch.float64
    torch.testing.assert_close(got, cam, rtol=1e-12, atol=1e-14)
    upsampled = F.interpolate(cam[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(attribute(model, images, TARGETS, "gradcam", layer="conv5_x"), upsampled,
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("layer", ["conv2_x", "conv3_x", "conv4_x"])
def test_gradcam_equals_the_papers_formula_one_image_at_a_time_through_hooks(model, images, layer):
    """alpha_k = mean_ij dy_c/dA_kij, ReLU(sum_k alpha_k A_k), with A captured by forward hooks on model(x)."""
    expected = []
    for i, c in enumerate(TARGETS.tolist()):
        with model.capture(layer) as acts:
            y = logit(model, normalised(images[[i]]), c)
        grads = torch.autograd.grad(y.sum(), acts[layer])[0][0]  # (K, H, W)
        alpha = grads.mean((1, 2))
        expected.append(F.relu((alpha[:, None, None] * acts[layer][0].detach()).sum(0)))
    expected = torch.stack(expected)
    got = attribute(model, images, TARGETS, "gradcam", layer=layer, upsample=False, batch_size=3)
    assert got.shape == expected.shape == (4, *{"conv2_x": (16, 16), "conv3_x": (8, 8), "conv4_x": (4, 4)}[layer])
    assert (expected > 0).any() and (expected == 0).any()  # the ReLU acts
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- gradients

def test_saliency_is_each_images_own_gradient(model, images):
    expected = torch.cat([one_image_gradient(model, normalised(images[[i]]), c) for i, c in enumerate(TARGETS)])
    for batch_size in (1, 3, 100):  # a partial last batch, and all in one
        got = attribute(model, images, TARGETS, "saliency", batch_size=batch_size)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)


def test_smoothgrad_with_sigma_0_is_saliency(model, images):
    saliency = attribute(model, images, TARGETS, "saliency")
    smooth = attribute(model, images, TARGETS, "smoothgrad", n=5, sigma=0.0)
    torch.testing.assert_close(smooth, saliency, rtol=1e-12, atol=1e-14)


def test_smoothgrad_is_seeded_and_the_same_for_every_batch_size(model, images):
    first = attribute(model, images, TARGETS, "smoothgrad", n=6, sigma=0.2, seed=3, batch_size=4)
    again = attribute(model, images, TARGETS, "smoothgrad", n=6, sigma=0.2, seed=3, batch_size=7)
    other = attribute(model, images, TARGETS, "smoothgrad", n=6, sigma=0.2, seed=4, batch_size=4)
    torch.testing.assert_close(first, again, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(first, other)
    # the noise is there: not the saliency map
    assert not torch.allclose(first, attribute(model, images, TARGETS, "saliency"))


def test_smoothgrad_is_the_mean_gradient_at_noisy_copies_of_the_images_range(model, images):
    """One copy (n=1) is the gradient at x + e, e ~ N(0, (sigma (max x - min x))^2): recover e from the
    seeded generator as the docstring states it is drawn, and compare with the gradient there."""
    x = normalised(images)
    sigma = 0.1
    e = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    spread = sigma * (x.flatten(1).max(1).values - x.flatten(1).min(1).values).view(-1, 1, 1, 1)
    noisy = x + spread * e
    expected = torch.cat([one_image_gradient(model, noisy[[i]], c) for i, c in enumerate(TARGETS)])
    got = attribute(model, images, TARGETS, "smoothgrad", n=1, sigma=sigma, seed=0)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)


def test_integrated_gradients_completeness_tightens_as_m_grows(model, images):
    """sum of the map -> y_c(x) - y_c(x') (Sundararajan et al.'s completeness), x' = 0 by default."""
    x = normalised(images)
    with torch.no_grad():
        difference = logit(model, x, TARGETS).diagonal() - logit(model, torch.zeros_like(x), TARGETS).diagonal()
    errors = []
    for m in (2, 16, 128):
        maps = attribute(model, images, TARGETS, "integrated_gradients", m=m)
        errors.append((maps.sum((1, 2, 3)) - difference).abs().max().item())
    scale = difference.abs().max().item()
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.02 * scale, (errors, scale)


def test_integrated_gradients_is_a_right_riemann_sum_from_the_given_baseline(model, images):
    """m=1: the single point k/m = 1 is x itself, so the map is (x - x') * dy_c/dx (x); a left sum would
    take the gradient at the baseline. And completeness holds for a baseline of one's own."""
    x = normalised(images)
    black = data.normalize(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).double()
    saliency = attribute(model, images, TARGETS, "saliency")
    got = attribute(model, images, TARGETS, "integrated_gradients", m=1, baseline=black)
    torch.testing.assert_close(got, (x - black) * saliency, rtol=1e-12, atol=1e-14)
    maps = attribute(model, images, TARGETS, "integrated_gradients", m=256, baseline=black)
    with torch.no_grad():
        difference = logit(model, x, TARGETS).diagonal() - logit(model, black.expand_as(x), TARGETS).diagonal()
    assert (maps.sum((1, 2, 3)) - difference).abs().max() < 0.02 * difference.abs().max()


# --------------------------------------------------------------------------- occlusion

def occlusion_loop(model, images, k, s, baseline):
    """Zeiler & Fergus's experiment one image and one window at a time, through model(x), with the
    windows placed as the docstring says: 0, s, 2s, ... while they fit, and one flush with the edge."""
    starts = sorted(set(range(0, 32 - k + 1, s)) | {32 - k})
    out = torch.zeros(len(images), 32, 32, dtype=torch.float64)
    for i, c in enumerate(TARGETS.tolist()):
        x = normalised(images[[i]])
        with torch.no_grad():
            reference = logit(model, x, c).item()
            total, count = torch.zeros(32, 32, dtype=torch.float64), torch.zeros(32, 32, dtype=torch.float64)
            for top in starts:
                for left in starts:
                    occluded = x.clone()
                    occluded[..., top:top + k, left:left + k] = baseline[..., top:top + k, left:left + k]
                    total[top:top + k, left:left + k] += reference - logit(model, occluded, c).item()
                    count[top:top + k, left:left + k] += 1
        out[i] = total / count
    return out


@pytest.mark.parametrize("k, s, batch_size", [(8, 5, 7), (5, 3, 1000), (32, 1, 2)])
def test_occlusion_equals_the_window_by_window_loop(model, images, k, s, batch_size):
    zero = torch.zeros(1, 3, 32, 32, dtype=torch.float64)
    got = attribute(model, images, TARGETS, "occlusion", k=k, s=s, batch_size=batch_size)
    torch.testing.assert_close(got, occlusion_loop(model, images, k, s, zero), rtol=1e-9, atol=1e-12)
    if k == 32:  # one window, the whole image: y_c(x) - y_c(x') everywhere
        with torch.no_grad():
            x = normalised(images)
            difference = logit(model, x, TARGETS).diagonal() - logit(model, torch.zeros_like(x), TARGETS).diagonal()
        torch.testing.assert_close(got, difference.view(-1, 1, 1).expand(-1, 32, 32), rtol=1e-12, atol=1e-12)


def test_occlusion_with_a_baseline_of_ones_own(model, images):
    black = data.normalize(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).double()
    got = attribute(model, images, TARGETS, "occlusion", k=10, s=7, baseline=black)
    torch.testing.assert_close(got, occlusion_loop(model, images, 10, 7, black), rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- how it is called

def test_every_method_works_under_inference_mode_and_a_float32_network_gives_float32(images):
    model = random_network(seed=2).float()
    few = {"smoothgrad": {"n": 2}, "integrated_gradients": {"m": 2}}
    for method in ATTRIBUTION_METHODS:
        plain = attribute(model, images, 5, method, **few.get(method, {}))
        with torch.inference_mode():
            inside = attribute(model, images, 5, method, **few.get(method, {}))
        assert plain.dtype == torch.float32 and plain.shape[0] == 4
        torch.testing.assert_close(inside, plain)
    assert all(p.grad is None for p in model.parameters())  # the weights' gradients are never taken


@pytest.mark.parametrize("method, layer, options, words", [
    ("lime", "conv4_x", {}, ["unknown attribution method 'lime'", ", ".join(ATTRIBUTION_METHODS)]),
    ("saliency", "conv4_x", {"n": 5}, ["saliency takes no option 'n'", "batch_size"]),
    ("gradcam", "conv1", {}, ["'conv1'", ", ".join(GRADCAM_LAYERS)]),
    ("smoothgrad", "conv4_x", {"n": 0}, ["n 0", "at least 1"]),
    ("smoothgrad", "conv4_x", {"sigma": -0.1}, ["sigma -0.1", "at least 0"]),
    ("smoothgrad", "conv4_x", {"sigma": float("nan")}, ["sigma nan", "finite"]),
    ("integrated_gradients", "conv4_x", {"m": 2.5}, ["m 2.5", "whole number"]),
    ("occlusion", "conv4_x", {"k": 33}, ["k 33", "1..32"]),
    ("occlusion", "conv4_x", {"s": 0}, ["s 0", "1..32"]),
])
def test_bad_options_are_one_line_naming_the_valid_values(method, layer, options, words):
    with pytest.raises(ValueError) as err:
        check_options(method, options, layer)
    for word in words:
        assert word in str(err.value)
    assert "\n" not in str(err.value)


def test_a_target_out_of_range_is_refused(model, images):
    with pytest.raises(ValueError, match=r"target class 10 is out of range.*0\.\.9"):
        attribute(model, images, torch.tensor([0, 1, 10, 2]), "saliency")


# --------------------------------------------------------------------------- plot_class_evidence.py

SCRIPT = "plot_class_evidence.py"
QUICK = ["--images", "3,10,11", "--samples", "2", "--steps", "2", "--window", "16", "--stride", "16"]


def test_the_figures_json_holds_each_images_classes_probability_and_maps(trained_checkpoint, tmp_path, one_thread):
    model, ckpt = checkpoint.load_checkpoint(trained_checkpoint)
    classes = ckpt["config"]["classes"]
    images, labels, _ = cifar10.load_cifar10(cifar10.dataset_root(ckpt["config"]["data_dir"], True), train=False)
    proc = run_in_process(SCRIPT, ["--checkpoint", str(trained_checkpoint), "--figures-dir", str(tmp_path),
                                   "--target", classes[4], "--methods", "occlusion,gradcam,saliency",
                                   "--layer", "conv5_x", *QUICK])
    assert proc.returncode == 0, proc.stderr
    # every choice that is not the default is in the name, the options only of the methods drawn
    stem = "class_evidence_images3,10-11_target4_methods-occlusion+gradcam+saliency_layer-conv5_x_window16_stride16"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}.json", f"{stem}.png"]
    record = json.loads((tmp_path / f"{stem}.json").read_text())
    assert record["images"] == [3, 10, 11] and record["target"] == 4
    assert record["methods"] == ["occlusion", "gradcam_conv5_x", "saliency"]
    assert record["options"] == {"k": 16, "s": 16}  # attribute's names
    x = data.normalize(images[[3, 10, 11]])
    with torch.no_grad():
        probabilities = model(x).softmax(1)
    targets = torch.full((3,), 4)
    for i, entry in enumerate(record["per_image"]):
        index = record["images"][i]
        assert entry["index"] == index and entry["true"] == labels[index]
        assert entry["true_name"] == classes[labels[index]]
        assert entry["predicted"] == probabilities[i].argmax().item()
        assert entry["predicted_name"] == classes[entry["predicted"]]
        assert entry["probability"] == pytest.approx(probabilities[i].max().item(), rel=1e-5)
        assert entry["target"] == 4 and entry["target_name"] == classes[4]
        assert entry["target_probability"] == pytest.approx(probabilities[i, 4].item(), rel=1e-5)
    expected = {"occlusion": attribute(model, images[[3, 10, 11]], targets, "occlusion", k=16, s=16),
                "gradcam_conv5_x": attribute(model, images[[3, 10, 11]], targets, "gradcam", layer="conv5_x"),
                "saliency": attribute(model, images[[3, 10, 11]], targets, "saliency")}
    for key, maps in expected.items():  # the float32s themselves, read back exactly
        written = torch.tensor([entry["maps"][key] for entry in record["per_image"]], dtype=torch.float32)
        assert torch.equal(written, maps), key


def test_the_default_target_is_the_predicted_class_and_true_the_label(trained_checkpoint, tmp_path):
    model, ckpt = checkpoint.load_checkpoint(trained_checkpoint)
    for target in ("predicted", "true"):
        proc = run_in_process(SCRIPT, ["--checkpoint", str(trained_checkpoint), "--figures-dir", str(tmp_path),
                                       "--target", target, "--methods", "gradcam", *QUICK])
        assert proc.returncode == 0, proc.stderr
    stems = {"predicted": "class_evidence_images3,10-11_methods-gradcam",
             "true": "class_evidence_images3,10-11_target-true_methods-gradcam"}
    for target, stem in stems.items():
        record = json.loads((tmp_path / f"{stem}.json").read_text())
        assert record["methods"] == ["gradcam_conv4_x", "gradcam_conv3_x"]  # the default --layer, in its order
        key = "predicted" if target == "predicted" else "true"
        assert all(entry["target"] == entry[key] for entry in record["per_image"])


# (flag arguments, words the one line must hold); each run on the trained checkpoint, exit status 2
BAD_FLAGS = [
    (["--target", "10"], ["--target 10 is out of range", "10 classes", "0..9"]),
    (["--target", "-1"], ["--target -1 is out of range", "0..9"]),
    (["--target", "synthetic-grating"], ["--target 'synthetic-grating' is not a class", "predicted, true",
                                         "synthetic-grating-0deg, synthetic-grating-18deg"]),
    (["--methods", "saliency,lime"], ["--methods 'lime'", ", ".join(ATTRIBUTION_METHODS)]),
    (["--methods", ","], ["--methods ','", ", ".join(ATTRIBUTION_METHODS)]),
    (["--layer", "conv1"], ["--layer 'conv1'", ", ".join(GRADCAM_LAYERS)]),
    (["--layer", "conv4_x,conv9_x"], ["--layer 'conv9_x'", ", ".join(GRADCAM_LAYERS)]),
    (["--samples", "0"], ["--samples 0", "at least 1"]),
    (["--steps", "-3"], ["--steps -3", "at least 1"]),
    (["--window", "0"], ["--window 0", "1..32"]),
    (["--window", "33"], ["--window 33", "1..32"]),
    (["--stride", "0"], ["--stride 0", "1..32"]),
    (["--sigma", "-0.1"], ["--sigma -0.1", "at least 0"]),
    (["--sigma", "inf"], ["--sigma inf", "finite"]),
    (["--seed", "-1"], ["--seed -1", "0..9223372036854775807"]),
    (["--samples", "two"], ["--samples", "invalid int value"]),
    (["--images", "9999-10000"], ["10000", "0..9999"]),
]


@pytest.mark.parametrize("args, words", BAD_FLAGS, ids=[" ".join(args) for args, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_line_naming_the_valid_values_and_writes_nothing(trained_checkpoint, tmp_path, args, words):
    proc = run_in_process(SCRIPT, ["--checkpoint", str(trained_checkpoint), "--figures-dir", str(tmp_path / "figures"),
                                   *args])
    assert proc.returncode == 2
    assert_one_line_error(proc, *words)
    assert not (tmp_path / "figures").exists() or not any((tmp_path / "figures").iterdir())
