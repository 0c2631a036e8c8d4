"""The report's figures of one unit or one image: a stage's feature maps for a test image, and the
projection of one channel back to the pixels for several test images. Scripts that show the same
kind of figure with different defaults share these functions; each first computes its numbers
(feature_map_tiles, reconstruction_panels: tested), then draws them. The three reconstruction scripts
share their main, reconstructions_main.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data import normalize
from model import BasicBlock
from visualize import cli
from visualize.drawing import (FEATURE_MAP_TILES, METHOD_TITLES, SCALES, bare, format_indices, grid_shape,
                               method_suffix, new_figure, save, save_json, save_panels, short_number, show_mosaic,
                               signed_to_display, to_display)
from visualize.scoring import stage_output

RECONSTRUCTION_DISPLAY = "each image shown as 0.5 + r / (2 max|r|), so grey is 0"


@dataclass
class FeatureMapTiles:
    """What plot_feature_maps shows, as numbers."""
    x: torch.Tensor        # the normalized image (1, 3, H, W)
    maps: torch.Tensor     # all of the stage's maps (C, H, W)
    peaks: torch.Tensor    # each map's maximum (C,)
    channels: list         # the channels shown, in order
    labels: list | None    # 'channel: maximum' per map; None where all are shown in index order (ticks)
    what: str              # for the title
    name: str              # the file's, without .png; a chosen list is part of it


@dataclass
class Reconstructions:
    """What plot_reconstructions shows, for N test images, as numbers."""
    images: np.ndarray     # (N, H, W, 3) pixels in [0, 1]
    peak: torch.Tensor     # the channel's largest activation on each image (Zeiler & Fergus's)
    total: torch.Tensor    # the sum of its map (the report's ranking)
    silent: torch.Tensor   # peak is 0: the stage ends in a ReLU, so the map is 0, nothing to project
    recon: torch.Tensor    # the projections r (N, 3, H, W)
    shown: np.ndarray      # r as drawn, 0.5 + r / (2 m)
    m: torch.Tensor        # that m per image: its own max|r| (scale 'image') or that of all ('shared')


def feature_map_tiles(run, index, layer, channels=None):
    """What plot_feature_maps shows for test image `index`, as numbers (FeatureMapTiles).

    channels: the channels to show, in that order. None: every channel of a stage with at most
    FEATURE_MAP_TILES, else the FEATURE_MAP_TILES with the largest maximum on this image, most active
    first (ties by index).
    """
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
    return FeatureMapTiles(x=x, maps=maps, peaks=peaks, channels=channels, labels=labels, what=what, name=name)


FEATURE_MAP_NAMED = ("--image-index", "--layer", "--channels")  # the flags a feature-map file name writes its way


def plot_feature_maps(run, index, layer, figures_dir, channels=None, figure=None):
    """Test image `index` beside `layer`'s feature maps for it (feature_map_tiles), each
    findable by its channel: by row and column ticks, or by a label above it. With `figure` (a
    cli.figure_record) the JSON beside it holds it, the channels shown and their maxima, and the file
    names carry its other flags. Returns the paths."""
    t = feature_map_tiles(run, index, layer, channels)
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
    image_ax.set_title(f"test image {run.image_label(index)}", fontsize=9)
    show_mosaic(fig, maps_ax, t.maps[t.channels], labels=t.labels, index_ticks=t.labels is None)
    maps_ax.set_title(maps_title, fontsize=9)
    fig.suptitle(title, fontsize=10)
    name = t.name + (cli.name_suffix(figure, FEATURE_MAP_NAMED) if figure else "")
    png = save(fig, Path(figures_dir) / f"{name}.png")
    if figure is None:
        return [png]
    return [png, save_json(Path(figures_dir) / f"{name}.json", {
        "figure": figure, "layer": layer, "image": index, "channels": t.channels,
        "maxima": [float(t.peaks[c]) for c in t.channels]})]


def reconstruction_panels(run, indices, layer, channel, path="both", top1=False, scale="image", method="deconvnet"):
    """What plot_reconstructions shows, for each of the test images `indices`, as numbers
    (Reconstructions): the projections of ResNet.reconstruct by `method` (top1: of the strongest
    activation only)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    x = normalize(run.images[indices].to(run.device))
    with torch.inference_mode():
        fmap = stage_output(run.model, x, layer)[:, channel].float().cpu()
    recon = run.model.reconstruct(x, layer, channel, path=path, top1=top1, method=method).float().cpu()
    peak, per_image = fmap.amax((1, 2)), scale == "image"
    m = recon.abs().amax((1, 2, 3)) if per_image else recon.abs().max().expand(len(recon))
    return Reconstructions(images=to_display(x), peak=peak, total=fmap.sum((1, 2)), silent=peak <= 0,
                           recon=recon, shown=signed_to_display(recon, per_image), m=m)


RECONSTRUCTION_NAMED = ("--layer", "--channel", "--path", "--method", "--top1", "--scale")  # as the name writes them


def plot_reconstructions(run, indices, layer, channel, path, figures_dir, top1=False, scale="image",
                         method="deconvnet", figure=None):
    """Each of the test images `indices` beside the projection of `layer`/`channel` for it by `method`
    (one of model.METHODS), headed by the channel's activation on the image ("silent" where it is 0).
    With `figure` (a cli.figure_record) the JSON beside it holds it and the activations shown, and the
    file names carry its other flags. Returns the paths."""
    p = reconstruction_panels(run, indices, layer, channel, path, top1, scale, method)
    panels = []
    for index, image, shown, peak, total, silent in zip(indices, p.images, p.shown, p.peak, p.total, p.silent):
        panels.append((image, run.image_label(index, sep="\n")))
        panels.append((shown, "silent:\nactivation 0", "silent") if silent else
                      (shown, f"max {short_number(peak)}\n(sum {short_number(total)})"))
    if any(isinstance(m, BasicBlock) for m in run.model.stage(layer).children()):
        through = {"both": "both branches", "shortcut": "the shortcut", "trunk": "the trunk"}[path]
        through = f" through {through} of each residual sum in {layer}"
    else:
        through = ""  # conv1 has no residual sum, so every path is the same
    what = METHOD_TITLES[method] + (" of its strongest activation (top-1)" if top1 else "")
    display = (RECONSTRUCTION_DISPLAY if scale == "image" else
               f"one scale for all: 0.5 + r / (2 M), M = max|r| over all panels = {p.m[0]:.3g}, grey = 0")
    title = (f"{layer} channel {channel}: {what}{through}, beside its test image\n"
             f"above each reconstruction: the channel's activation on the image, max over positions (sum)\n"
             f"({display}; {run.caption})")
    name = (f"{layer}_channel{channel}_reconstructions" + ("" if path == "both" else f"_{path}")
            + method_suffix(method) + ("_top1" if top1 else "") + ("" if scale == "image" else f"_{scale}scale")
            + (cli.name_suffix(figure, RECONSTRUCTION_NAMED) if figure else ""))
    png = save_panels(Path(figures_dir) / f"{name}.png", panels, title, cols=2 * grid_shape(len(indices))[1])
    if figure is None:
        return [png]
    return [png, save_json(Path(figures_dir) / f"{name}.json", {
        "figure": figure, "layer": layer, "channel": channel, "path": path, "method": method, "top1": top1,
        "scale": scale, "images": list(indices), "activation": p.peak.tolist(), "sum": p.total.tolist()})]


def reconstructions_main(doc, argv, script, layer, channel, path=None):
    """main() of the three reconstruction scripts (`script`: its __file__): test images 4531-4546 beside their
    projections from `layer`/`channel`, through `path` at the residual sums (None: the --path flag, default both)."""
    parser = cli.plot_parser(doc, script=script, images="4531-4546", layer=layer, channel=channel,
                             path="both" if path is None else None, top1=False, scale="image", method="deconvnet")
    args = parser.parse_args(argv)
    run = parser.load(args)
    return plot_reconstructions(run, args.images, args.layer, args.channel, path or args.path, args.figures_dir,
                                args.top1, args.scale, args.method, parser.figure_record(args, "reconstructions", run))
