"""What the plot scripts share: their flags, loading a checkpoint with its test split, checks,
scoring, gradient ascent and drawing. Each plot_*.py is a short declaration over this module and
model.py.
"""
import argparse
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from data import dataset_root, denormalize, load_cifar10, normalize
from model import PATHS, STAGES, BasicBlock
from utils import OneLineArgumentParser, UserError, load_checkpoint, resolve_device

# --------------------------------------------------------------------------- the plot scripts
# What the seven plot_*.py scripts share: their flags, loading a checkpoint with its test split,
# checking layer/channel/image arguments, the scores and the gradient ascent they compute, and the
# figures. Display conventions, the same in every figure: nearest interpolation, no ticks, one
# colour scale per grid, and RECONSTRUCTION_DISPLAY for signed images.

RECONSTRUCTION_DISPLAY = "each image shown as 0.5 + r / (2 max|r|), so grey is 0"


def plot_parser(doc, image_index=None, images=None, layer=None, channel=None, path=None):
    """The flags every plot script has, plus those whose default is given here (None: no such flag)."""
    p = OneLineArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/resnet18_cifar10.pt",
                   help="checkpoint written by train.py (default: %(default)s)")
    p.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ (default: the checkpoint's)")
    p.add_argument("--synthetic", action=argparse.BooleanOptionalAction, default=None,
                   help="use the synthetic gratings, not CIFAR-10 (default: whatever the checkpoint was "
                        "trained on)")
    p.add_argument("--figures-dir", default="figures", help="where the PNGs go (default: %(default)s/)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ... (default: auto)")
    if image_index is not None:
        p.add_argument("--image-index", type=int, default=image_index,
                       help="index of the test image (default: %(default)s)")
    if images is not None:
        p.add_argument("--images", default=images,
                       help="test image indices: a range A-B (inclusive), a list 1,2,3 or both mixed "
                            "(default: %(default)s)")
    if layer is not None:
        p.add_argument("--layer", default=layer, help=f"one of {', '.join(STAGES)} (default: %(default)s)")
    if channel is not None:
        p.add_argument("--channel", type=int, default=channel,
                       help="channel (filter) of --layer, 0..C-1 (default: %(default)s)")
    if path is not None:
        p.add_argument("--path", default=path, help=f"where the deconvnet sends the signal at the residual "
                                                    f"sums of --layer: {', '.join(PATHS)} (default: %(default)s)")
    return p


def parse_indices(text):
    """'4531-4546' -> [4531, ..., 4546]; '1,2,3' -> [1, 2, 3]; both forms may be mixed: '1,5-7'."""
    indices = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            first, last = int(first), int(last or first)
            if last < first:
                raise ValueError
            indices.extend(range(first, last + 1))
    except ValueError:
        raise UserError(f"--images {text!r} is not a list of test image indices; "
                        f"write a range like 4531-4546 or a list like 1,2,3") from None
    return indices


def check_layer(layer):
    if layer not in STAGES:
        raise UserError(f"--layer {layer!r} is not a stage of the network; choose one of {', '.join(STAGES)}")


def check_channel(model, layer, channel):
    channels = model.channels(layer)
    if not 0 <= channel < channels:
        raise UserError(f"--channel {channel} is out of range: {layer} of this width-{model.width} network "
                        f"has {channels} channels; choose 0..{channels - 1}")


def check_image_indices(indices, num_images):
    bad = [i for i in indices if not 0 <= i < num_images]
    if bad:
        raise UserError(f"test image index {bad[0]} is out of range: the test split has {num_images} "
                        f"images; choose 0..{num_images - 1}")


def check_path(path):
    if path not in PATHS:
        raise UserError(f"--path {path!r} is not a deconvnet path; choose one of {', '.join(PATHS)}")


def load_for_plots(args, test_split=True):
    """Everything a plot script needs, from its parsed flags, with every flag checked.

    Returns a namespace: model (eval mode, on args.device), device, caption (checkpoint and data,
    for titles; synthetic data says NOT CIFAR-10), data_dir, synthetic and trained_on_synthetic
    (dataset_root(run.data_dir, run.synthetic) holds the test split chosen, with
    run.trained_on_synthetic the checkpoint's training data) and, with test_split, the test images
    (uint8, on the CPU), labels and class names, and indices: the parsed --images, or
    [--image-index], where the script has that flag. Only the test split is read.
    """
    for name, check in (("layer", check_layer), ("path", check_path)):
        if hasattr(args, name):
            check(getattr(args, name))
    device = resolve_device(args.device)
    model, ckpt = load_checkpoint(args.checkpoint, device)
    if hasattr(args, "channel"):
        check_channel(model, args.layer, args.channel)
    config = ckpt["config"]
    trained_on = config.get("synthetic", False)
    synthetic = trained_on if args.synthetic is None else args.synthetic
    name = {True: "synthetic gratings (NOT CIFAR-10)", False: "CIFAR-10"}
    caption = f"{Path(args.checkpoint).name}: width-{model.width} ResNet-18 trained on {name[trained_on]}"
    if test_split and synthetic != trained_on:
        caption += f"; test images from {name[synthetic]}"
    run = SimpleNamespace(model=model, device=device, indices=None, caption=caption,
                          data_dir=args.data_dir or config.get("data_dir", "data"), synthetic=synthetic,
                          trained_on_synthetic=trained_on)
    if test_split:
        root = dataset_root(run.data_dir, synthetic)
        run.images, run.labels, run.classes = load_cifar10(root, train=False)
        if hasattr(args, "images"):
            run.indices = parse_indices(args.images)
        elif getattr(args, "image_index", None) is not None:
            run.indices = [args.image_index]
        if run.indices is not None:
            check_image_indices(run.indices, len(run.images))
    return run


# --------------------------------------------------------------------------- what the plots compute

def stage_output(model, x, layer):
    """The output of stage `layer` for the normalized batch x, running only the stages up to it."""
    for name in STAGES[:STAGES.index(layer) + 1]:
        # oneDNN's CPU convolutions and max-pool are ~2x faster channels-last on the 32x32 maps of
        # the first two stages, and faster in NCHW on the small maps after; the values are the same
        big = x.shape[-1] >= 32
        x = model.stage(name)(x.contiguous(memory_format=torch.channels_last if big else torch.contiguous_format))
    return x


def channel_scores(model, x, layer, channel):
    """Per image, the sum of `channel`'s feature map at `layer`: the report's activation of a filter.

    channel may also be a list of channels: then (N, len(channel)) scores, one column a channel.
    """
    return stage_output(model, x, layer)[:, channel].sum((-2, -1))


def top_activating(model, images, layer, channel, k=1, batch_size=None):
    """(indices, scores) of the k images whose `channel` at `layer` has the largest feature-map sum.

    images: uint8 (N, 3, 32, 32) as load_cifar10 returns them, on any device; they are normalized
    here, batch by batch, on the model's device. Equal to scoring one image at a time (tested), but
    batched, under inference mode and stopping at `layer`. batch_size defaults to 100 on a CPU
    (fastest on 2 cores: the activations stay in cache) and 1000 on a GPU. With a list of channels,
    all are scored in the same pass and both results are (k, len(channel)), one column a channel.
    """
    device = next(model.parameters()).device
    batch_size = batch_size or (100 if device.type == "cpu" else 1000)
    scores = []
    with torch.inference_mode():
        what = f"{len(channel)} channels" if isinstance(channel, (list, tuple)) else f"channel {channel}"
        for start in tqdm(range(0, len(images), batch_size), desc=f"scoring {layer} {what}",
                          unit="batch", leave=False, dynamic_ncols=True):
            x = normalize(images[start:start + batch_size].to(device))
            scores.append(channel_scores(model, x, layer, channel).float())
    top = torch.cat(scores).topk(k, dim=0)
    return top.indices.cpu(), top.values.cpu()


def gradient_ascent(model, x0, layer, channel, steps=100, lr=0.05, penalty=0.01):
    """The input that maximizes channel_scores(x) - penalty * ||x - x0||^2, found by Adam from x0.

    x0 is a normalized batch; every step is clipped back to the normalized image of [0, 1] pixels,
    so the result is a displayable image. The model's weights get no gradients.
    """
    low = normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8, device=x0.device))
    high = normalize(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8, device=x0.device))
    x0 = x0.detach()
    x = x0.clone().requires_grad_()
    optimizer = torch.optim.Adam([x], lr=lr)
    for _ in tqdm(range(steps), desc=f"gradient ascent on {layer} channel {channel}", unit="step",
                  leave=False, dynamic_ncols=True):
        objective = channel_scores(model, x, layer, channel).sum() - penalty * (x - x0).pow(2).sum()
        x.grad, = torch.autograd.grad(-objective, x)
        optimizer.step()
        with torch.no_grad():
            x.clamp_(low, high)
    return x.detach()


# --------------------------------------------------------------------------- figures

def grid_shape(n):
    """(rows, columns) of the near-square grid that holds n panels, filled row by row."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def tile(maps, pad=1, fill=float("nan")):
    """(N, H, W) or (N, H, W, 3) maps -> one array: the grid_shape(N) grid, `pad` cells of `fill` apart."""
    maps = np.asarray(maps, dtype=np.float32)
    n, h, w = maps.shape[:3]
    rows, cols = grid_shape(n)
    out = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, *maps.shape[3:]), fill, dtype=np.float32)
    for i, m in enumerate(maps):
        r, c = divmod(i, cols)
        out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = m
    return out


def to_display(x):
    """A normalized batch (N, 3, H, W) -> (N, H, W, 3) pixels in [0, 1] as numpy, for imshow."""
    return denormalize(x.detach().float()).permute(0, 2, 3, 1).cpu().numpy()


def signed_to_display(r, per_image=True):
    """Signed (N, 3, H, W) -> (N, H, W, 3) in [0, 1]: 0.5 + r / (2 max|r|), grey = 0.

    The max is taken per image (RECONSTRUCTION_DISPLAY, used for every reconstruction) or, with
    per_image=False, over the whole batch (one scale for a grid of filters).
    """
    r = r.detach().float()
    dims = (1, 2, 3) if per_image else (0, 1, 2, 3)
    scale = r.abs().amax(dims, keepdim=True).clamp_min(1e-12)
    return (0.5 + r / (2 * scale)).permute(0, 2, 3, 1).cpu().numpy()


def new_figure(width, height):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=150)


def bare(ax):
    ax.set_xticks([])
    ax.set_yticks([])


def save(fig, path):
    """Save a figure (the Agg renderer, no pyplot state), say so, and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"wrote {path}")
    return path


def show_mosaic(fig, ax, maps, symmetric=False):
    """Draw (N, H, W) maps as one near-square mosaic on one colour scale, with its colour bar.

    symmetric: the scale is -m..m around 0 (for weights) rather than min..max (for feature maps).
    """
    import matplotlib
    maps = maps.detach().float().cpu()
    low, high = (-maps.abs().max(), maps.abs().max()) if symmetric else (maps.min(), maps.max())
    cmap = matplotlib.colormaps["gray"].with_extremes(bad="lightsteelblue")  # the gaps: no grey level
    image = ax.imshow(tile(maps.numpy()), cmap=cmap, vmin=low.item(), vmax=high.item(), interpolation="nearest")
    bare(ax)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)


def save_mosaic(path, maps, title, symmetric=False):
    """One figure holding show_mosaic(maps)."""
    fig = new_figure(6.4, 6)
    ax = fig.add_subplot()
    show_mosaic(fig, ax, maps, symmetric)
    ax.set_title(title, fontsize=9)
    return save(fig, path)


def save_rgb_mosaic(path, rgb, title):
    """(N, H, W, 3) images in [0, 1] as one mosaic with white gaps."""
    fig = new_figure(6, 6.3)
    ax = fig.add_subplot()
    ax.imshow(tile(rgb, fill=1.0), interpolation="nearest")
    bare(ax)
    ax.set_title(title, fontsize=9)
    return save(fig, path)


def save_panels(path, panels, title, cols=None):
    """RGB panels [(array (H, W, 3) in [0, 1], panel title), ...] in a grid with `cols` columns."""
    rows, cols = grid_shape(len(panels)) if cols is None else (math.ceil(len(panels) / cols), cols)
    size = min(max(8 / cols, 1.3), 2.6)  # inches a panel: few panels get room for their titles
    fig = new_figure(size * cols + 0.4, (size + 0.3) * rows + 0.9)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (image, panel_title) in zip(axes, panels):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(panel_title, fontsize=7)
    for ax in axes:
        bare(ax)
        ax.set_frame_on(ax.has_data())  # empty cells of the last row stay blank
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def image_label(run, index, sep=" "):
    """'7876 (cat)': how titles name a test image."""
    return f"{index}{sep}({run.classes[run.labels[index]]})"


# --------------------------------------------------------------------------- the figures themselves
# Scripts that show the same kind of figure for different defaults share these functions.

def plot_feature_maps(run, layer, figures_dir):
    """The test image run.indices[0] beside all of `layer`'s feature maps for it."""
    index = run.indices[0]
    x = normalize(run.images[[index]].to(run.device))
    with torch.inference_mode():
        maps = stage_output(run.model, x, layer)[0]
    fig = new_figure(11, 5.6)
    image_ax, maps_ax = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=(1, 2.2)))
    image_ax.imshow(to_display(x)[0], interpolation="nearest")
    bare(image_ax)
    image_ax.set_title(f"test image {image_label(run, index)}", fontsize=9)
    show_mosaic(fig, maps_ax, maps)
    maps_ax.set_title(f"its {layer} feature maps: {len(maps)} channels, {maps.shape[-2]}x{maps.shape[-1]} "
                      f"each, channel 0 top left, row by row", fontsize=9)
    fig.suptitle(f"{layer} feature maps; {run.caption}", fontsize=10)
    return save(fig, Path(figures_dir) / f"{layer}_feature_maps_image{index}.png")


def plot_reconstructions(run, layer, channel, path, figures_dir):
    """Each test image of run.indices beside the deconvnet projection of `layer`/`channel` for it."""
    x = normalize(run.images[run.indices].to(run.device))
    recon = run.model.reconstruct(x, layer, channel, path=path)
    panels = []
    for index, image, projection in zip(run.indices, to_display(x), signed_to_display(recon)):
        panels += [(image, image_label(run, index, sep="\n")), (projection, "reconstruction")]
    if any(isinstance(m, BasicBlock) for m in run.model.stage(layer).children()):
        through = {"both": "both branches", "shortcut": "the shortcut", "trunk": "the trunk"}[path]
        through = f" through {through} of each residual sum in {layer}"
    else:
        through = ""  # conv1 has no residual sum, so every path is the same
    title = (f"{layer} channel {channel}: deconvnet reconstruction{through}, beside its test image\n"
             f"({RECONSTRUCTION_DISPLAY}; {run.caption})")
    name = f"{layer}_channel{channel}_reconstructions" + ("" if path == "both" else f"_{path}") + ".png"
    return save_panels(Path(figures_dir) / name, panels, title, cols=2 * grid_shape(len(run.indices))[1])


# --------------------------------------------------------------------------- feature visualization
# Regularised activation maximisation sized for 32x32 inputs (plot_feature_visualization.py): the
# image is parametrised as a sigmoid of a colour-decorrelated, 1/f-scaled Fourier image, and it must
# excite its channel through small random jitters, scalings and rotations. The colour statistics
# come from the checkpoint's own training data, the transformation ranges from the network's own
# training augmentation (crops shifted by up to 4 px). (Its imports stay here, with the section.)

from contextlib import contextmanager, nullcontext  # noqa: E402

from data import CIFAR10_FOLDER, draw_augmentation, random_crop_flip  # noqa: E402
from utils import save_atomic  # noqa: E402

OBJECTIVES = ("channel", "neuron")  # the channel's mean over the stage's output, or its centre unit
STARTS = ("noise", "top")
COLOUR_STATISTICS_FILE = "colour_statistics.pt"  # cache beside cifar-10-batches-py/
FV_STEPS = 160           # plot_feature_visualization.py's default --steps and --lr
FV_LR = 0.08
FV_JITTER_PX = 2.0        # random shift, each axis, in pixels
FV_SCALE = (0.9, 1.1)     # random zoom
FV_ROTATE_DEG = 5.0       # random rotation, either way
FV_DECAY = 1.0            # the Fourier coefficients are scaled by 1 / max(f, 1/32) ** FV_DECAY
FV_EPS = 0.02             # an image is clamped into [eps, 1 - eps] before the sigmoid is inverted
FV_INIT = 0.01           # --start noise: the standard deviation of the random coefficients
FV_HIGH_FREQUENCY = 0.25  # cycles/pixel: half the Nyquist frequency, where "speckle" begins


def parse_channels(text, model, layer):
    """--channels (the syntax of --images) -> a list of channels of `layer`, each checked."""
    try:
        channels = parse_indices(text)
    except UserError:
        raise UserError(f"--channels {text!r} is not a list of channels; write a range like 0-15 or a list "
                        f"like 0,3,7") from None
    count = model.channels(layer)
    bad = [c for c in channels if not 0 <= c < count]
    if bad:
        raise UserError(f"--channels: channel {bad[0]} is out of range: {layer} of this width-{model.width} "
                        f"network has {count} channels; choose 0..{count - 1}")
    return channels


def colour_statistics(root):
    """(mean (3,), covariance (3, 3)) of the RGB pixels, in [0, 1], of the training split in `root`.

    Computed exactly from the whole split (loading its pickles takes seconds) and cached in
    root/COLOUR_STATISTICS_FILE, keyed by the name, size and modification time of each training
    file, so a changed data set is measured again. An unwritable folder only costs the caching.
    """
    root = Path(root)
    files = sorted((root / CIFAR10_FOLDER).glob("data_batch_*"))
    key = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
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


def random_transforms(pixels, generator, jitter=FV_JITTER_PX, scale=FV_SCALE, degrees=FV_ROTATE_DEG):
    """Each image shifted by up to `jitter` px, zoomed by a factor in `scale` and rotated by up to
    `degrees`, all drawn uniformly per image from the CPU generator; bilinear, and filled black
    outside, as the zero padding of the training crops."""
    n, _, h, w = pixels.shape
    u = torch.rand(n, 4, generator=generator).to(pixels.device) * 2 - 1  # in [-1, 1)
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


@contextmanager
def straight_through_relu(model, layer):
    """Inside the block, the last ReLU of `layer` passes its gradient where its input is negative too.

    Its output, and so every activation reported, stays max(0, a); only the backward pass changes,
    to that of the identity, so a channel silent at the start of an ascent still gets a gradient
    that raises it (with the true ReLU it would stay at 0 for good).
    """
    relu = [m for m in model.stage(layer).modules() if isinstance(m, torch.nn.ReLU)][-1]
    handle = relu.register_forward_hook(lambda module, inputs, output: inputs[0] + (output - inputs[0]).detach())
    try:
        yield
    finally:
        handle.remove()


def feature_visualization(model, layer, channels, colour, steps=FV_STEPS, lr=FV_LR, seed=0, objective="channel",
                          start=None, penalty=0.0):
    """One image per channel, all optimised as one batch: image i maximises the objective of
    channels[i] at `layer` through random_transforms, parametrised as a FourierImage.

    colour: (mean, covariance) of the training pixels (colour_statistics). start: None (random
    coefficients of scale 0.01 around the mean colour) or pixels (N, 3, 32, 32) in [0, 1] to start
    from; with start, penalty * ||x - x0||^2 on the normalized input x is subtracted (the report's
    distance term, weighed against the feature-map sum, that is penalty / (units averaged) against
    the objective). Returns (pixels (N, 3, 32, 32) in [0, 1], the objective each reached, untransformed).
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    image = FourierImage(*colour, device=device)
    channels = torch.as_tensor(channels, device=device)
    if start is None:
        z = FV_INIT * torch.randn(image.shape(len(channels)), generator=generator)
    else:
        z = image.coefficients(start.to(device))
        x0 = pixels_to_input(start.to(device).float())
    z = z.to(device).requires_grad_()
    optimizer = torch.optim.Adam([z], lr=lr)
    for _ in tqdm(range(steps), desc=f"feature visualization of {len(channels)} {layer} channels", unit="step",
                  leave=False, dynamic_ncols=True):
        pixels = image.pixels(z)
        with straight_through_relu(model, layer):
            activations = stage_output(model, pixels_to_input(random_transforms(pixels, generator)), layer)
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


def plot_feature_visualization(run, layer, channels, figures_dir, steps=FV_STEPS, lr=FV_LR, seed=0, objective="channel",
                               start="noise", penalty=0.01, measure=False):
    """plot_feature_visualization.py: optimise, draw the grid, save the patterns; returns the paths.

    With start "top" (or measure) the test image that excites each channel most (by the report's
    feature-map sum) is found, all channels in one pass; with "top" the patterns start from it with
    the distance term, beside the report's pixel-space pattern from the same image. measure prints
    feature_measures, against plain pixel-space gradient ascent from the same start.
    """
    model, top = run.model, start == "top"
    colour = colour_statistics(dataset_root(run.data_dir, run.trained_on_synthetic))
    settings = dict(steps=steps, lr=lr, seed=seed, objective=objective)
    if top or measure:
        run.indices = top_activating(model, run.images, layer, channels)[0][0].tolist()
        top_pixels = run.images[run.indices].float() / 255
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
        for i, (row, index) in enumerate(zip(rows, run.indices)):
            panels += [(top_pixels[i].permute(1, 2, 0).numpy(),
                        f"ch {row['channel']}: test image\n{image_label(run, index)}: {row['top_image']:.3g}"),
                       (pixel_shown[i], f"report's pattern\n{row['pixel_reached']:.3g}"),
                       (shown[i], f"regularised\n{row['reached']:.3g}")]
        cols = 3 * grid_shape(len(channels))[1]
        start_text = (f"from the top test image, distance term {penalty} ||x - x0||^2, beside the report's "
                      f"pixel-space pattern (same steps and term)")
    else:
        panels = [(image, f"channel {c}\n{what} {value:.3g}") for c, image, value in zip(channels, shown, reached)]
        cols, start_text = None, "from the data's mean colour"
    title = (f"{layer} feature visualization: each image maximises its channel's {what}\n{steps} Adam steps, "
             f"lr {lr}, seed {seed}, {start_text}\nsigmoid of a colour-decorrelated 1/f Fourier image, robust to "
             f"{FV_JITTER_PX:g} px shifts, {FV_SCALE[0]}-{FV_SCALE[1]} zoom, {FV_ROTATE_DEG:g} deg rotations\n"
             f"{run.caption}")
    suffix = ("" if objective == "channel" else f"_{objective}") + ("_top" if top else "")
    out = Path(figures_dir) / f"feature_visualization_{layer}{suffix}"
    png = save_panels(out.with_suffix(".png"), panels, title, cols=cols)
    save_atomic({"channels": list(channels), "images": pixels.float().cpu(), "activations": reached.float().cpu(),
                 "layer": layer, "objective": objective, "start": start, "steps": steps, "lr": lr, "seed": seed},
                out.with_suffix(".pt"))
    print(f"wrote {out.with_suffix('.pt')}")
    return [png, out.with_suffix(".pt")]
