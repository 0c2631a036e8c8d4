"""What the plot scripts share: their flags, loading a checkpoint with its test split, checks,
scoring, gradient ascent and drawing. Each plot_*.py is a short declaration over this module and
model.py.
"""
import argparse
import json
import math
import textwrap
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from data import (CIFAR10_FOLDER, SYNTHETIC_NAME, TRAIN_FILES, dataset_root, denormalize, describe_dataset,
                  draw_augmentation, load_cifar10, normalize, random_crop_flip)
from model import PATHS, STAGES, BasicBlock
from utils import (OneLineArgumentParser, UserError, check_writable, load_checkpoint, resolve_device,
                   save_atomic)

# --------------------------------------------------------------------------- the plot scripts
# What the seven plot_*.py scripts share: their flags, loading a checkpoint with its test split,
# checking layer/channel/image arguments, the scores and the gradient ascent they compute, and the
# figures. Display conventions, the same in every figure: nearest interpolation, no ticks, one
# colour scale per grid, and RECONSTRUCTION_DISPLAY for signed images.

RECONSTRUCTION_DISPLAY = "each image shown as 0.5 + r / (2 max|r|), so grey is 0"
SCALES = ("image", "shared")  # --scale of the reconstructions: max|r| per image, or one for all panels
FEATURE_MAP_TILES = 64  # a feature-map figure shows every channel of a stage with at most this many
CHANNELS_AUTO_HELP = (f"; auto: every channel of a stage with at most {FEATURE_MAP_TILES}, else the "
                      f"{FEATURE_MAP_TILES} with the largest maximum on the image, most active first")
MAX_IMAGES = 64  # test images a figure may show (--images): beyond that the panels are too small to read


def plot_parser(doc, image_index=None, images=None, layer=None, channel=None, path=None, channels=None,
                top1=None, scale=None):
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
    if channels is not None:
        p.add_argument("--channels", default=channels,
                       help=f"channels of --layer: a range A-B (inclusive), a list 1,2,3 or both mixed, or 'all'"
                            f"{CHANNELS_AUTO_HELP if channels == 'auto' else ''} (default: %(default)s)")
    if top1 is not None:
        p.add_argument("--top1", action=argparse.BooleanOptionalAction, default=top1,
                       help="project only the channel's strongest activation in each image, as Zeiler & Fergus "
                            "(default: the whole feature map)")
    if scale is not None:
        p.add_argument("--scale", choices=SCALES, default=scale,
                       help="image: each reconstruction scaled to its own max|r|; shared: one max|r| for all "
                            "panels, so their strengths compare (default: %(default)s)")
    return p


def parse_indices(text, flag="--images", what="test image indices", example="4531-4546", limit=MAX_IMAGES):
    """'4531-4546' -> [4531, ..., 4546]; '1,2,3' -> [1, 2, 3]; both forms may be mixed: '1,5-7'.

    flag, what and example name the flag in the error for text that is not such a list. At most
    `limit` indices (None: any number), counted before any list is made.
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
        raise UserError(f"{flag} {text!r} is not a list of {what}; "
                        f"write a range like {example} or a list like 1,2,3") from None
    count = sum(map(len, ranges))
    if limit is not None and count > limit:
        raise UserError(f"{flag} {text} names {count} {what}, but at most {limit} fit here; "
                        f"pick fewer, e.g. {example}")
    return [i for r in ranges for i in r]


def format_indices(indices):
    """The inverse of parse_indices, with runs written as ranges: [0, 1, 2, 5] -> '0-2,5'."""
    parts, start = [], 0
    for i in range(1, len(indices) + 1):
        if i == len(indices) or indices[i] != indices[i - 1] + 1:
            first, last = indices[start], indices[i - 1]
            parts.append(str(first) if first == last else f"{first}-{last}")
            start = i
    return ",".join(parts)


def check_layer(layer):
    if layer not in STAGES:
        raise UserError(f"--layer {layer!r} is not a stage of the network; choose one of {', '.join(STAGES)}")


def check_channel(model, layer, channel, flag="--channel"):
    channels = model.channels(layer)
    if not 0 <= channel < channels:
        raise UserError(f"{flag} {channel} is out of range: {layer} of this width-{model.width} network "
                        f"has {channels} channels; choose 0..{channels - 1}")


def parse_channels(text, model, layer):
    """--channels: 'auto' -> None (the figure chooses), 'all' -> every channel, else parse_indices, checked."""
    if text == "auto":
        return None
    if text == "all":
        return list(range(model.channels(layer)))
    channels = parse_indices(text, "--channels", "channel indices", "0-15", limit=model.channels(layer))
    for channel in channels:
        check_channel(model, layer, channel, flag="--channels: channel")
    return channels


def check_image_indices(indices, num_images):
    bad = [i for i in indices if not 0 <= i < num_images]
    if bad:
        raise UserError(f"test image index {bad[0]} is out of range: the test split has {num_images} "
                        f"images; choose 0..{num_images - 1}")


def check_path(path):
    if path not in PATHS:
        raise UserError(f"--path {path!r} is not a deconvnet path; choose one of {', '.join(PATHS)}")


# What plot_all.py's scripts would otherwise each load or compute again, once per process: keyed on
# the files (path, modification time, size) it came from, so a rewritten file is read afresh.
_MEMO = {}


def memo(key, compute):
    """compute(), or what it returned the first time it was asked for under `key` in this process."""
    if key not in _MEMO:
        _MEMO[key] = compute()
    return _MEMO[key]


def file_key(path):
    """(resolved path, mtime in ns, size) of a file; just the path if it does not exist (yet)."""
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except OSError:
        return (str(path),)
    return str(path), stat.st_mtime_ns, stat.st_size


def check_ascent(steps, lr, penalty):
    """The optimisation flags of plot_gradient_pattern.py and plot_feature_visualization.py: each
    out-of-range one gets its own line."""
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if not (math.isfinite(lr) and lr > 0):
        raise UserError(f"--lr must be a finite number above 0, got {lr}")
    if not (math.isfinite(penalty) and penalty >= 0):
        raise UserError(f"--penalty must be a finite number, 0 or above (0: no pull towards the start image), "
                        f"got {penalty}")


def load_for_plots(args, test_split=True):
    """Everything a plot script needs, from its parsed flags, with every flag checked.

    The flags are checked first, --figures-dir included, before anything is loaded or computed.
    Returns a namespace: model (eval mode, on args.device), checkpoint (its dict), device, caption
    (checkpoint and data, for titles; the data named by data.describe_dataset) and, with test_split,
    the test images (uint8, on the CPU), labels and class names, and indices: the parsed --images, or
    [--image-index], where the script has that flag; channels: the parsed --channels of --layer (None
    for 'auto'); data_dir, synthetic and trained_on_synthetic (dataset_root(run.data_dir,
    run.synthetic) holds the test split chosen, with run.trained_on_synthetic the checkpoint's
    training data). Only the test split is read. The model and the test split are loaded once per
    process (memo), so plot_all.py's scripts share them; they must not be changed in place.
    """
    for name, check in (("layer", check_layer), ("path", check_path)):
        if hasattr(args, name):
            check(getattr(args, name))
    if hasattr(args, "steps"):
        check_ascent(args.steps, args.lr, args.penalty)
    indices = parse_indices(args.images) if hasattr(args, "images") else None
    check_writable(args.figures_dir, "--figures-dir", folder=True)
    device = resolve_device(args.device)
    checkpoint_key = ("checkpoint", file_key(args.checkpoint), str(device))
    model, ckpt = memo(checkpoint_key, lambda: load_checkpoint(args.checkpoint, device))
    if hasattr(args, "channel"):
        check_channel(model, args.layer, args.channel)
    # --channels of one --layer (the atlas has its own, for several layers)
    channels = parse_channels(args.channels, model, args.layer) if hasattr(args, "layer") and hasattr(args, "channels") else None
    config = ckpt["config"]
    trained_on = config.get("synthetic", False)
    synthetic = trained_on if args.synthetic is None else args.synthetic
    trained_name = config.get("data_name",  # named by data.describe_dataset when it was trained
                              SYNTHETIC_NAME if trained_on else f"the data in {config.get('data_dir', 'data')}")
    caption = f"{Path(args.checkpoint).name}: width-{model.width} ResNet-18 trained on {trained_name}"

    def wrap(text):  # titles hold about 90 characters a line; a long data name takes two
        return textwrap.fill(text, 90, break_long_words=False, break_on_hyphens=False)

    run = SimpleNamespace(model=model, checkpoint=ckpt, device=device, indices=None, channels=channels,
                          caption=wrap(caption), data_dir=args.data_dir or config.get("data_dir", "data"),
                          synthetic=synthetic, trained_on_synthetic=trained_on)
    if test_split:
        root = dataset_root(run.data_dir, synthetic)
        data_key = ("test split", file_key(Path(root) / CIFAR10_FOLDER / "test_batch"))
        run.images, run.labels, run.classes = memo(data_key, lambda: load_cifar10(root, train=False))
        run.key = (checkpoint_key, data_key)  # what test_split_scores are memoized on
        test_name = describe_dataset(root, synthetic)
        if test_name != trained_name:
            run.caption = wrap(f"{caption}; test images from {test_name}")
        if indices is not None:
            run.indices = indices
        elif getattr(args, "image_index", None) is not None:
            run.indices = [args.image_index]
        if run.indices is not None:
            check_image_indices(run.indices, len(run.images))
    return run


# --------------------------------------------------------------------------- what the plots compute

def stage_outputs(model, x, last):
    """Yield (name, output) of every stage from conv1 to `last` for the normalized batch x."""
    for name in STAGES[:STAGES.index(last) + 1]:
        # oneDNN's CPU convolutions and max-pool are ~2x faster channels-last on the 32x32 maps of
        # the first two stages, and faster in NCHW on the small maps after; the values are the same
        big = x.shape[-1] >= 32
        x = model.stage(name)(x.contiguous(memory_format=torch.channels_last if big else torch.contiguous_format))
        yield name, x


def stage_output(model, x, layer):
    """The output of stage `layer` for the normalized batch x, running only the stages up to it."""
    for _, x in stage_outputs(model, x, layer):
        pass
    return x


def channel_scores(model, x, layer, channel):
    """Per image, the sum of `channel`'s feature map at `layer`: the report's activation of a filter.

    channel may also be a list of channels: then (N, len(channel)) scores, one column a channel.
    """
    return stage_output(model, x, layer)[:, channel].sum((-2, -1))


def score_units(model, images, layers, batch_size=None):
    """Score every channel of every stage in `layers` on every image, in one batched pass.

    images: uint8 (N, 3, 32, 32) as load_cifar10 returns them, on any device; they are normalized
    here, batch by batch, on the model's device, and the stages run once, up to the deepest in
    `layers`, under inference mode. batch_size defaults to 100 on a CPU (fastest on 2 cores: the
    activations stay in cache) and 1000 on a GPU. Returns {layer: namespace} holding, per image and
    channel (N, C) on the CPU:
      max     the largest activation in the channel's map (Zeiler & Fergus's criterion),
      argmax  its position as a flat index into the (H, W) map, the first one on ties,
      sum     the sum of the map (the report's criterion, as channel_scores),
    and size, the (H, W) of the stage's maps.
    """
    device = next(model.parameters()).device
    batch_size = batch_size or (100 if device.type == "cpu" else 1000)
    layers = sorted(set(layers), key=STAGES.index)
    parts = {layer: [] for layer in layers}
    sizes = {}
    with torch.inference_mode():
        for start in tqdm(range(0, len(images), batch_size), desc=f"scoring {', '.join(layers)}",
                          unit="batch", leave=False, dynamic_ncols=True):
            x = normalize(images[start:start + batch_size].to(device))
            for name, out in stage_outputs(model, x, layers[-1]):
                if name in parts:
                    sizes[name] = tuple(out.shape[-2:])
                    flat = out.flatten(2).float()
                    peak, where = flat.max(2)
                    parts[name].append((peak.cpu(), where.int().cpu(), flat.sum(2).cpu()))
    return {layer: SimpleNamespace(**{key: torch.cat(column) for key, column in
                                      zip(("max", "argmax", "sum"), zip(*parts[layer]))}, size=sizes[layer])
            for layer in layers}


def top_k(values, k):
    """(indices, values) of the k largest entries of a 1-D tensor, largest first; ties: lower index first."""
    order = torch.sort(values, descending=True, stable=True).indices[:k]
    return order, values[order]


def top_activating(model, images, layer, channel, k=1, batch_size=None):
    """(indices, scores) of the k images whose `channel` at `layer` has the largest feature-map sum.

    score_units's pass, so equal to scoring one image at a time (tested), but batched, under
    inference mode and stopping at `layer`. With a list of channels, all are scored in the same pass
    and both results are (k, len(channel)), one column a channel.
    """
    sums = score_units(model, images, [layer], batch_size)[layer].sum
    if not isinstance(channel, (list, tuple)):
        return top_k(sums[:, channel], k)
    columns = [top_k(sums[:, c], k) for c in channel]
    return tuple(torch.stack(part, 1) for part in zip(*columns))


def test_split_scores(run, layers):
    """score_units over run's test split, computed once per process for each checkpoint, test split,
    device and layer: the scripts plot_all.py runs share one pass (the atlas computes what the
    gradient pattern's search needs)."""
    missing = [layer for layer in layers if (run.key, layer) not in _MEMO]
    if missing:
        for layer, scores in score_units(run.model, run.images, missing).items():
            _MEMO[run.key, layer] = scores
    return {layer: _MEMO[run.key, layer] for layer in layers}


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


def tile(maps, pad=1, fill=float("nan"), header=0, cols=None):
    """(N, H, W) or (N, H, W, 3) maps -> one array: the grid_shape(N) grid (or one of `cols` columns),
    filled row by row, `pad` cells of `fill` apart, each map below `header` rows of `fill` (room for a
    label)."""
    maps = np.asarray(maps, dtype=np.float32)
    n, h, w = maps.shape[:3]
    rows, cols = grid_shape(n) if cols is None else (math.ceil(n / cols), cols)
    cell_h, cell_w = header + h + pad, w + pad
    out = np.full((rows * cell_h - pad, cols * cell_w - pad, *maps.shape[3:]), fill, dtype=np.float32)
    for i, m in enumerate(maps):
        r, c = divmod(i, cols)
        out[r * cell_h + header:r * cell_h + header + h, c * cell_w:c * cell_w + w] = m
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


def short_number(v):
    """An activation as a panel shows it: 3 significant digits, no exponent below 1000."""
    v = float(v)
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def show_mosaic(fig, ax, maps, symmetric=False, labels=None, index_ticks=False):
    """Draw (N, H, W) maps as one mosaic, filled row by row, on one colour scale, with its colour bar.

    symmetric: the scale is -m..m around 0 (for weights) rather than min..max (for feature maps).
    Maps under 16 pixels a side are enlarged (each pixel a block of pixels), so the one-pixel gaps stay
    thin beside them. Without labels the grid is near-square (grid_shape). labels: a text above each
    map, and as many columns as fill the axes. index_ticks: each row is labelled with the index of its
    first map and each column with +0, +1, ..., so map i sits at row label + column label.
    """
    import matplotlib
    maps = maps.detach().float().cpu()
    low, high = (-maps.abs().max(), maps.abs().max()) if symmetric else (maps.min(), maps.max())
    k = max(1, math.ceil(16 / max(maps.shape[-2:])))
    maps = maps.repeat_interleave(k, 1).repeat_interleave(k, 2).numpy()
    n, h, w = maps.shape
    rows, cols = grid_shape(n)

    def points_per_pixel(rows, cols, header):  # how large a mosaic pixel is drawn, from the axes' box
        box = ax.get_position()
        return 72 * min(box.width * fig.get_figwidth() / (cols * (w + 1)),
                        box.height * fig.get_figheight() / (rows * (header + h + 1)))

    header = 0
    if labels is not None:  # room for a label of ~6 points above each map; as many columns as fill the axes
        header = math.ceil(10 / points_per_pixel(rows, cols, 0))
        box = ax.get_position()
        shape = box.width * fig.get_figwidth() / (box.height * fig.get_figheight())
        cols = min(n, max(1, round(math.sqrt(n * shape * (header + h + 1) / (w + 1)))))
        rows = math.ceil(n / cols)
        header = math.ceil(10 / points_per_pixel(rows, cols, 0))
    cmap = matplotlib.colormaps["gray"].with_extremes(bad="lightsteelblue")  # the gaps: no grey level
    image = ax.imshow(tile(maps, header=header, cols=cols), cmap=cmap, vmin=low.item(), vmax=high.item(),
                      interpolation="nearest")
    bare(ax)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    column_centres = [c * (w + 1) + (w - 1) / 2 for c in range(cols)]
    if labels:
        ax.apply_aspect()  # the box as drawn: the labels' size follows from it
        size = points_per_pixel(rows, cols, header)
        fontsize = min(6.5, 0.7 * header * size, 1.6 * w * size / max(map(len, labels)))
        for i, label in enumerate(labels):
            r, c = divmod(i, cols)
            ax.text(column_centres[c], r * (header + h + 1) + (header - 1) / 2, label, ha="center",
                    va="center", fontsize=fontsize)
    if index_ticks:
        ax.set_xticks(column_centres, [f"+{c}" for c in range(cols)])
        ax.set_yticks([r * (h + 1) + (h - 1) / 2 for r in range(rows)], [str(r * cols) for r in range(rows)])
        ax.xaxis.set_ticks_position("top")
        ax.tick_params(length=0, pad=1, labelsize=6 if cols <= 12 else 5)


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
    """RGB panels [(array (H, W, 3) in [0, 1], panel title[, note written across the panel]), ...] in a grid
    with `cols` columns."""
    rows, cols = grid_shape(len(panels)) if cols is None else (math.ceil(len(panels) / cols), cols)
    size = min(max(8 / cols, 1.3), 2.6)  # inches a panel: few panels get room for their titles
    fig = new_figure(size * cols + 0.4, (size + 0.3) * rows + 0.9)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (image, panel_title, *note) in zip(axes, panels):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(panel_title, fontsize=7)
        if note:
            ax.text(0.5, 0.5, note[0], transform=ax.transAxes, ha="center", va="center", fontsize=7)
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

def feature_map_tiles(run, layer, channels=None):
    """What plot_feature_maps shows for the test image run.indices[0], as numbers.

    channels: the channels to show, in that order. None: every channel of a stage with at most
    FEATURE_MAP_TILES, else the FEATURE_MAP_TILES with the largest maximum on this image, most active
    first (ties by index). Returns a namespace: x (the normalized image), maps (all of the stage's
    maps, (C, H, W)), peaks (each map's maximum), channels, labels (None where the channels are all of
    them in index order, which row and column ticks label; else 'channel: maximum' per map), what (for
    the title) and name (the file's, without .png; a chosen list is part of it).
    """
    index = run.indices[0]
    x = normalize(run.images[[index]].to(run.device))
    with torch.inference_mode():
        maps = stage_output(run.model, x, layer)[0].float().cpu()
    total, peaks = len(maps), maps.amax((1, 2))
    name = f"{layer}_feature_maps_image{index}"
    if channels is not None:
        name += f"_channels{format_indices(channels)}"
        what = f"channels {format_indices(channels)} of its {total}"
    elif total <= FEATURE_MAP_TILES:
        channels = list(range(total))
    else:
        channels = torch.argsort(peaks, descending=True, stable=True)[:FEATURE_MAP_TILES].tolist()
        what = f"the {len(channels)} most active of its {total} channels\n(largest maximum on this image first)"
    size = f"{maps.shape[-2]}x{maps.shape[-1]} each"
    if channels == list(range(total)):
        labels, what = None, f"all {total} channels, {size}\nchannel = row label + column label"
    else:
        labels, what = [f"{c}: {short_number(peaks[c])}" for c in channels], f"{what}, {size}; above each: channel: maximum"
    return SimpleNamespace(x=x, maps=maps, peaks=peaks, channels=channels, labels=labels, what=what, name=name)


def plot_feature_maps(run, layer, figures_dir, channels=None):
    """The test image run.indices[0] beside `layer`'s feature maps for it (feature_map_tiles), each
    findable by its channel: by row and column ticks, or by a label above it."""
    t = feature_map_tiles(run, layer, channels)
    grow = max(1.0, grid_shape(len(t.channels))[0] / 12)  # room for the ticks of a large grid
    title = f"{layer} feature maps; {run.caption}"
    maps_title = f"its {layer} feature maps: {t.what}"
    # inches above the axes for the figure's title (10 pt) and the mosaic's (9 pt), however many lines
    head = 0.3 + 0.19 * (title.count("\n") + 1) + 0.17 * (maps_title.count("\n") + 1)
    fig = new_figure(11 * grow, 5.6 * grow + head)
    image_ax, maps_ax = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=(1, 2.2)))
    fig.subplots_adjust(top=1 - head / fig.get_figheight(), bottom=0.5 / fig.get_figheight())
    image_ax.imshow(to_display(t.x)[0], interpolation="nearest")
    bare(image_ax)
    image_ax.set_title(f"test image {image_label(run, run.indices[0])}", fontsize=9)
    show_mosaic(fig, maps_ax, t.maps[t.channels], labels=t.labels, index_ticks=t.labels is None)
    maps_ax.set_title(maps_title, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return save(fig, Path(figures_dir) / f"{t.name}.png")


def reconstruction_panels(run, layer, channel, path="both", top1=False, scale="image"):
    """What plot_reconstructions shows, for each test image of run.indices, as numbers.

    Returns a namespace: images (N, H, W, 3 pixels in [0, 1]); peak and total, the channel's
    activation on each image: the maximum (Zeiler & Fergus's) and the sum (the report's ranking) of its
    feature map over positions; silent, where peak is 0 (the stage ends in a ReLU, so the whole map is 0
    and there is nothing to project); recon, the deconvnet projections r (top1: of the strongest
    activation only); shown, r as drawn, 0.5 + r / (2 m) with m = max|r| of each image (scale 'image')
    or of all of them ('shared'); and m, that max|r| per image.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    x = normalize(run.images[run.indices].to(run.device))
    with torch.inference_mode():
        fmap = stage_output(run.model, x, layer)[:, channel].float().cpu()
    recon = run.model.reconstruct(x, layer, channel, path=path, top1=top1).float().cpu()
    peak, per_image = fmap.amax((1, 2)), scale == "image"
    m = recon.abs().amax((1, 2, 3)) if per_image else recon.abs().max().expand(len(recon))
    return SimpleNamespace(images=to_display(x), peak=peak, total=fmap.sum((1, 2)), silent=peak <= 0,
                           recon=recon, shown=signed_to_display(recon, per_image), m=m)


def plot_reconstructions(run, layer, channel, path, figures_dir, top1=False, scale="image"):
    """Each test image of run.indices beside the deconvnet projection of `layer`/`channel` for it,
    headed by the channel's activation on the image ("silent" where it is 0)."""
    p = reconstruction_panels(run, layer, channel, path, top1, scale)
    panels = []
    for index, image, shown, peak, total, silent in zip(run.indices, p.images, p.shown, p.peak, p.total, p.silent):
        panels.append((image, image_label(run, index, sep="\n")))
        panels.append((shown, "silent:\nactivation 0", "silent") if silent else
                      (shown, f"max {short_number(peak)}\n(sum {short_number(total)})"))
    if any(isinstance(m, BasicBlock) for m in run.model.stage(layer).children()):
        through = {"both": "both branches", "shortcut": "the shortcut", "trunk": "the trunk"}[path]
        through = f" through {through} of each residual sum in {layer}"
    else:
        through = ""  # conv1 has no residual sum, so every path is the same
    what = "deconvnet reconstruction of its strongest activation (top-1)" if top1 else "deconvnet reconstruction"
    display = (RECONSTRUCTION_DISPLAY if scale == "image" else
               f"one scale for all: 0.5 + r / (2 M), M = max|r| over all panels = {p.m[0]:.3g}, grey = 0")
    title = (f"{layer} channel {channel}: {what}{through}, beside its test image\n"
             f"above each reconstruction: the channel's activation on the image, max over positions (sum)\n"
             f"({display}; {run.caption})")
    name = (f"{layer}_channel{channel}_reconstructions" + ("" if path == "both" else f"_{path}")
            + ("_top1" if top1 else "") + ("" if scale == "image" else f"_{scale}scale") + ".png")
    return save_panels(Path(figures_dir) / name, panels, title, cols=2 * grid_shape(len(run.indices))[1])


# --------------------------------------------------------------------------- the atlas
# Zeiler & Fergus's Figure 2 for a ResNet: per channel, the 9 test images with the largest single
# activation, each as the top-1 deconvnet projection and the image patch, both cropped to the
# receptive field of the strongest unit.

ATLAS_LAYERS = "conv2_x,conv3_x,conv4_x,conv5_x"
ATLAS_CHANNELS = 16  # the default: channels 0-15, or every channel of a stage with fewer
OUTSIDE_IMAGE = (0.69, 0.77, 0.87)  # light steel blue: where a receptive field reaches past the image


def parse_layers(text):
    """'conv2_x,conv5_x' -> ['conv2_x', 'conv5_x'], each checked."""
    layers = [name.strip() for name in text.split(",") if name.strip()]
    if not layers:
        raise UserError(f"--layer {text!r} names no stage; choose from {', '.join(STAGES)}")
    for layer in layers:
        check_layer(layer)
    return list(dict.fromkeys(layers))


def atlas_channels(model, layers, text=None):
    """{layer: channels}: the parsed --channels, checked against each layer, or the default."""
    if text is None:
        return {layer: list(range(min(ATLAS_CHANNELS, model.channels(layer)))) for layer in layers}
    channels = parse_indices(text, "--channels", "channel indices", "0-15",
                             limit=max(model.channels(layer) for layer in layers))
    for layer in layers:
        bad = [c for c in channels if not 0 <= c < model.channels(layer)]
        if bad:
            raise UserError(f"--channels: channel {bad[0]} is out of range: {layer} of this width-{model.width} "
                            f"network has {model.channels(layer)} channels; choose 0..{model.channels(layer) - 1}")
    return {layer: channels for layer in layers}


def unit_atlas(run, channels, k=9):
    """{layer: units} for channels = {layer: [channel, ...]}, from one pass over the test split.

    A unit is {"channel": c, "top": [{"image", "activation", "row", "col", "box"}, ... k entries]}:
    the k test images with the largest single activation of the channel, largest first (ties:
    lower image index first); (row, col) is the strongest position in the stage's output and box
    its receptive field [top, left, bottom, right] (inclusive, clipped to the image).
    """
    scores = test_split_scores(run, list(channels))
    size = run.images.shape[-1]
    atlas = {}
    for layer, layer_channels in channels.items():
        s = scores[layer]
        atlas[layer] = []
        for channel in layer_channels:
            top = []
            for image, activation in zip(*(t.tolist() for t in top_k(s.max[:, channel], k))):
                row, col = divmod(int(s.argmax[image, channel]), s.size[1])
                top.append(dict(image=image, activation=activation, row=row, col=col,
                                box=run.model.receptive_field(layer, row, col, size)))
            atlas[layer].append(dict(channel=channel, top=top))
    return atlas


def crop(image, box):
    """The part of an (H, W, ...) array inside box = [top, left, bottom, right] (inclusive)."""
    top, left, bottom, right = box
    return image[top:bottom + 1, left:right + 1]


def atlas_crops(run, layer, unit):
    """(projections, patches) of one atlas unit: per entry, an (h, w, 3) array in [0, 1] cropped to
    its box. The projections are ResNet.reconstruct(..., top1=True) of the unit's channel, all k
    on one display scale, 0.5 + r / (2 max|r|) with the max over the k, so strengths compare."""
    x = normalize(run.images[[entry["image"] for entry in unit["top"]]].to(run.device))
    projections = signed_to_display(run.model.reconstruct(x, layer, unit["channel"], top1=True), per_image=False)
    boxes = [entry["box"] for entry in unit["top"]]
    return ([crop(p, box) for p, box in zip(projections, boxes)],
            [crop(p, box) for p, box in zip(to_display(x), boxes)])


def field_canvas(patch, box, field, size):
    """A cropped patch on a canvas as large as its receptive field (at most size x size), placed
    where the image lies within the field; the rest, outside the image, is OUTSIDE_IMAGE.

    field: the unclipped field [top, left, bottom, right] (ResNet.receptive_field(clip=False)).
    A field larger than the image gets a size x size canvas, and the patch sits on the side where
    it meets the image border.
    """
    height, width = (min(field[i + 2] - field[i] + 1, size) for i in (0, 1))
    canvas = np.empty((height, width, 3), dtype=np.float32)
    canvas[:] = OUTSIDE_IMAGE
    h, w = patch.shape[:2]
    top, left = (min(box[i] - field[i], extent - n) for i, extent, n in ((0, height, h), (1, width, w)))
    canvas[top:top + h, left:left + w] = patch
    return canvas


def plot_unit_atlas(run, layer, units, checkpoint, figures_dir, blocks_per_row=4):
    """figures_dir/atlas_<layer>.png and .json of unit_atlas's units for one stage; returns both paths."""
    size = run.images.shape[-1]
    cols = min(blocks_per_row, len(units))
    rows = math.ceil(len(units) / cols)
    title_lines = 2 + run.caption.count("\n") + 1  # the suptitle below: two lines, then the caption
    head = 0.2 + 0.17 * title_lines  # inches a 9-pt title needs, so it never runs into the first row
    fig = new_figure(3.5 * cols + 0.3, 1.9 * rows + 0.4 + head)
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw=dict(wspace=0.08, hspace=0.3)).ravel()
    for ax, unit in zip(axes, units):
        halves = ([], [])  # the projections' canvases, the patches'
        for entry, *crops in zip(unit["top"], *atlas_crops(run, layer, unit)):
            field = run.model.receptive_field(layer, entry["row"], entry["col"], size, clip=False)
            for canvases, patch in zip(halves, crops):
                canvases.append(field_canvas(patch, entry["box"], field, size))
                if entry["activation"] <= 0:
                    canvases[-1][:] = 1.0  # silent on this image: no strongest unit to show
        halves = [tile(canvases, fill=1.0) for canvases in halves]
        gap = np.ones((halves[0].shape[0], max(2, halves[0].shape[1] // 12), 3), dtype=np.float32)
        ax.imshow(np.concatenate([halves[0], gap, halves[1]], axis=1), interpolation="nearest")
        best = unit["top"][0]["activation"]
        silent = sum(entry["activation"] <= 0 for entry in unit["top"])
        label = f"channel {unit['channel']}: max {best:.3g}"
        if silent == len(unit["top"]):
            label = f"channel {unit['channel']}: silent on every test image"
        elif silent:
            firing = len(unit["top"]) - silent
            label += f"; fires on only {firing} test image{'s' if firing > 1 else ''}"
        ax.set_title(label, fontsize=8, loc="left")
    for ax in axes:
        bare(ax)
        ax.set_frame_on(ax.has_data())
    top, _, bottom, _ = run.model.receptive_field(layer, 0, 0, size, clip=False)
    extent = bottom - top + 1  # the side of every unit's field in this stage
    if all(entry["box"] == [0, 0, size - 1, size - 1] for unit in units for entry in unit["top"]):
        seen = "the whole image"
    else:
        seen = (f"the receptive field of the strongest unit ({extent}x{extent}" +
                (f", at most the {size}x{size} image" if extent > size else "") + "; light blue: outside the image)")
    fig.suptitle(f"{layer}: for each channel, the {len(units[0]['top'])} test images with its largest single "
                 f"activation (largest top left, row by row);\nleft: the top-1 deconvnet projection, one "
                 f"scale per channel (0.5 + r / (2 max|r|), grey = 0); right: the image; both show {seen}\n"
                 f"{run.caption}", fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - (head + 0.25) / fig.get_figheight())
    figures_dir = Path(figures_dir)
    png = save(fig, figures_dir / f"atlas_{layer}.png")
    json_path = figures_dir / f"atlas_{layer}.json"
    # {"layer": ..., "checkpoint": ..., "units": [...]}, one line per image for a reader
    units_text = ",\n".join(f' {{"channel": {unit["channel"]}, "top": [\n  ' +
                            ",\n  ".join(json.dumps(entry) for entry in unit["top"]) + "]}" for unit in units)
    json_path.write_text(f'{{"layer": {json.dumps(layer)}, "checkpoint": {json.dumps(str(checkpoint))}, '
                         f'"units": [\n{units_text}]}}\n')
    print(f"wrote {json_path}")
    return [png, json_path]


# --------------------------------------------------------------------------- feature visualization
# Regularised activation maximisation sized for 32x32 inputs (plot_feature_visualization.py): the
# image is parametrised as a sigmoid of a colour-decorrelated, 1/f-scaled Fourier image, and it must
# excite its channel through small random jitters, scalings and rotations. The colour statistics
# come from the checkpoint's own training data, the transformation ranges from the network's own
# training augmentation (crops shifted by up to 4 px).

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
