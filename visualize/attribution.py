"""Class evidence: which pixels made the network give class c its logit, for each of a batch of images.

    maps = attribute(model, images, targets, method, layer="conv4_x", **options)

images are uint8 (N, 3, 32, 32) as scoring.top_activating takes them (on any device); targets the class
of each image (N,), or one class for all. Every map is of the logit y_c before the softmax, with
respect to the normalised input x = data.normalize(images) that the network sees, and is returned on
the model's device in the model's dtype (float32 for every checkpoint; the tests run float64 copies to
pin identities tightly). The model must be in eval mode: BatchNorm is then a fixed affine map and each
image's logits depend on that image alone, which is what lets a batch be differentiated as one sum.

The methods and the conventions chosen where the papers leave a choice:

    gradcam               Selvaraju et al. 2017. A = the output of stage `layer`, one of conv2_x..conv5_x
                          (its last block's ReLU(trunk + shortcut), K channels of H x W),
                          alpha_k = mean over the H x W positions of dy_c/dA_k, map = ReLU(sum_k alpha_k A_k),
                          (N, H, W) at the stage's resolution. upsample=True (default): resized to 32x32
                          by bilinear interpolation with align_corners=False (F.interpolate), after the
                          ReLU. Not normalised (no division by its max). At conv5_x, whose output feeds
                          the average pool and fc alone, dy_c/dA_k = w_ck / (H W) at every position, so
                          Grad-CAM is CAM, ReLU(sum_k w_ck A_k) / (H W) (tested).
    saliency              dy_c/dx, (N, 3, 32, 32), signed, not normalised (Simonyan et al. 2014's
                          gradient, before their max over colour).
    smoothgrad            Smilkov et al. 2017: (1/n) sum_{i=1..n} dy_c/dx (x + e_i), e_i ~ N(0, s^2) i.i.d.
                          per pixel and colour, with s = sigma * (max(x) - min(x)), the max and min over the
                          image's own normalised values (all colours): the paper's noise level sigma /
                          (x_max - x_min), as its authors' code computes it. Options n=50, sigma=0.15 (the
                          paper's 10-20 %), seed=0: the noise comes from a CPU torch.Generator seeded with
                          it, drawn sample by sample as (N, 3, 32, 32) in the order i = 1..n, so it is
                          the same on every device and for every batch_size. The gradient, not its square
                          or its absolute value, is averaged. sigma=0 is saliency exactly (tested).
    integrated_gradients  Sundararajan et al. 2017, the right Riemann sum with m steps (option m=50):
                          (x - x') * (1/m) sum_{k=1..m} dy_c/dx (x' + (k/m)(x - x')), (N, 3, 32, 32).
                          baseline x' = 0 in normalised space, i.e. every pixel the CIFAR-10 mean colour
                          (data.CIFAR10_MEAN, what normalize subtracts), unless `baseline` is given (a
                          normalised (N or 1, 3, 32, 32) tensor). Completeness: sum of the map ->
                          y_c(x) - y_c(x') as m grows (tested); m=1 is (x - x') * saliency(x).
    occlusion             Zeiler & Fergus 2013, section 4.2, as a difference: for every k x k window
                          (options k=8, stride s=4; all three colours occluded together) d_w = y_c(x) -
                          y_c(x with the window set to the baseline), the baseline as for
                          integrated_gradients (default 0: the mean colour, the paper's grey square).
                          Windows start at rows and columns 0, s, 2s, ... while they fit, plus one flush
                          with the far edge where the last of those stops short of it, so every pixel is
                          covered. map(p) = the mean of d_w over the windows w that cover pixel p,
                          (N, 32, 32). Positive: hiding the pixel lowers y_c (evidence for c).

Signs: no map is rectified but Grad-CAM (its ReLU is the paper's); positive always means evidence for
class c (raising y_c). Batched: every step sends all images of the call through the network together,
in batches of `batch_size` rows (option; default 100 on a CPU, 1000 on a GPU, as scoring.score_units),
smoothgrad's and integrated_gradients' points and occlusion's windows stacked into those batches.
"""
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from data import normalize
from model import STAGES
from visualize.scoring import classify, default_batch_size, stage_output

ATTRIBUTION_METHODS = ("gradcam", "saliency", "smoothgrad", "integrated_gradients", "occlusion")
GRADCAM_LAYERS = STAGES[1:]  # the stages Grad-CAM is drawn at
IMAGE_SIZE = 32

# Each method's options and their defaults; batch_size (None: by device) is every method's.
DEFAULT_OPTIONS = {
    "gradcam": {"upsample": True},
    "saliency": {},
    "smoothgrad": {"n": 50, "sigma": 0.15, "seed": 0},
    "integrated_gradients": {"m": 50, "baseline": None},
    "occlusion": {"k": 8, "s": 4, "baseline": None},
}
assert tuple(DEFAULT_OPTIONS) == ATTRIBUTION_METHODS
# What each integer or float option must be: (kind, smallest value, largest or None, what it is)
OPTION_RANGES = {
    "n": (int, 1, None, "smoothgrad's number of noisy copies"),
    "m": (int, 1, None, "integrated gradients' number of steps"),
    "k": (int, 1, IMAGE_SIZE, "occlusion's window size"),
    "s": (int, 1, IMAGE_SIZE, "occlusion's stride"),
    "batch_size": (int, 1, None, "rows a pass"),
    "sigma": (float, 0, None, "smoothgrad's noise, a fraction of the image's range"),
    "seed": (int, 0, 2 ** 63 - 1, "smoothgrad's seed"),
}


def check_options(method, options, layer=None, names=None):
    """The options of `method` with the defaults filled in, each checked: ValueError (one line, naming
    the valid values) for an unknown method, an option the method does not take, a value out of range
    or, for gradcam, a layer that is not one of GRADCAM_LAYERS. `names` maps an option to what the
    message calls it (a command line's flag); by default its own name."""
    names = names or {}
    if method not in ATTRIBUTION_METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {', '.join(ATTRIBUTION_METHODS)}")
    allowed = {**DEFAULT_OPTIONS[method], "batch_size": None}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{method} takes no option {unknown[0]!r}; its options are {', '.join(sorted(allowed))}")
    if method == "gradcam" and layer not in GRADCAM_LAYERS:
        raise ValueError(f"{names.get('layer', 'layer')} {layer!r} cannot be Grad-CAM's stage; choose one of "
                         f"{', '.join(GRADCAM_LAYERS)}")
    chosen = {**allowed, **options}
    for name, value in chosen.items():
        if name not in OPTION_RANGES or value is None:
            continue
        kind, low, high, what = OPTION_RANGES[name]
        valid = f"{low}..{high}" if high is not None else f"at least {low}"
        flag = names.get(name, name)
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{flag} {value!r}: {what} must be a whole number, {valid}")
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low
                and (high is None or value <= high)):
            raise ValueError(f"{flag} {value!r}: {what} must be {'a finite number, ' if kind is float else ''}{valid}")
    return chosen


def attribute(model, images, targets, method, layer="conv4_x", **options):
    """The maps of `method` for the logits y_c, c = targets, of the uint8 images (N, 3, 32, 32): see the
    module's docstring for each method, its options, shapes and conventions. `layer` is Grad-CAM's
    stage (the pixel methods ignore it)."""
    options = check_options(method, options, layer)
    if model.training:
        raise ValueError("attribute needs the model in eval mode (BatchNorm's running statistics); "
                         "call model.eval() first")
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    batch_size = options.pop("batch_size") or default_batch_size(device)
    # gradients are taken here even when the caller is under no_grad or inference mode
    with torch.inference_mode(False), torch.enable_grad(), input_gradients_only(model):
        targets = torch.as_tensor(targets, dtype=torch.long).to(device).clone().expand(len(images))
        classes = model.fc.out_features
        if len(targets) and not (0 <= targets.min() and targets.max() < classes):
            raise ValueError(f"target class {targets[(targets < 0) | (targets >= classes)][0].item()} is out of "
                             f"range: the network has {classes} classes; choose 0..{classes - 1}")
        x = normalize(images.to(device)).to(dtype)
        if method == "gradcam":
            return gradcam(model, x, targets, layer, batch_size, **options)
        if method == "occlusion":
            return occlusion(model, x, targets, batch_size, **options)
        if method == "saliency":
            return mean_gradient(model, lambda i: x, 1, targets, batch_size)
        if method == "smoothgrad":
            return smoothgrad(model, x, targets, batch_size, **options)
        return integrated_gradients(model, x, targets, batch_size, **options)


@contextmanager
def input_gradients_only(model):
    """The parameters' requires_grad off while the maps are drawn, and as before after: convolution's
    backward then skips the weights' gradients, which no map needs (8 % of a SmoothGrad step at width
    64 on a CPU)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def target_logits(model, x, targets, after=None):
    """y_c for each row of x (the normalised images, or with `after` that stage's output): (rows,)."""
    return classify(model, x, after).gather(1, targets[:, None])[:, 0]


def input_gradient(model, x, targets, batch_size):
    """dy_c/dx for each row of x, batch_size rows a pass; in eval mode each row's logit depends on that
    row alone, so the gradient of their sum is every row's own."""
    parts = []
    for start in range(0, len(x), batch_size):
        rows = x[start:start + batch_size].detach().requires_grad_(True)
        y = target_logits(model, rows, targets[start:start + batch_size])
        parts.append(torch.autograd.grad(y.sum(), rows)[0])
    return torch.cat(parts)


def mean_gradient(model, point, count, targets, batch_size):
    """(1/count) sum_{i=0..count-1} dy_c/dx at point(i), a normalised batch like the images (N, 3, 32, 32):
    the points of several i stacked into one pass of at most batch_size rows (at least one i a pass)."""
    n = len(targets)
    per_pass = max(1, batch_size // max(n, 1))
    total = 0
    for first in range(0, count, per_pass):
        steps = range(first, min(first + per_pass, count))
        points = torch.cat([point(i) for i in steps])
        grads = input_gradient(model, points, targets.repeat(len(steps)), batch_size)
        total = total + grads.view(len(steps), n, *points.shape[1:]).sum(0)
    return total / count


def smoothgrad(model, x, targets, batch_size, n, sigma, seed):
    generator = torch.Generator().manual_seed(seed)
    spread = sigma * (x.amax((1, 2, 3), keepdim=True) - x.amin((1, 2, 3), keepdim=True))

    def noisy(i):  # called for i = 0, 1, ..., n - 1 in order, so the generator's stream is the same
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        return x + spread * noise.to(x.device)
    return mean_gradient(model, noisy, n, targets, batch_size)


def resolve_baseline(x, baseline):
    """The baseline x' as a batch like x: 0 (the mean colour) unless given, normalised, (N or 1, 3, 32, 32)."""
    if baseline is None:
        return torch.zeros_like(x)
    return torch.as_tensor(baseline, dtype=x.dtype, device=x.device).expand_as(x)


def integrated_gradients(model, x, targets, batch_size, m, baseline):
    base = resolve_baseline(x, baseline)
    path = lambda i: base + ((i + 1) / m) * (x - base)  # k = i + 1 = 1..m: the right Riemann sum
    return (x - base) * mean_gradient(model, path, m, targets, batch_size)


def gradcam(model, x, targets, layer, batch_size, upsample):
    maps = []
    for start in range(0, len(x), batch_size):
        with torch.no_grad():
            activations = stage_output(model, x[start:start + batch_size], layer)
        activations.requires_grad_(True)
        y = target_logits(model, activations, targets[start:start + batch_size], after=layer)
        grads = torch.autograd.grad(y.sum(), activations)[0]
        alpha = grads.mean((2, 3), keepdim=True)
        maps.append(F.relu((alpha * activations.detach()).sum(1)))
    cam = torch.cat(maps)
    if upsample:
        cam = F.interpolate(cam[:, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)[:, 0]
    return cam


def window_starts(size, k, s):
    """0, s, 2s, ... while a k-window fits in `size`, and one flush with the far edge if those stop short."""
    starts = list(range(0, size - k + 1, s))
    if starts[-1] != size - k:
        starts.append(size - k)
    return starts


def occlusion_windows(k, s, size=IMAGE_SIZE):
    """Boolean masks (W, size, size), one a window, True inside it: every k x k window of occlusion."""
    starts = window_starts(size, k, s)
    masks = torch.zeros(len(starts) ** 2, size, size, dtype=torch.bool)
    for w, (top, left) in enumerate((top, left) for top in starts for left in starts):
        masks[w, top:top + k, left:left + k] = True
    return masks


def occluded_copies(x, masks, base, batch_size):
    """Every image of x with every window of `masks` (W, H, W) set to `base` (a batch like x), in the
    order window by window (row w * N + i is image i under window w), yielded batch_size rows at a
    time as (rows, the index i of each row's image)."""
    n = len(x)
    masks = masks.to(x.device)
    for start in range(0, len(masks) * n, batch_size):
        row = torch.arange(start, min(start + batch_size, len(masks) * n), device=x.device)
        window, image = row // n, row % n
        yield torch.where(masks[window][:, None], base[image], x[image]), image


@torch.no_grad()
def occlusion(model, x, targets, batch_size, k, s, baseline):
    base = resolve_baseline(x, baseline)
    masks = occlusion_windows(k, s)
    n = len(x)
    reference = torch.cat([target_logits(model, x[i:i + batch_size], targets[i:i + batch_size])
                           for i in range(0, n, batch_size)])
    # (W, N): y_c(x) - y_c(x occluded by window w)
    drops = torch.cat([reference[image] - target_logits(model, rows, targets[image])
                       for rows, image in occluded_copies(x, masks, base, batch_size)]).view(len(masks), n)
    weights = masks.to(x.device, x.dtype).flatten(1)  # (W, H*W)
    covered = weights.sum(0)  # windows covering each pixel, at least 1
    return ((drops.T @ weights) / covered).view(n, IMAGE_SIZE, IMAGE_SIZE)
