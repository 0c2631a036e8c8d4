"""Feature visualization sized for 32x32 inputs (plot_feature_visualization.py): regularised activation
maximisation. The image is parametrised as a sigmoid of a colour-decorrelated, 1/f-scaled Fourier
image, and it must excite its channel through small random jitters, scalings and rotations. The
colour statistics come from the checkpoint's own training data, the transformation ranges from the
network's own training augmentation (crops shifted by up to 4 px).
"""
import math
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import save_atomic
from cifar10 import CIFAR10_FOLDER, TRAIN_FILES, dataset_root, load_cifar10
from data import denormalize, draw_augmentation, normalize, random_crop_flip
from visualize import cli
from visualize.ascent import gradient_ascent, straight_through_relu
from visualize.drawing import grid_shape, save_json, save_panels
from visualize.context import test_split_scores
from visualize.scoring import stage_output, top_k

OBJECTIVES = ("channel", "neuron")  # the channel's mean over the stage's output, or its centre unit
STARTS = ("noise", "top")
COLOUR_STATISTICS_FILE = "colour_statistics.pt"  # cache beside cifar-10-batches-py/
FV_STEPS = 160           # plot_feature_visualization.py's default --steps and --lr
QUICK_FV_STEPS = 40      # its --quick: a first look (the sanity checks' feature visualization takes as many)
FV_LR = 0.08
FV_JITTER_PX = 2.0        # random shift, each axis, in pixels
FV_SCALE = (0.9, 1.1)     # random zoom
FV_ROTATE_DEG = 5.0       # random rotation, either way
FV_DECAY = 1.0            # the Fourier coefficients are scaled by 1 / max(f, 1/32) ** FV_DECAY
FV_EPS = 0.02             # an image is clamped into [eps, 1 - eps] before the sigmoid is inverted
FV_INIT = 0.01           # --start noise: the standard deviation of the random coefficients
FV_HIGH_FREQUENCY = 0.25  # cycles/pixel: half the Nyquist frequency, where "speckle" begins


def colour_statistics(root):
    """(mean (3,), covariance (3, 3)) of the RGB pixels, in [0, 1], of the training split in `root`.

    Computed exactly from the whole split (loading its pickles takes seconds) and cached in
    root/COLOUR_STATISTICS_FILE, keyed by the name, size and modification time of each training
    file, so a changed data set is measured again. An unwritable folder only costs the caching.
    """
    root = Path(root)
    # the five files load_cifar10 reads; other files in the folder (backups) neither count nor invalidate
    files = [(name, (root / CIFAR10_FOLDER / name).stat()) for name in TRAIN_FILES]
    key = [[name, stat.st_size, stat.st_mtime_ns] for name, stat in files]
    cache = root / COLOUR_STATISTICS_FILE
    if cache.is_file():
        try:
            stats = torch.load(cache, map_location="cpu", weights_only=True)
            if stats["key"] == key:
                return stats["mean"], stats["covariance"]
        except Exception:  # a damaged or foreign cache is measured again and replaced
            pass
    images = load_cifar10(root, train=True)[0]
    total, gram, count = torch.zeros(3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64), 0
    for chunk in tqdm(images.split(2000), desc="colour statistics of the training split", unit="batch",
                      leave=False, dynamic_ncols=True):
        x = chunk.permute(1, 0, 2, 3).reshape(3, -1).double()
        total += x.sum(1)
        gram += x @ x.T
        count += x.shape[1]
    mean = total / count
    covariance = (gram / count - torch.outer(mean, mean)) / 255 ** 2
    mean, covariance = (mean / 255).float(), covariance.float()
    try:
        save_atomic({"key": key, "mean": mean, "covariance": covariance}, cache)
    except OSError:
        pass
    return mean, covariance


def colour_sqrt(covariance, floor=1e-5):
    """The symmetric square root M of the covariance (M M^T = covariance), scaled so its largest
    eigenvalue is 1. Eigenvalues below floor x the largest are raised to it, so M stays invertible
    on grey data (whose covariance has rank 1), where colour stays ~300x damped."""
    values, vectors = torch.linalg.eigh(covariance.double())
    values = values.clamp_min(floor * values.max()) / values.max()
    return (vectors @ torch.diag(values.sqrt()) @ vectors.T).float()


class FourierImage:
    """Images in (0, 1) as sigmoid(logit(data mean) + M . irfft2(s * z)).

    z: real coefficients (N, 3, size, size // 2 + 1, 2), the real and imaginary parts of rfft2
    of the 3 decorrelated channels; s = 1 / max(f, 1/size) ** decay with f the frequency in
    cycles/pixel, normalised so that unit-variance coefficients give unit-variance pixels: every
    coefficient gets an equal share of an Adam step, so coarse structure grows first and speckle
    last. M = colour_sqrt(covariance of the training pixels) turns decorrelated channels into RGB.
    """

    def __init__(self, mean, covariance, size=32, decay=FV_DECAY, device="cpu"):
        f = torch.sqrt(torch.fft.fftfreq(size)[:, None] ** 2 + torch.fft.rfftfreq(size)[None] ** 2)
        scale = f.clamp_min(1 / size) ** -decay
        # irfft2 (norm="ortho") of coefficients with unit-variance real and imaginary parts: a column
        # 1..size/2-1 coefficient and its implied conjugate add 4 s^2 / size^2 to a pixel's variance,
        # one of column 0 or size/2 (whose imaginary part is dropped) s^2 / size^2
        weight = torch.full_like(scale, 4.0)
        weight[:, [0, -1]] = 1
        self.scale = (scale / (weight * scale ** 2).sum().sqrt() * size).to(device)
        self.size = size
        self.colour = colour_sqrt(covariance).to(device)
        self.offset = torch.logit(mean.clamp(FV_EPS, 1 - FV_EPS)).view(1, 3, 1, 1).to(device)

    def shape(self, n):
        return (n, 3, self.size, self.size // 2 + 1, 2)

    def pixels(self, z):
        spectrum = torch.complex(z[..., 0], z[..., 1]) * self.scale
        decorrelated = torch.fft.irfft2(spectrum, s=(self.size, self.size), norm="ortho")
        return torch.sigmoid(torch.einsum("ij,njhw->nihw", self.colour, decorrelated) + self.offset)

    def coefficients(self, pixels):
        """The z whose pixels(z) is `pixels` clamped into [FV_EPS, 1 - FV_EPS] (the exact inverse)."""
        logits = torch.logit(pixels.float().clamp(FV_EPS, 1 - FV_EPS)) - self.offset
        decorrelated = torch.einsum("ij,njhw->nihw", torch.linalg.inv(self.colour), logits)
        return torch.view_as_real(torch.fft.rfft2(decorrelated, norm="ortho") / self.scale).contiguous()


def pixels_to_input(pixels):
    """Float pixels in [0, 1] -> the normalized network input (data.normalize takes 0..255)."""
    return normalize(pixels * 255)


def random_transforms(pixels, generator, jitter=FV_JITTER_PX, scale=FV_SCALE, degrees=FV_ROTATE_DEG, copies=1):
    """Each image shifted by up to `jitter` px, zoomed by a factor in `scale` and rotated by up to
    `degrees`, all drawn uniformly per image from the CPU generator; bilinear, and filled black
    outside, as the zero padding of the training crops. With copies, pixels are that many equal
    parts and image i of every part gets the same draw (the one of image i of a single part)."""
    n, _, h, w = pixels.shape
    u = torch.rand(n // copies, 4, generator=generator).repeat(copies, 1).to(pixels.device) * 2 - 1  # in [-1, 1)
    angle = u[:, 0] * math.radians(degrees)
    zoom = scale[0] + (u[:, 1] + 1) / 2 * (scale[1] - scale[0])
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # affine_grid maps output to input
    shift = u[:, 2:] * jitter * 2 / torch.tensor([w, h], device=pixels.device)  # [-1, 1] spans the image
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(pixels.shape), align_corners=False)
    return torch.nn.functional.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def objective_values(activations, channels, objective="channel"):
    """Per image i, the objective on channel channels[i] of a stage's output (N, C, H, W): the
    channel's mean over the map, or (neuron) its centre unit (H // 2, W // 2)."""
    maps = activations[torch.arange(len(activations), device=activations.device), channels]  # (N, H, W)
    if objective == "channel":
        return maps.mean((1, 2))
    return maps[:, maps.shape[1] // 2, maps.shape[2] // 2]


def feature_visualization(model, layer, channels, colour, steps=FV_STEPS, lr=FV_LR, seed=0, objective="channel",
                          start=None, penalty=0.0, copies=1):
    """One image per channel, all optimised as one batch: image i maximises the objective of
    channels[i] at `layer` through random_transforms, parametrised as a FourierImage.

    colour: (mean, covariance) of the training pixels (colour_statistics). start: None (random
    coefficients of scale 0.01 around the mean colour) or pixels (N, 3, 32, 32) in [0, 1] to start
    from; with start, penalty * ||x - x0||^2 on the normalized input x is subtracted (the report's
    distance term, weighed against the feature-map sum, that is penalty / (units averaged) against
    the objective). Returns (pixels (N, 3, 32, 32) in [0, 1], the objective each reached, untransformed).

    copies: for a model that evaluates equal parts of its batch on different weights (sanity.Cascade),
    the N images are optimised `copies` times side by side, part k for the k-th weights, each with the
    start and random transforms of the single run: the results (copies * N rows) are those runs'.
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    image = FourierImage(*colour, device=device)
    channels = torch.as_tensor(channels, device=device).repeat(copies)
    if start is None:
        z = FV_INIT * torch.randn(image.shape(len(channels) // copies), generator=generator)
    else:
        z = image.coefficients(start.to(device))
    z = z.repeat(copies, *[1] * (z.dim() - 1))
    if start is not None:
        x0 = pixels_to_input(start.to(device).float()).repeat(copies, 1, 1, 1)
    z = z.to(device).requires_grad_()
    optimizer = torch.optim.Adam([z], lr=lr)
    for _ in tqdm(range(steps), desc=f"feature visualization of {len(channels)} {layer} channels", unit="step",
                  leave=False, dynamic_ncols=True):
        pixels = image.pixels(z)
        with straight_through_relu(model, layer):
            activations = stage_output(model, pixels_to_input(random_transforms(pixels, generator, copies=copies)),
                                       layer)
        loss = -objective_values(activations, channels, objective).sum()
        if start is not None and penalty:
            units = activations.shape[-2] * activations.shape[-1] if objective == "channel" else 1
            loss = loss + penalty / units * (pixels_to_input(pixels) - x0).pow(2).sum()
        z.grad, = torch.autograd.grad(loss, z)
        optimizer.step()
    with torch.no_grad():
        pixels = image.pixels(z)
        reached = objective_values(stage_output(model, pixels_to_input(pixels), layer), channels, objective)
    return pixels.detach(), reached


def shifted_objective(model, pixels, layer, channels, objective="channel", shift=2, draws=16, seed=0):
    """The objective of each image averaged over `draws` random integer shifts of up to `shift` px
    each way (data.random_crop_flip without flips: the gap filled black, as in training)."""
    generator = torch.Generator().manual_seed(seed)
    channels = torch.as_tensor(channels, device=pixels.device)
    no_flip = torch.zeros(len(pixels), dtype=torch.bool, device=pixels.device)
    total = 0
    with torch.no_grad():
        for _ in range(draws):
            offsets = draw_augmentation(len(pixels), generator, padding=shift)[0].to(pixels.device)
            shifted = random_crop_flip(pixels, offsets, no_flip, padding=shift)
            total = total + objective_values(stage_output(model, pixels_to_input(shifted), layer), channels, objective)
    return total / draws


def high_frequency_share(images, cutoff=FV_HIGH_FREQUENCY):
    """Per image (N, 3, H, W), the share of its spectral energy (|FFT|^2 summed over colour, each
    channel's mean removed) at radial frequencies above `cutoff` cycles/pixel (half the Nyquist)."""
    h, w = images.shape[-2:]
    power = torch.fft.fft2(images - images.mean((-2, -1), keepdim=True)).abs().pow(2).sum(1)
    f = torch.sqrt(torch.fft.fftfreq(h)[:, None] ** 2 + torch.fft.fftfreq(w)[None] ** 2).to(images.device)
    return power[:, f > cutoff].sum(1) / power.sum((1, 2)).clamp_min(1e-30)


def pixel_ascent(model, layer, channels, start, steps, penalty=0.0, straight_through=False):
    """The report's pattern for each channel: gradient_ascent (Adam on the normalized pixels, its
    lr, clipped to [0, 1] pixels) from start[i] (pixels in [0, 1]) for channel channels[i], one
    image at a time. straight_through: with straight_through_relu, as feature_visualization, so a
    channel silent at the start moves too. Returns pixels (N, 3, 32, 32) in [0, 1]."""
    device = next(model.parameters()).device
    with straight_through_relu(model, layer) if straight_through else nullcontext():
        return torch.cat([denormalize(gradient_ascent(model, pixels_to_input(start[[i]].to(device)), layer, c,
                                                      steps, penalty=penalty)) for i, c in enumerate(channels)])


def feature_measures(model, layer, channels, objective, pixels, top_pixels, pixel_pattern, origin):
    """Per channel (one row each): the objective the pattern reached; averaged over random shifts of
    up to 2 px; that of the most exciting test image top_pixels (by the feature-map sum) and of
    pixel_pattern; and the high-frequency share of the change from `origin` of the pattern and of
    pixel_pattern."""
    device = next(model.parameters()).device
    values = {}
    with torch.no_grad():
        for name, x in (("reached", pixels), ("top_image", top_pixels), ("pixel_reached", pixel_pattern)):
            x = pixels_to_input(x.to(device))
            values[name] = objective_values(stage_output(model, x, layer), torch.as_tensor(channels), objective)
    values["shifted"] = shifted_objective(model, pixels.to(device), layer, channels, objective)
    values["high_frequency"] = high_frequency_share(pixels.cpu() - origin.cpu())
    values["high_frequency_pixel"] = high_frequency_share(pixel_pattern.cpu() - origin.cpu())
    return [dict(channel=c, **{k: v[i].item() for k, v in values.items()}) for i, c in enumerate(channels)]


def print_feature_measures(rows, steps):
    print(f"{'channel':>7} {'reached':>9} {'shifted':>9} {'top test':>9} {'HF share':>9} {'HF pixel':>9}")
    for r in rows:
        print(f"{r['channel']:>7} {r['reached']:>9.4g} {r['shifted']:>9.4g} {r['top_image']:>9.4g} "
              f"{r['high_frequency']:>9.4f} {r['high_frequency_pixel']:>9.4f}")
    above = sum(r["shifted"] > r["top_image"] for r in rows)
    print(f"averaged over 16 random shifts of up to 2 px, the pattern excites its channel more than the most "
          f"exciting test image for {above} of {len(rows)} channels ({above / len(rows):.0%})")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("high_frequency", "high_frequency_pixel")}
    print(f"share of the change's spectral energy above half the Nyquist frequency, mean over channels: "
          f"{mean['high_frequency']:.4f} regularised, {mean['high_frequency_pixel']:.4f} plain pixel-space "
          f"gradient ascent with the same {steps} steps")


# the flags its file names write their way; --measure only prints, the figure is the same
FEATURE_VISUALIZATION_NAMED = ("--layer", "--objective", "--start", "--measure")


def plot_feature_visualization(run, layer, channels, figures_dir, steps=FV_STEPS, lr=FV_LR, seed=0, objective="channel",
                               start="noise", penalty=0.01, measure=False, figure=None):
    """plot_feature_visualization.py: optimise, draw the grid, save the patterns; returns the paths.

    With start "top" (or measure) the test image that excites each channel most (by the report's
    feature-map sum) is found, all channels in one pass; with "top" the patterns start from it with
    the distance term, beside the report's pixel-space pattern from the same image. measure prints
    feature_measures, against plain pixel-space gradient ascent from the same start. With `figure` (a
    cli.figure_record) a JSON beside the PNG holds it and the activations reached, and the file names
    carry its other flags.
    """
    model, top = run.model, start == "top"
    colour = colour_statistics(dataset_root(run.data_dir, run.trained_on_synthetic))
    settings = dict(steps=steps, lr=lr, seed=seed, objective=objective)
    if top or measure:
        sums = test_split_scores(run, [layer])[layer].sum  # the test split's one pass, under plot_all.py shared
        top_indices = [top_k(sums[:, channel], 1)[0].item() for channel in channels]
        top_pixels = run.images[top_indices].float() / 255
    pixels, reached = feature_visualization(model, layer, channels, colour, **settings,
                                            start=top_pixels if top else None, penalty=penalty)
    if top or measure:
        # the start, and plain pixel-space ascent from it: from the top, the report's pattern (its
        # distance term, its true ReLU); from noise, with the straight-through ReLU as ours
        origin = top_pixels if top else feature_visualization(model, layer, channels, colour, **dict(settings, steps=0))[0]
        pixel_pattern = pixel_ascent(model, layer, channels, origin, steps, penalty if top else 0.0,
                                     straight_through=not top)
        rows = feature_measures(model, layer, channels, objective, pixels, top_pixels, pixel_pattern, origin)
    if measure:
        print_feature_measures(rows, steps)

    what = "mean" if objective == "channel" else "centre unit"
    shown = pixels.permute(0, 2, 3, 1).cpu().numpy()
    if top:
        panels, pixel_shown = [], pixel_pattern.permute(0, 2, 3, 1).cpu().numpy()
        for i, (row, index) in enumerate(zip(rows, top_indices)):
            panels += [(top_pixels[i].permute(1, 2, 0).numpy(),
                        f"ch {row['channel']}: test image\n{run.image_label(index)}: {row['top_image']:.3g}"),
                       (pixel_shown[i], f"report's pattern\n{row['pixel_reached']:.3g}"),
                       (shown[i], f"regularised\n{row['reached']:.3g}")]
        cols = 3 * grid_shape(len(channels))[1]
        start_text = (f"from the top test image, distance term {penalty} ||x - x0||^2, beside the report's "
                      f"pixel-space pattern (same steps and term)")
    else:
        panels = [(image, f"channel {c}\n{what} {value:.3g}") for c, image, value in zip(channels, shown, reached)]
        cols, start_text = None, "from the data's mean colour"
    title = (f"{layer} feature visualization: each image maximises its channel's {what}\n{steps} Adam steps"
             f"{' (the quick run, a first look)' if cli.is_quick(figure) else ''}, "
             f"lr {lr}, seed {seed}, {start_text}\nsigmoid of a colour-decorrelated 1/f Fourier image, robust to "
             f"{FV_JITTER_PX:g} px shifts, {FV_SCALE[0]}-{FV_SCALE[1]} zoom, {FV_ROTATE_DEG:g} deg rotations\n"
             f"{run.caption}")
    suffix = (("" if objective == "channel" else f"_{objective}") + ("_top" if top else "")
              + (cli.name_suffix(figure, FEATURE_VISUALIZATION_NAMED) if figure else ""))
    out = Path(figures_dir) / f"feature_visualization_{layer}{suffix}"
    png = save_panels(out.with_name(out.name + ".png"), panels, title, cols=cols)
    settings = {"channels": list(channels), "layer": layer, "objective": objective, "start": start, "steps": steps,
                "lr": lr, "seed": seed}
    save_atomic({**settings, "images": pixels.float().cpu(), "activations": reached.float().cpu()},
                out.with_name(out.name + ".pt"))
    print(f"wrote {out.with_name(out.name + '.pt')}")
    paths = [png, out.with_name(out.name + ".pt")]
    if figure is not None:
        paths.append(save_json(out.with_name(out.name + ".json"), {"figure": figure, **settings,
                                                                   "activations": reached.float().tolist()}))
    return paths
