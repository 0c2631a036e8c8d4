"""How much the network's representation and its answer change as an image is moved, scaled or turned:
Zeiler & Fergus's invariance experiment (2014, section 4.3 and their Figure 5), plot_invariance.py's.

    curves = invariance(model, images, labels, sweeps)   # {transformation: Curves}

The three transformations, each swept over a range of values (a Sweep: first:last:step):
    translation  vertical, by t pixels (positive: the image content moves down), -8..8 by default
    scale        about the image's centre, by s (above 1: enlarged, its rim cut off; below 1: shrunk),
                 0.6..1.6 by default
    rotation     about the image's centre by a degrees, counter-clockwise as the image is shown,
                 0..360 by default
Each is one affine map of the normalised image x (the network's input), resampled by
F.grid_sample(F.affine_grid(theta, ...)) with bilinear interpolation and align_corners=False (pixel
centres at (2i + 1) / 32 - 1, so a whole-pixel translation moves the pixels exactly, and the identity is
exact); where the map reaches outside the image the pixel is 0 in normalised space, the data's mean
colour (grid_sample's zero padding).

For each step, and each of the representations
    conv1    conv1's output (Zeiler & Fergus's "layer 1"), every channel at every position
    conv5_x  conv5_x's output, every channel at every position
    pooled   the average-pooled conv5_x features that fc reads (their "layer 7", the last before the
             classifier)
the Euclidean distance |f(x) - f(T x)| between the original's and the transformed image's
representation (flattened), also divided by the original's |f(x)|; and p(true class | T x), the softmax
of the logits. All steps of all images go through the network together, batch_size rows a pass
(row r: step r // N, image r % N). A mean over the images comes with its standard error (trust.summary).
"""
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import normalize
from utils import UserError
from visualize.drawing import (TITLE_WIDTH, colour_mapped, format_indices, new_figure, save, save_json, tile, to_display,
                               wrap_title)
from visualize.evidence import float32_lists
from visualize.scoring import default_batch_size, stage_outputs
from visualize.trust import predicted_or_true, summary

TRANSFORMATIONS = ("translation", "scale", "rotation")
REPRESENTATIONS = ("conv1", "conv5_x", "pooled")
MAX_STEPS = 1000  # values a sweep may take: every one is a pass over all the images
RESAMPLING = ("bilinear interpolation, align_corners=False; the uncovered border 0 in normalised space "
              "(the data's mean colour)")


# --------------------------------------------------------------------------- the sweeps

@dataclass(frozen=True)
class Sweep:
    """The values first, first + step, ... up to last (included where it falls on the grid)."""
    first: float
    last: float
    step: float

    def __str__(self):  # as the command line writes it (and the figure record shows it)
        return ":".join(f"{v:g}" for v in (self.first, self.last, self.step))

    @property
    def values(self):
        count = math.floor((self.last - self.first) / self.step + 1e-9) + 1
        return [round(self.first + k * self.step, 10) for k in range(count)]


# (unit, the values it may take (low, high), the default sweep, what a value means)
SWEEP_RULES = {
    "translation": ("px", (-32, 32), Sweep(-8, 8, 1), "vertical shift in pixels, positive down"),
    "scale": ("x", (0.1, 10), Sweep(0.6, 1.6, 0.05), "scale about the centre"),
    "rotation": ("degrees", (-3600, 3600), Sweep(0, 360, 10), "rotation about the centre, counter-clockwise"),
}
assert tuple(SWEEP_RULES) == TRANSFORMATIONS


def parse_sweep(text, transformation):
    """'first:last:step' -> a Sweep of `transformation`, checked: one line (UserError) for text that is no
    such range, a range with no step (step 0 or below, last below first), a value out of its bounds,
    or more than MAX_STEPS values."""
    unit, (low, high), default, what = SWEEP_RULES[transformation]
    flag = f"--{transformation}"
    try:
        first, last, step = (float(part) for part in text.split(":"))
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a range; write first:last:step, e.g. {flag}={default}") from None
    if not all(math.isfinite(v) for v in (first, last, step)):
        raise UserError(f"{flag} {text}: first, last and step must be finite numbers")
    if step <= 0 or last < first:
        raise UserError(f"{flag} {text} has no step: it needs a step above 0 and last at least first, "
                        f"e.g. {flag}={default}")
    if first < low or last > high:
        raise UserError(f"{flag} {text}: the {what} must lie in {low:g}..{high:g} {unit}")
    sweep = Sweep(first, last, step)
    count = math.floor((last - first) / step + 1e-9) + 1
    if count > MAX_STEPS:
        raise UserError(f"{flag} {text} takes {count} values; at most {MAX_STEPS} (choose a larger step)")
    return sweep


def sweep_type(transformation):
    """parse_sweep for one transformation, as an argparse type."""
    return lambda text: parse_sweep(text, transformation)


# --------------------------------------------------------------------------- the transformations

def affine_matrices(transformation, values, size=32):
    """theta (K, 2, 3) of F.affine_grid, float64, one a value: for each output position (x, y) in
    normalised coordinates (-1..1, y down), the input position it reads, theta @ (x, y, 1)."""
    rows = []
    for v in values:
        if transformation == "translation":  # the content moves down by v pixels: row r reads row r - v
            rows.append([[1, 0, 0], [0, 1, -2 * v / size]])
        elif transformation == "scale":  # enlarged by v about the centre: (x, y) reads (x, y) / v
            rows.append([[1 / v, 0, 0], [0, 1 / v, 0]])
        elif transformation == "rotation":  # turned by v degrees counter-clockwise on the screen (y down)
            a = math.radians(v)
            rows.append([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0]])
        else:
            raise ValueError(f"unknown transformation {transformation!r}; choose one of {', '.join(TRANSFORMATIONS)}")
    return torch.tensor(rows, dtype=torch.float64).view(len(values), 2, 3)


def transform(x, theta):
    """Each normalised image of x (N, 3, H, W) under its own affine map theta (N, 2, 3): bilinear, with
    align_corners=False, the uncovered border 0 (the data's mean colour)."""
    theta = theta.to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# --------------------------------------------------------------------------- the measurements

def representations(model, x):
    """({representation: (N, features) flattened}, logits (N, classes)) of the normalised batch x."""
    reps = {}
    for name, out in stage_outputs(model, x, "conv5_x"):
        if name in REPRESENTATIONS:
            reps[name] = out.flatten(1)
    reps["pooled"] = torch.flatten(model.avgpool(out), 1)
    return reps, model.fc(reps["pooled"])


@dataclass
class Curves:
    """One transformation's sweep over N images, on the CPU in float64; (K, N): a row a value."""
    values: list        # the K values swept
    distance: dict      # {representation: |f(x) - f(T x)|}
    relative: dict      # {representation: that / |f(x)|, NaN where |f(x)| is 0}
    probability: torch.Tensor  # p(true class | T x)


@torch.no_grad()
def invariance(model, images, labels, sweeps, batch_size=None):
    """{transformation: Curves} of the uint8 images (N, 3, 32, 32) with true classes `labels` (N,), for
    the sweeps {transformation: Sweep} (in TRANSFORMATIONS' order, those given), every step of every
    image in one batched loop. Also returns the originals' ({representation: |f(x)|} (N,), p(true | x))."""
    if model.training:
        raise ValueError("invariance needs the model in eval mode (BatchNorm's running statistics)")
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    batch_size = batch_size or default_batch_size(device)
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    x = normalize(images.to(device)).to(dtype)
    n = len(x)
    originals, logits = representations(model, x)
    norms = {name: rep.double().norm(dim=1) for name, rep in originals.items()}
    p_original = logits.double().softmax(1).gather(1, labels[:, None])[:, 0]

    kinds = [kind for kind in TRANSFORMATIONS if kind in sweeps]
    values = {kind: sweeps[kind].values for kind in kinds}
    thetas = torch.cat([affine_matrices(kind, values[kind], x.shape[-1]) for kind in kinds])
    distances = {name: [] for name in REPRESENTATIONS}
    probabilities = []
    total = len(thetas) * n
    for start in tqdm(range(0, total, batch_size), desc="invariance", unit="batch", leave=False, dynamic_ncols=True):
        row = torch.arange(start, min(start + batch_size, total), device=device)
        step, image = row // n, row % n
        reps, out = representations(model, transform(x[image], thetas[step.cpu()]))
        for name, rep in reps.items():
            distances[name].append((rep - originals[name][image]).double().norm(dim=1))
        probabilities.append(out.double().softmax(1).gather(1, labels[image, None])[:, 0])
    distances = {name: torch.cat(parts).view(-1, n).cpu() for name, parts in distances.items()}
    probabilities = torch.cat(probabilities).view(-1, n).cpu()

    curves, first = {}, 0
    for kind in kinds:
        rows = slice(first, first + len(values[kind]))
        first += len(values[kind])
        curves[kind] = Curves(
            values=values[kind], distance={name: d[rows] for name, d in distances.items()},
            relative={name: d[rows] / norms[name].cpu().where(norms[name].cpu() > 0, math.nan)
                      for name, d in distances.items()},
            probability=probabilities[rows])
    return curves, ({name: norm.cpu() for name, norm in norms.items()}, p_original.cpu())


# --------------------------------------------------------------------------- the figure and the JSON

COLUMN_TITLES = {"conv1": "conv1 (their layer 1)", "conv5_x": "conv5_x",
                 "pooled": "pooled features fc reads\n(their layer 7)"}
EXAMPLES = 5  # transformed copies of the first image shown at the left of each row


def mean_and_error(per_image):
    """(mean, standard error) over the images of each row of a (K, N) tensor, each (K,) as numpy."""
    pairs = [summary(row) for row in per_image]
    return np.array([m for m, _ in pairs]), np.array([e for _, e in pairs])


def draw_curves(ax, values, per_image, colours):
    """Each image's curve (thin, its colour) and their mean (black) with a band of ± its standard error."""
    for column, colour in zip(per_image.T.numpy(), colours):
        ax.plot(values, column, color=colour, lw=0.7, alpha=0.6)
    mean, error = mean_and_error(per_image)
    ax.fill_between(values, mean - error, mean + error, color="black", alpha=0.2, lw=0)
    ax.plot(values, mean, color="black", lw=1.8, label="mean ± standard error")
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=7)


def plot_invariance(run, indices, sweeps, figures_dir, record, stem):
    """plot_invariance.py: a row a transformation, the examples and the curves of the test images
    `indices`; figures_dir/<stem>.png and .json (record: the figure's, cli's figure_record). Returns both."""
    images = run.images[indices]
    labels = predicted_or_true(run, indices, "true")
    curves, (norms, p_original) = invariance(run.model, images, labels, sweeps)
    kinds = list(curves)
    colours = colour_mapped(np.arange(len(indices)) % 20, "tab20", -0.5, 19.5)

    fig = new_figure(13, 2.5 * len(kinds) + 1.6)
    axes = fig.subplots(len(kinds), 2 + len(REPRESENTATIONS), squeeze=False,
                        gridspec_kw=dict(width_ratios=(1.6, 1, 1, 1, 1)))
    x = normalize(images[:1].to(run.device))
    for row, kind in zip(axes, kinds):
        c, (unit, _, _, what) = curves[kind], SWEEP_RULES[kind]
        shown = [c.values[round(i)] for i in np.linspace(0, len(c.values) - 1, min(EXAMPLES, len(c.values)))]
        copies = transform(x.expand(len(shown), -1, -1, -1), affine_matrices(kind, shown, x.shape[-1]))
        row[0].imshow(tile(to_display(copies), pad=2, fill=1.0, cols=len(shown)), interpolation="nearest")
        row[0].set_xticks([i * 34 + 15.5 for i in range(len(shown))], [f"{v:g}" for v in shown], fontsize=7)
        row[0].set_yticks([])
        row[0].set_ylabel(kind, fontsize=9)
        row[0].set_xlabel(f"{kind} ({unit}) of test image {indices[0]}", fontsize=7)
        for ax, name in zip(row[1:], REPRESENTATIONS):
            draw_curves(ax, c.values, c.relative[name], colours)
            ax.set_xlabel(f"{kind} ({unit})", fontsize=7)
            ax.set_ylabel("|f(x) - f(Tx)| / |f(x)|", fontsize=7)
        draw_curves(row[-1], c.values, c.probability, colours)
        row[-1].set_ylim(-0.03, 1.03)
        row[-1].set_xlabel(f"{kind} ({unit})", fontsize=7)
        row[-1].set_ylabel("p(true class)", fontsize=7)
    for ax, title in zip(axes[0], ["transformed copies", *COLUMN_TITLES.values(), "probability of the true class"]):
        ax.set_title(title, fontsize=8)
    for i, index in enumerate(indices):  # an entry an image, with no line of its own drawn
        axes[0][-1].plot([], [], color=colours[i], lw=2, label=run.image_label(index))
    handles, names = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(9, len(names)), fontsize=6.5, frameon=False)
    title = "\n".join(wrap_title(part, 2 * TITLE_WIDTH) for part in (
        f"invariance (Zeiler & Fergus's Figure 5): test images {format_indices(indices)} moved, scaled and turned; "
        f"the distance of each representation from the original's, divided by the original's norm, and the "
        f"probability of the true class; a thin line an image, black their mean ± its standard error",
        f"resampling: {RESAMPLING}", run.caption.replace("\n", " ")))
    fig.suptitle(title, fontsize=8.5)
    legend_rows = math.ceil(len(indices) / 9)
    fig.tight_layout(rect=(0, (0.18 * legend_rows + 0.1) / fig.get_figheight(), 1, 1))  # room for the suptitle too
    figures_dir = Path(figures_dir)
    png = save(fig, figures_dir / f"{stem}.png")

    data = {"figure": record, "images": list(indices), "true": labels.tolist(),
            "true_names": [run.classes[c] for c in labels], "resampling": RESAMPLING,
            "original_probability": float32_lists(p_original), "original_norm": {
                name: float32_lists(norm) for name, norm in norms.items()},
            "transformations": {}}
    for kind, c in curves.items():
        unit, _, _, what = SWEEP_RULES[kind]
        entry = {"what": what, "unit": unit, "values": c.values, "probability": float32_lists(c.probability),
                 "distance": {name: float32_lists(d) for name, d in c.distance.items()},
                 "relative_distance": {name: float32_lists(d) for name, d in c.relative.items()}}
        for key, per_image in [("probability", c.probability),
                               *((f"distance {name}", c.distance[name]) for name in REPRESENTATIONS),
                               *((f"relative_distance {name}", c.relative[name]) for name in REPRESENTATIONS)]:
            mean, error = mean_and_error(per_image)
            entry.setdefault("mean", {})[key] = float32_lists(torch.from_numpy(mean))
            entry.setdefault("standard_error", {})[key] = float32_lists(torch.from_numpy(error))
        data["transformations"][kind] = entry
    return [png, save_json(figures_dir / f"{stem}.json", data)]
