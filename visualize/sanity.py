"""Sanity checks of the unit visualizations (plot_sanity_checks.py): Adebayo et al. 2018's cascading
randomisation. Does a picture of a unit depend on what the network learned? Redraw it with the unit's
stage re-initialised, then also the stage below, and so on down to conv1, and measure how much of the
trained network's picture survives.

Every technique's picture is a signed image r (N, 3, 32, 32), one for each start:
    deconvnet, guided, gradient  ResNet.reconstruct(x, layer, channel, path="both", method=...) for
                                 each test image x
    feature visualization        x - x0: the image featurevis.feature_visualization makes for the
                                 channel (SANITY_FV_STEPS steps) minus its start x0 (the data's mean
                                 colour with faint noise, the same at every depth: same seed), in [0, 1]
                                 pixels; one image
    gradient pattern             x - x0: ascent.gradient_ascent (PATTERN_STEPS steps) from each test
                                 image x0 (not from the
                                 trained network's top image, as plot_gradient_pattern.py: so the
                                 start is the same at every depth, and the same images as the
                                 reconstructions'), in [0, 1] pixels
Similarity (Adebayo's measure) of a picture r to the trained network's picture t of the same start:
    rho(r, t) = spearman(S(r), S(t)),  S(r)(p) = sum over the 3 colours c of |r_c(p)|
over the 32x32 pixels p, averaged over the starts where it is defined. It is undefined (NaN, null in
the JSON, "n/a" in the figure) where the trained picture is constant, as where the unit is silent on an
image and its picture is 0: a silent picture has no ranking to keep, so the start is left out of the
mean, not counted as 0. Where only the redrawn picture is constant (the re-initialised unit is silent
where the trained one fired) it kept none of the ranking: rho 0 (similarities).
"""
import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from cifar10 import dataset_root
from data import denormalize, normalize
from model import METHODS, STAGES, ResNet
from visualize import cli
from visualize.ascent import gradient_ascent
from visualize.context import memo
from visualize.drawing import format_indices, save_json, save_table, signed_to_display, to_display, wrap_title
from visualize.featurevis import FV_LR, colour_statistics, feature_visualization
from visualize.scoring import channel_scores

TECHNIQUES = (*METHODS, "feature visualization", "gradient pattern")
# The optimisations' steps at every depth: fewer than their own scripts take (plot_gradient_pattern.py
# 100, plot_feature_visualization.py FV_STEPS = 160), as the similarities stay within their spread over
# seeds (docs/figures.md: measured), and the gradient pattern's steps were most of plot_all.py's time
PATTERN_STEPS = 25   # gradient_ascent's lr 0.05 and penalty 0.01
SANITY_FV_STEPS = 40
IMAGES = "4531-4546"  # plot_sanity_checks.py's test images (and plot_trust.py's)
QUICK_IMAGES = "4531-4534"  # a --quick run's: a first look, its similarities means over few images


# --------------------------------------------------------------------------- the measure

def average_ranks(values):
    """The ranks 1..n of a tensor's n entries (flattened), ties sharing the mean of the ranks they span:
        rank(v_i) = #{j: v_j < v_i} + (#{j: v_j = v_i} + 1) / 2
    Returned as float64."""
    values = values.flatten()
    order = torch.argsort(values, stable=True)
    ordered = values[order]
    opens_group = torch.ones(len(values), dtype=torch.bool, device=values.device)
    opens_group[1:] = ordered[1:] != ordered[:-1]
    group = torch.cumsum(opens_group, 0) - 1  # each sorted entry's group of equal values
    counts = torch.bincount(group)
    last = torch.cumsum(counts, 0)  # the rank of each group's last entry
    ranks = torch.empty(len(values), dtype=torch.float64, device=values.device)
    ranks[order] = (last - (counts - 1) / 2).double()[group]  # the mean of ranks last-count+1 .. last
    return ranks


def spearman(a, b):
    """Spearman's rank correlation of two tensors with the same number of entries: Pearson's
    correlation of their average_ranks R and S,
        rho = sum_i (R_i - mean R)(S_i - mean S) / sqrt(sum_i (R_i - mean R)^2 * sum_i (S_i - mean S)^2)
    NaN where either tensor is constant (its ranks are all equal, and rho is 0/0)."""
    r, s = average_ranks(a), average_ranks(b)
    r, s = r - r.mean(), s - s.mean()
    denominator = torch.sqrt((r * r).sum() * (s * s).sum())
    return math.nan if denominator == 0 else ((r * s).sum() / denominator).item()


def saliency(r):
    """S(r)(p) = sum_c |r_c(p)|: a signed picture (N, 3, H, W) reduced over colour to (N, H, W)."""
    return r.abs().sum(1)


def similarities(pictures, trained):
    """rho(S(pictures[i]), S(trained[i])) for each start i, as float64 (N,): NaN where the trained picture
    is constant (a silent unit: it has no ranking to keep, and the start is left out of the means), 0
    where only the redrawn one is (it kept none of the ranking: Grad-CAM's map, say, once its ReLU
    leaves nothing of a random network)."""
    redrawn, kept = saliency(pictures), saliency(trained)
    constant = lambda s: (s.flatten(1) == s.flatten(1)[:, :1]).all(1)
    rho = torch.tensor([spearman(a, b) for a, b in zip(redrawn, kept)], dtype=torch.float64)
    return torch.where(constant(redrawn) & ~constant(kept), torch.zeros_like(rho), rho)


def defined_mean(values):
    """The mean of the entries that are not NaN; NaN if none is."""
    defined = values[~values.isnan()]
    return defined.mean().item() if len(defined) else math.nan


# --------------------------------------------------------------------------- the cascade

def cascade_depths(layer):
    """The stages in the order they are re-initialised: `layer`, then each below it, down to conv1."""
    return list(reversed(STAGES[:STAGES.index(layer) + 1]))


def fresh_network(model, seed):
    """The ResNet of `model`'s width and classes freshly built after torch.manual_seed(seed), in eval
    mode on its device: model.init_weights's convs, BatchNorm weight 1, bias 0, running mean 0 and
    variance 1. The caller's random state is left as it was. One fresh network serves every depth of
    a seed, so a stage gets the same random weights at every depth of the cascade."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = ResNet(model.width, model.fc.out_features)
    return fresh.to(next(model.parameters()).device).eval()


def reinitialised(model, stages, seed, fresh=None):
    """A deep copy of `model` (left untouched) whose `stages` are those of fresh_network(model, seed)
    (or of `fresh`, that network built already). The other stages and the fc keep the model's weights."""
    fresh = fresh_network(model, seed) if fresh is None else fresh
    randomised = copy.deepcopy(model)
    for name in stages:
        randomised.stage(name).load_state_dict(fresh.stage(name).state_dict())
    return randomised


class CascadeStage(torch.nn.Module):
    """One stage of every depth of the cascade at once, on a batch of `depths` equal parts, part k the
    inputs of depth k: the first `trained_depths` parts go through the trained stage, the rest, whose
    depths have re-initialised it, through the fresh one. So each stage runs twice (at most), not once
    a depth, on as many images in all; and each part gets what its own depth's network computes."""

    def __init__(self, trained, fresh, depths, trained_depths):
        super().__init__()
        self.trained, self.fresh = trained, fresh
        self.depths, self.trained_depths = depths, trained_depths
        self.copies = (trained, fresh)  # the stages this runs: ascent.straight_through_relu hooks each

    def forward(self, x):
        split = len(x) // self.depths * self.trained_depths
        parts = [stage(part) for stage, part in ((self.trained, x[:split]), (self.fresh, x[split:])) if len(part)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class Cascade(torch.nn.Module):
    """The cascade's networks up to `layer` as one: `model` (depth 0, "trained"), then model with
    cascade_depths(layer)[:k] taken from `fresh` (depth k). stage(name) runs a batch of len(depths)
    equal parts, part k through depth k's network (CascadeStage), so scoring.stage_output and every
    optimisation over it (gradient_ascent, feature_visualization with copies=len(depths)) draw all
    depths in one pass a step, each part exactly as its own network would alone (up to summation
    order: tested against the networks one at a time)."""

    def __init__(self, model, fresh, layer):
        super().__init__()
        self.depths = ["trained", *cascade_depths(layer)]
        self.width = model.width
        randomised_from = {name: self.depths.index(name) for name in self.depths[1:]}  # the first depth without it
        self.stages = torch.nn.ModuleDict({
            name: CascadeStage(model.stage(name), fresh.stage(name), len(self.depths), randomised_from[name])
            for name in STAGES[:STAGES.index(layer) + 1]})

    def stage(self, name):
        return self.stages[name]


def depth_parts(batch, depths):
    """A batch of the cascade (depth-major) as its `depths` parts, one a depth, on the CPU as float."""
    return list(batch.float().cpu().chunk(depths))


def draw_pictures(model, fresh, x, layer, channel, colour, seed, fv_steps, pattern_steps, fv_start):
    """{technique: [r at each depth]} of the cascade (see the module's docstring), on the CPU. x:
    normalized test images; fv_start: the feature visualization's start pixels (1, 3, 32, 32). The
    reconstructions are drawn a depth at a time (ResNet.reconstruct walks its own network; they cost
    little); the two optimisations, nearly all of the cost, by the Cascade, every depth in one batch."""
    cascade = Cascade(model, fresh, layer)
    depths = len(cascade.depths)
    networks = [model] + [reinitialised(model, cascade.depths[1:k + 1], seed, fresh) for k in range(1, depths)]
    pictures = {method: [network.reconstruct(x, layer, channel, path="both", method=method).float().cpu()
                         for network in networks] for method in METHODS}
    fv = feature_visualization(cascade, layer, [channel], colour, steps=fv_steps, lr=FV_LR, seed=seed,
                               copies=depths)[0]
    pictures["feature visualization"] = depth_parts(fv - fv_start, depths)
    # gradient_ascent on a batch is each image's own ascent: in eval mode an image's score depends on
    # it alone, and Adam's update is elementwise; so is it on the cascade's batch, each depth's copy
    # of the images through its own network
    start = x.repeat(depths, 1, 1, 1)
    pattern = gradient_ascent(cascade, start, layer, channel, steps=pattern_steps)
    pictures["gradient pattern"] = depth_parts(denormalize(pattern) - denormalize(start), depths)
    return pictures


@dataclass
class SanityChecks:
    """The cascade's pictures and their similarity to the trained network's."""
    depths: list      # "trained", then each stage in the order re-initialised (cascade_depths)
    pictures: dict    # {technique: [r at each depth]}, r (N, 3, 32, 32) (feature visualization: N = 1)
    per_start: dict   # {technique: (depths, N) float64 rho of each start, NaN where the trained picture is constant}
    similarity: dict  # {technique: [defined_mean of per_start at each depth]}; the trained one is 1


def similarity_of(depths, pictures):
    """SanityChecks of the pictures {technique: [r at each depth]} drawn at `depths`."""
    per_start = {name: torch.stack([similarities(r, drawn[0]) for r in drawn]) for name, drawn in pictures.items()}
    similarity = {name: [defined_mean(row) for row in rhos] for name, rhos in per_start.items()}
    return SanityChecks(depths=depths, pictures=pictures, per_start=per_start, similarity=similarity)


def sanity_checks(model, x, layer, channel, colour, seed=0, fv_steps=SANITY_FV_STEPS, pattern_steps=PATTERN_STEPS):
    """Adebayo's cascading randomisation of every technique for `channel` of `layer` and the
    normalized test images x. colour: the training pixels' (mean, covariance), for the feature
    visualization. seed: the re-initialisation's (fresh_network) and the feature visualization's.
    The model is not changed (each depth is a copy, or the model's and the fresh network's stages)."""
    model.check_channel(layer, channel)
    fv_start = feature_visualization(model, layer, [channel], colour, steps=0, seed=seed)[0]
    depths = ["trained", *cascade_depths(layer)]
    pictures = draw_pictures(model, fresh_network(model, seed), x, layer, channel, colour, seed, fv_steps,
                             pattern_steps, fv_start)
    return similarity_of(depths, pictures)


# --------------------------------------------------------------------------- the figure and the JSON

def similarity_caption(rhos):
    """'rho 0.42', with '(12 of 16)' where only some starts define it, or 'rho n/a' where none does."""
    mean, defined = defined_mean(rhos), int((~rhos.isnan()).sum())
    if math.isnan(mean):
        return "rho n/a (constant)"
    return f"rho {mean:.2f}" + ("" if defined == len(rhos) else f" ({defined} of {len(rhos)})")


def sanity_record(layer, channel, indices, seed, checks):
    """The JSON's content: the similarity of each technique at each depth (NaN, written as null: constant)."""
    return {"layer": layer, "channel": channel, "images": list(indices), "depths": checks.depths, "seed": seed,
            "similarity": checks.similarity}


def unit_sanity_checks(run, layer, channel, indices, seed=0, fv_steps=SANITY_FV_STEPS, pattern_steps=PATTERN_STEPS):
    """sanity_checks of the run's test images `indices`, computed once per process for each run and
    choice (context.memo): plot_all.py's trust table (visualize.trust) reads the same numbers."""
    def compute():
        x = normalize(run.images[indices].to(run.device))
        colour = colour_statistics(dataset_root(run.data_dir, run.trained_on_synthetic))
        return sanity_checks(run.model, x, layer, channel, colour, seed, fv_steps, pattern_steps)
    return memo(("sanity checks", run.key, layer, channel, tuple(indices), seed, fv_steps, pattern_steps), compute)


SANITY_NAMED = ("--layer", "--channel")  # the flags its file names write their way


def plot_sanity_checks(run, layer, channel, indices, figures_dir, seed=0, fv_steps=SANITY_FV_STEPS,
                       pattern_steps=PATTERN_STEPS, figure=None):
    """plot_sanity_checks.py: sanity_checks for the test images `indices`, drawn for the one of them
    the channel responds to most (its feature-map sum, the report's criterion), and written as
    figures_dir/sanity_<layer>_channel<c>.png and .json. Prints the table; returns both paths. With
    `figure` (a cli.figure_record) the JSON holds it and the file names carry its other flags."""
    checks = unit_sanity_checks(run, layer, channel, indices, seed, fv_steps, pattern_steps)
    x = normalize(run.images[indices].to(run.device))
    with torch.inference_mode():
        shown = channel_scores(run.model, x, layer, channel).argmax().item()

    print(f"{layer} channel {channel}: Spearman rho of sum_c |r_c| against the trained network's, mean over "
          f"test images {format_indices(indices)}; stages re-initialised from {layer} down to each column's")
    print(f"{'':>22}" + "".join(f"{depth:>9}" for depth in checks.depths))
    for name, values in checks.similarity.items():
        print(f"{name:>22}" + "".join(f"{v:>9.3f}" for v in values))

    inputs = to_display(x[[shown]])[0]
    cells = []
    for name in TECHNIQUES:
        start = 0 if name == "feature visualization" else shown
        first = ((None, f"from the data's\nmean colour, seed {seed}") if name == "feature visualization" else
                 (inputs, f"test image\n{run.image_label(indices[shown])}"))
        cells.append([first] + [(signed_to_display(r[[start]])[0], similarity_caption(rhos))
                                for r, rhos in zip(checks.pictures[name], checks.per_start[name])])
    columns = ["start"] + [checks.depths[0]] + [f"{layer}..{depth}\nre-initialised" if depth != layer else
                                                f"{layer}\nre-initialised" for depth in checks.depths[1:]]
    title = "\n".join(wrap_title(part) for part in (
        f"sanity checks (Adebayo et al. 2018): {layer} channel {channel} as each column's network draws it; "
        f"column k re-initialises the stages from {layer} down (init_weights, seed {seed})",
        f"under each: Spearman rho of sum over colour |r| against the trained network's, mean over test images "
        f"{format_indices(indices)}{' (the quick run: few images)' if cli.is_quick(figure) else ''} (n/a: constant, a "
        f"silent unit); drawn for the top one",
        f"r shown as 0.5 + r / (2 max|r|), grey 0: the reconstructions; the feature visualization ({fv_steps} "
        f"steps) and the gradient pattern ({pattern_steps} steps) minus their start", run.caption))
    figures_dir = Path(figures_dir)
    name = f"sanity_{layer}_channel{channel}" + (cli.name_suffix(figure, SANITY_NAMED) if figure else "")
    png = save_table(figures_dir / f"{name}.png", cells, title, columns, list(TECHNIQUES))
    record = sanity_record(layer, channel, indices, seed, checks)
    return [png, save_json(figures_dir / f"{name}.json", {"figure": figure, **record} if figure else record, indent=1)]
