"""Does the network look at the object or at its context? Zeiler & Fergus's occlusion experiment (2014,
section 4.2 and their Figure 7), plot_occlusion.py's: a grey square slid over a test image, and what
the network does as a function of where the square is.

    maps = occlusion_maps(model, images, labels, k=8, s=1)   # OcclusionMaps

The square is k x k pixels set to 0 in normalised space (the data's mean colour, grey for CIFAR-10), all
three colours, at the positions of attribution.occlusion_windows (top-left corners at rows and columns
0, s, 2s, ... while the square fits, plus one flush with the far edge where those stop short of it); the
occluded copies of all images go through the network together (attribution.occluded_copies). For
each image and each position of the square, the panels of their Figure 7:
    (b) activation   the total activation (sum over its 2x2 map) of the image's strongest conv5_x channel:
                     the channel whose map sums highest on the unoccluded image (the first on a tie)
    (c)              that channel projected back to the pixels (ResNet.reconstruct, the whole feature map)
                     on the image and on the 3 other test images it responds to most (plot_occlusion draws
                     it; it does not depend on the square)
    (d) probability  p(true class), the softmax of the logits
    (e) predicted    the most probable class, the argmax of the same logits (the first on a tie)
Each map is indexed by the square's position (row, column of its top-left corner, `starts`), and the
figure draws it over the image with each value at the square's centre.
"""
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data import normalize
from model import STAGES
from visualize.attribution import occluded_copies, occlusion_windows, resolve_baseline, window_starts
from visualize.context import test_split_scores
from visualize.drawing import (METHOD_TITLES, TITLE_WIDTH, bare, colour_mapped, new_figure, save, save_json, signed_to_display,
                               short_number, to_display, wrap_title)
from visualize.evidence import float32_lists
from visualize.scoring import default_batch_size, stage_output, top_k
from visualize.trust import predicted_or_true

LAYER = STAGES[-1]  # conv5_x, whose strongest map Zeiler & Fergus follow (their layer 5)
OTHER_IMAGES = 3  # panel (c): the projection also on this many other test images, those the channel likes most


@dataclass
class OcclusionMaps:
    """The occlusion experiment on N images, on the CPU in the model's dtype; P = len(starts) positions a side."""
    starts: list                 # the square's top-left rows (and columns), in order
    channel: torch.Tensor        # (N,) the strongest conv5_x channel of each unoccluded image
    total: torch.Tensor          # (N,) its total activation on the unoccluded image
    logits: torch.Tensor         # (N, classes) of the unoccluded images
    activation: torch.Tensor     # (N, P, P) (b): the channel's total activation, the square at each position
    occluded_logits: torch.Tensor  # (N, P, P, classes): the logits, the square at each position
    probability: torch.Tensor    # (N, P, P) (d): p(true class)
    predicted: torch.Tensor      # (N, P, P) (e): the most probable class


@torch.no_grad()
def occlusion_maps(model, images, labels, k=8, s=1, batch_size=None):
    """OcclusionMaps of the uint8 images (N, 3, 32, 32) with true classes `labels`, a k x k square at
    stride s (attribution.check_options says what k and s may be), batch_size rows a pass."""
    if model.training:
        raise ValueError("occlusion_maps needs the model in eval mode (BatchNorm's running statistics)")
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    batch_size = batch_size or default_batch_size(device)
    x = normalize(images.to(device)).to(dtype)
    labels = torch.as_tensor(labels, dtype=torch.long)
    n, starts = len(x), window_starts(x.shape[-1], k, s)
    unoccluded = stage_output(model, x, LAYER)
    totals = unoccluded.sum((2, 3))
    channel = totals.argmax(1)
    masks = occlusion_windows(k, s, x.shape[-1])
    activation, logits = [], []
    for rows, image in tqdm(occluded_copies(x, masks, resolve_baseline(x, None), batch_size), desc="occlusion",
                            total=math.ceil(len(masks) * n / batch_size), unit="batch", leave=False,
                            dynamic_ncols=True):
        out = stage_output(model, rows, LAYER)
        activation.append(out[torch.arange(len(out), device=device), channel[image]].sum((1, 2)))
        logits.append(model.head(out))
    p = len(starts)
    activation = torch.cat(activation).view(p, p, n).permute(2, 0, 1).cpu()  # window-major rows
    occluded = torch.cat(logits).view(p, p, n, -1).permute(2, 0, 1, 3).cpu()
    probability = occluded.double().softmax(-1).gather(-1, labels.view(n, 1, 1, 1).expand(n, p, p, 1))[..., 0]
    return OcclusionMaps(starts=starts, channel=channel.cpu(), total=totals.gather(1, channel[:, None])[:, 0].cpu(),
                         logits=model.head(unoccluded).cpu(), activation=activation,
                         occluded_logits=occluded, probability=probability.to(occluded.dtype),
                         predicted=occluded.argmax(-1))


def projections(run, index, channel, method):
    """Panel (c): (test image indices, their projections (M, 3, 32, 32), the channel's total on each) for
    test image `index` and the OTHER_IMAGES other test images with the largest total of `channel`."""
    sums = test_split_scores(run, [LAYER])[LAYER].sum[:, channel]
    order, _ = top_k(sums, OTHER_IMAGES + 1)
    indices = [index] + [i for i in order.tolist() if i != index][:OTHER_IMAGES]
    x = normalize(run.images[indices].to(run.device))
    recon = run.model.reconstruct(x, LAYER, channel, method=method).float().cpu()
    return indices, recon, sums[indices]


# --------------------------------------------------------------------------- the figure and the JSON

def square_centres(starts, k):
    """The edges (P + 1) of the cells that put each value at its square's centre, in pixel coordinates
    (pixel i spans i - 0.5 .. i + 0.5, as imshow draws it)."""
    centres = np.asarray(starts, dtype=float) + (k - 1) / 2
    if len(centres) == 1:
        return np.array([centres[0] - k / 2, centres[0] + k / 2])
    middle = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[centres[0] - (centres[1] - centres[0]) / 2], middle,
                           [centres[-1] + (centres[-1] - centres[-2]) / 2]])


def class_colours(classes):
    """(colour map, vmin, vmax): class c drawn as the colour map's value at c."""
    cmap = "tab10" if classes <= 10 else "tab20" if classes <= 20 else "turbo"
    return cmap, -0.5, (10 if classes <= 10 else 20 if classes <= 20 else classes) - 0.5


def draw_map(fig, ax, grey, edges, values, cmap, low, high, bar=True):
    """`values` (P, P) over the image in grey, each cell at its square's centre, half transparent."""
    ax.imshow(grey, interpolation="nearest")
    mesh = ax.pcolormesh(edges, edges, values, cmap=cmap, vmin=low, vmax=high, alpha=0.65, shading="flat")
    ax.set_xlim(-0.5, grey.shape[1] - 0.5)
    ax.set_ylim(grey.shape[0] - 0.5, -0.5)
    bare(ax)
    if bar:
        colourbar = fig.colorbar(mesh, ax=ax, fraction=0.046, pad=0.02)
        colourbar.ax.tick_params(labelsize=6)


def plot_occlusion(run, indices, k, s, method, figures_dir, record, stem):
    """plot_occlusion.py: a row a test image of `indices`, the panels (a)-(e); figures_dir/<stem>.png and
    .json (record: the figure's, cli's figure_record). Returns both paths."""
    labels = predicted_or_true(run, indices, "true")
    maps = occlusion_maps(run.model, run.images[indices], labels, k, s)
    shown = to_display(normalize(run.images[indices]))
    greys = shown.mean(3, keepdims=True).repeat(3, 3)
    edges = square_centres(maps.starts, k)
    cmap, low, high = class_colours(len(run.classes))
    panels = [projections(run, index, int(maps.channel[i]), method) for i, index in enumerate(indices)]

    columns = 2 + 1 + OTHER_IMAGES + 2  # (a), (b), (c) on this image and the others, (d), (e)
    fig = new_figure(1.55 * columns + 0.6, 2.1 * len(indices) + 1.0)
    axes = fig.subplots(len(indices), columns, squeeze=False)
    p_true = maps.logits.double().softmax(1).gather(1, labels[:, None])[:, 0]
    for i, (index, row) in enumerate(zip(indices, axes)):
        c, (seen, recon, totals) = int(maps.channel[i]), panels[i]
        worst = np.unravel_index(int(maps.probability[i].argmin()), maps.probability[i].shape)
        top, left = maps.starts[worst[0]], maps.starts[worst[1]]
        row[0].imshow(shown[i], interpolation="nearest")
        row[0].plot([left - 0.5, left + k - 0.5, left + k - 0.5, left - 0.5, left - 0.5],
                    [top - 0.5, top - 0.5, top + k - 0.5, top + k - 0.5, top - 0.5], color="yellow", lw=1)
        bare(row[0])
        row[0].set_ylabel(f"{run.image_label(index, sep=chr(10))}", fontsize=7)
        row[0].set_xlabel(f"p(true) {p_true[i]:.2f}; square\nwhere it drops most", fontsize=6)
        draw_map(fig, row[1], greys[i], edges, maps.activation[i].numpy(), "viridis",
                 float(maps.activation[i].min()), max(float(maps.activation[i].max()), 1e-30))
        row[1].set_xlabel(f"channel {c}, unoccluded {short_number(maps.total[i])}", fontsize=6)
        for ax, image_index, r, total in zip(row[2:2 + 1 + OTHER_IMAGES], seen, recon, totals):
            ax.imshow(signed_to_display(r[None])[0], interpolation="nearest")
            bare(ax)
            ax.set_xlabel(f"{'this image' if image_index == index else run.image_label(image_index)}\n"
                          f"total {short_number(total)}", fontsize=6)
        draw_map(fig, row[-2], greys[i], edges, maps.probability[i].numpy(), "magma", 0, 1)
        draw_map(fig, row[-1], greys[i], edges, maps.predicted[i].numpy(), cmap, low, high, bar=False)
        counts = torch.bincount(maps.predicted[i].flatten(), minlength=len(run.classes))
        row[-1].set_xlabel(f"mostly {run.classes[int(counts.argmax())]}", fontsize=6)
    titles = ["(a) test image", f"(b) total activation of\nits strongest {LAYER} map",
              f"(c) that map's {method}\non this image", *[f"(c) on the test image\nit excites most (#{j + 1})"
                                                              for j in range(OTHER_IMAGES)],
              "(d) p(true class)", "(e) most probable class"]
    for ax, title in zip(axes[0], titles):
        ax.set_title(title, fontsize=7)
    colours = colour_mapped(np.arange(len(run.classes)), cmap, low, high)
    for c, name in enumerate(run.classes):  # the legend's entries, with no marker of their own drawn
        axes[0][-1].plot([], [], "s", color=colours[c], label=name)
    handles, names = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(10, len(names)), fontsize=6.5, frameon=False)
    title = "\n".join(wrap_title(part, 2 * TITLE_WIDTH) for part in (
        f"occlusion (Zeiler & Fergus's Figure 7): a {k}x{k} square of the data's mean colour slid over each test "
        f"image (stride {s}); (b), (d), (e) drawn over the image, each value at the square's centre",
        f"(b) the total activation of the image's strongest {LAYER} channel (the largest sum unoccluded); (c) that "
        f"channel's whole map projected to the pixels ({METHOD_TITLES[method]}), 0.5 + r / (2 max|r|) (grey 0), on this image and the "
        f"{OTHER_IMAGES} other test images it excites most; (d) the probability of the true class; (e) the "
        f"most probable class, as the legend's colours", run.caption.replace("\n", " ")))
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0.35 / fig.get_figheight(), 1, 1))  # it leaves room for the suptitle
    figures_dir = Path(figures_dir)
    png = save(fig, figures_dir / f"{stem}.png")

    data = {"figure": record, "square": k, "stride": s, "baseline": "0 in normalised space (the data's mean colour)",
            "method": method, "layer": LAYER, "starts": maps.starts, "classes": list(run.classes), "per_image": [
                {"index": index, "true": int(labels[i]), "true_name": run.classes[labels[i]],
                 "probability": float(p_true[i]), "channel": int(maps.channel[i]), "total": float(maps.total[i]),
                 "activation": float32_lists(maps.activation[i]), "true_probability": float32_lists(maps.probability[i]),
                 "predicted": maps.predicted[i].tolist(),
                 "projections": {"images": panels[i][0], "totals": float32_lists(panels[i][2]),
                                 "maps": float32_lists(panels[i][1])}}
                for i, index in enumerate(indices)]}
    return [png, save_json(figures_dir / f"{stem}.json", data)]
