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
from utils import OneLineArgumentParser, UserError, check_writable, load_checkpoint, resolve_device

# --------------------------------------------------------------------------- the plot scripts
# What the seven plot_*.py scripts share: their flags, loading a checkpoint with its test split,
# checking layer/channel/image arguments, the scores and the gradient ascent they compute, and the
# figures. Display conventions, the same in every figure: nearest interpolation, no ticks, one
# colour scale per grid, and RECONSTRUCTION_DISPLAY for signed images.

RECONSTRUCTION_DISPLAY = "each image shown as 0.5 + r / (2 max|r|), so grey is 0"
MAX_IMAGES = 64  # test images a figure may show (--images): beyond that the panels are too small to read


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
                       help=f"test image indices: a range A-B (inclusive), a list 1,2,3 or both mixed; at most "
                            f"{MAX_IMAGES} a figure (default: %(default)s)")
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
    """'4531-4546' -> [4531, ..., 4546]; '1,2,3' -> [1, 2, 3]; both forms may be mixed: '1,5-7'.

    At most MAX_IMAGES indices, counted before any list is made.
    """
    ranges = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            first, last = int(first), int(last or first)
            if last < first:
                raise ValueError
            ranges.append(range(first, last + 1))
    except ValueError:
        raise UserError(f"--images {text!r} is not a list of test image indices; "
                        f"write a range like 4531-4546 or a list like 1,2,3") from None
    count = sum(map(len, ranges))
    if count > MAX_IMAGES:
        raise UserError(f"--images {text} names {count} images, but a figure shows at most {MAX_IMAGES}; "
                        f"pick fewer, e.g. 4531-4546")
    return [i for r in ranges for i in r]


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


def check_ascent(steps, lr, penalty):
    """The gradient-ascent flags of plot_gradient_pattern.py: each out-of-range one gets its own line."""
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if not (math.isfinite(lr) and lr > 0):
        raise UserError(f"--lr must be a finite number above 0, got {lr}; the default is 0.05")
    if not (math.isfinite(penalty) and penalty >= 0):
        raise UserError(f"--penalty must be a finite number, 0 or above (0: no pull towards the start image), "
                        f"got {penalty}; the default is 0.01")


def load_for_plots(args, test_split=True):
    """Everything a plot script needs, from its parsed flags, with every flag checked.

    The flags are checked first, --figures-dir included, before anything is loaded or computed.
    Returns a namespace: model (eval mode, on args.device), device, caption (checkpoint and data,
    for titles; synthetic data says NOT CIFAR-10) and, with test_split, the test images (uint8, on
    the CPU), labels and class names, and indices: the parsed --images, or [--image-index], where
    the script has that flag. Only the test split is read.
    """
    for name, check in (("layer", check_layer), ("path", check_path)):
        if hasattr(args, name):
            check(getattr(args, name))
    if hasattr(args, "steps"):
        check_ascent(args.steps, args.lr, args.penalty)
    indices = parse_indices(args.images) if hasattr(args, "images") else None
    check_writable(args.figures_dir, "--figures-dir", folder=True)
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
    run = SimpleNamespace(model=model, device=device, indices=None, caption=caption)
    if test_split:
        root = dataset_root(args.data_dir or config.get("data_dir", "data"), synthetic)
        run.images, run.labels, run.classes = load_cifar10(root, train=False)
        if indices is not None:
            run.indices = indices
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
    """Per image, the sum of `channel`'s feature map at `layer`: the report's activation of a filter."""
    return stage_output(model, x, layer)[:, channel].sum((1, 2))


def top_activating(model, images, layer, channel, k=1, batch_size=None):
    """(indices, scores) of the k images whose `channel` at `layer` has the largest feature-map sum.

    images: uint8 (N, 3, 32, 32) as load_cifar10 returns them, on any device; they are normalized
    here, batch by batch, on the model's device. Equal to scoring one image at a time (tested), but
    batched, under inference mode and stopping at `layer`. batch_size defaults to 100 on a CPU
    (fastest on 2 cores: the activations stay in cache) and 1000 on a GPU.
    """
    device = next(model.parameters()).device
    batch_size = batch_size or (100 if device.type == "cpu" else 1000)
    scores = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(images), batch_size), desc=f"scoring {layer} channel {channel}",
                          unit="batch", leave=False, dynamic_ncols=True):
            x = normalize(images[start:start + batch_size].to(device))
            scores.append(channel_scores(model, x, layer, channel).float())
    top = torch.cat(scores).topk(k)
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
