"""The unit atlas: Zeiler & Fergus's Figure 2 for a ResNet. Per channel, the 9 test images with the
largest single activation, each as the top-1 projection back to the pixels and the image patch, both
cropped to the receptive field of the strongest unit (ResNet.receptive_field, from the architecture),
under the unit's numbers (units.py): its class selectivity and what ablating it costs.
"""
import math
from pathlib import Path

import numpy as np
import torch

from data import normalize
from visualize import cli, units as unit_numbers
from visualize.context import test_split_scores
from visualize.drawing import (METHOD_TITLES, bare, method_suffix, new_figure, save, save_json, signed_to_display, tile,
                               to_display)
from visualize.scoring import top_k

ATLAS_LAYERS = "conv2_x,conv3_x,conv4_x,conv5_x"
ATLAS_CHANNELS = 16  # the default: channels 0-15, or every channel of a stage with fewer


def channels_help(count):
    """--channels' default in words: the first `count` channels, or every channel of a stage with fewer."""
    return f"0-{count - 1}, or every channel of a stage with fewer"


DEFAULT_CHANNELS_HELP = channels_help(ATLAS_CHANNELS)
OUTSIDE_IMAGE = (0.69, 0.77, 0.87)  # light steel blue: where a receptive field reaches past the image


def default_channels(model, layers, count=ATLAS_CHANNELS):
    """{layer: channels} shown unless told: channels 0..count-1 (the atlas's ATLAS_CHANNELS), or all of a
    stage with fewer."""
    return {layer: list(range(min(count, model.channels(layer)))) for layer in layers}


def unit_atlas(run, channels, k=9, ablation_images=None):
    """{layer: units} for channels = {layer: [channel, ...]}: one pass over the test split scores
    them all, one more over its first `ablation_images` (default: units.ABLATION_IMAGES, or all of a
    smaller split) ablates them.

    A unit is a dict:
        channel       c
        top           k entries {"image", "activation", "row", "col", "box"}: the k test images with the
                      largest single activation of the channel, largest first (ties: lower image index
                      first); (row, col) is the strongest position in the stage's output and box its
                      receptive field [top, left, bottom, right] (inclusive, clipped to the image)
        classes       the class name of each of those k images
        selectivity   units.class_selectivity over the whole test split, from the same scores
        leading_class the class of mu_max, the class it responds to most (None for a silent unit)
        ablation      units.ablation_effect: test accuracy with the channel set to 0, beside the network's
                      own, and the class whose accuracy drops most, over the first `images` test images
    """
    scores = test_split_scores(run, list(channels))
    labels = torch.as_tensor(run.labels)
    ablation_images = min(unit_numbers.ABLATION_IMAGES, len(labels)) if ablation_images is None else ablation_images
    unablated, ablated = unit_numbers.ablate(run.model, run.images[:ablation_images], channels)
    size = run.images.shape[-1]
    atlas = {}
    for layer, layer_channels in channels.items():
        s = scores[layer]
        selectivity, leading = unit_numbers.class_selectivity(s.mean, labels)
        atlas[layer] = []
        for column, channel in enumerate(layer_channels):
            top = top_entries(run.model, layer, s, channel, k, size)
            lead = int(leading[channel])
            atlas[layer].append(dict(
                channel=channel, top=top, classes=[run.classes[labels[entry["image"]]] for entry in top],
                selectivity=float(selectivity[channel]), leading_class=run.classes[lead] if lead >= 0 else None,
                ablation=unit_numbers.ablation_effect(ablated[layer][:, column], unablated,
                                                      labels[:ablation_images], run.classes)))
    return atlas


def top_entries(model, layer, scores, channel, k, size):
    """The atlas's `top` of one channel: k entries {"image", "activation", "row", "col", "box"}, from the
    stage's scoring.UnitScores (see unit_atlas); size: the images' side, for the receptive fields."""
    top = []
    for image, activation in zip(*(t.tolist() for t in top_k(scores.max[:, channel], k))):
        row, col = divmod(int(scores.argmax[image, channel]), scores.size[1])
        top.append(dict(image=image, activation=activation, row=row, col=col,
                        box=model.receptive_field(layer, row, col, size)))
    return top


def crop(image, box):
    """The part of an (H, W, ...) array inside box = [top, left, bottom, right] (inclusive)."""
    top, left, bottom, right = box
    return image[top:bottom + 1, left:right + 1]


def atlas_crops(run, layer, unit, method="deconvnet"):
    """(projections, patches) of one atlas unit: per entry, an (h, w, 3) array in [0, 1] cropped to
    its box. The projections are ResNet.reconstruct(..., top1=True, method=method) of the unit's
    channel, all k on one display scale, 0.5 + r / (2 max|r|) with the max over the k, so strengths
    compare."""
    x = normalize(run.images[[entry["image"] for entry in unit["top"]]].to(run.device))
    recon = run.model.reconstruct(x, layer, unit["channel"], top1=True, method=method)
    projections = signed_to_display(recon, per_image=False)
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


def unit_block(run, layer, unit, method="deconvnet"):
    """One unit's picture, as an (h, w, 3) array in [0, 1]: its k projections tiled, a gap, its k image
    patches tiled, each on a canvas as large as its receptive field (field_canvas); white where the unit
    is silent on the image (no strongest unit to show)."""
    size = run.images.shape[-1]
    halves = ([], [])  # the projections' canvases, the patches'
    for entry, *crops in zip(unit["top"], *atlas_crops(run, layer, unit, method)):
        field = run.model.receptive_field(layer, entry["row"], entry["col"], size, clip=False)
        for canvases, patch in zip(halves, crops):
            canvases.append(field_canvas(patch, entry["box"], field, size))
            if entry["activation"] <= 0:
                canvases[-1][:] = 1.0
    halves = [tile(canvases, fill=1.0) for canvases in halves]
    gap = np.ones((halves[0].shape[0], max(2, halves[0].shape[1] // 12), 3), dtype=np.float32)
    return np.concatenate([halves[0], gap, halves[1]], axis=1)


def unit_label(unit):
    """The three lines above a unit's block: its channel and strongest activation; its leading class
    and class selectivity; its ablation, test accuracy without -> with the channel at 0, and the
    class that loses most (in percentage points)."""
    best = unit["top"][0]["activation"]
    silent = sum(entry["activation"] <= 0 for entry in unit["top"])
    label = f"channel {unit['channel']}: max {best:.3g}"
    if silent == len(unit["top"]):
        label = f"channel {unit['channel']}: silent on every test image"
    elif silent:
        firing = len(unit["top"]) - silent
        label += f"; fires on only {firing} test image{'s' if firing > 1 else ''}"
    lead = unit["leading_class"]
    label += (f"\nmost active on {lead}: selectivity {unit['selectivity']:.2f}" if lead is not None else
              "\nsilent on the whole test split: selectivity 0")
    a = unit["ablation"]
    loss = f"{a['class']} -{100 * a['class_drop']:.1f} pts" if a["class_drop"] > 0 else "no class loses"
    return label + f"\nablated: accuracy {100 * a['unablated_accuracy']:.1f}% -> {100 * a['accuracy']:.1f}%, {loss}"


ATLAS_NAMED = ("--layer", "--method")  # the flags an atlas file name writes its way


def plot_unit_atlas(run, layer, units, checkpoint, figures_dir, method="deconvnet", blocks_per_row=4, figure=None):
    """figures_dir/atlas_<layer>.png and .json of unit_atlas's units for one stage, the projections
    by `method` (one of model.METHODS; the file names carry any but the deconvnet); returns both paths.
    With `figure` (a cli.figure_record) the JSON holds it and the file names carry its other flags."""
    size = run.images.shape[-1]
    blocks = [unit_block(run, layer, unit, method) for unit in units]
    cols = min(blocks_per_row, len(units))
    rows = math.ceil(len(units) / cols)
    title_lines = 4 + run.caption.count("\n") + 1  # the suptitle below: four lines, then the caption
    head = 0.2 + 0.17 * title_lines  # inches a 9-pt title needs, so it never runs into the first row
    fig = new_figure(3.5 * cols + 0.3, 2.3 * rows + 0.4 + head)  # 0.4 of each row's 2.3 inches: the 3-line label
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw=dict(wspace=0.08, hspace=0.42)).ravel()
    for ax, unit, block in zip(axes, units, blocks):
        ax.imshow(block, interpolation="nearest")
        ax.set_title(unit_label(unit), fontsize=8, loc="left")
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
                 f"activation (largest top left, row by row);\nleft: the top-1 {METHOD_TITLES[method]}, one "
                 f"scale per channel (0.5 + r / (2 max|r|), grey = 0); right: the image; both show {seen}\n"
                 f"above each: the class with the largest mean activation and the class selectivity index "
                 f"(mu_max - mu_rest) / (mu_max + mu_rest) over the test split (Morcos et al. 2018);\nthe "
                 f"accuracy on the first {units[0]['ablation']['images']} test images"
                 f"{' (the quick run: few, a rough estimate)' if cli.is_quick(figure) else ''} with the channel set to 0, "
                 f"and the class that loses most\n{run.caption}", fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - (head + 0.45) / fig.get_figheight())
    figures_dir = Path(figures_dir)
    name = f"atlas_{layer}{method_suffix(method)}" + (cli.name_suffix(figure, ATLAS_NAMED) if figure else "")
    png = save(fig, figures_dir / f"{name}.png")
    record = {"layer": layer, "checkpoint": str(checkpoint), "method": method, "units": units}
    return [png, save_json(figures_dir / f"{name}.json", {"figure": figure, **record} if figure else record, indent=1)]
