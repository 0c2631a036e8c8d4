"""Scoring units: run the stages of a network and measure how strongly each channel responds to each
image. What the figures rank, select and annotate by; no drawing here.
"""
from dataclasses import dataclass

import torch
from tqdm import tqdm

from data import normalize
from model import STAGES


def stage_outputs(model, x, last, after=None):
    """Yield (name, output) of every stage from conv1 to `last` for the normalized batch x; with
    `after` a stage, x is that stage's output and the stages above it, up to `last`, run."""
    first = 0 if after is None else STAGES.index(after) + 1
    for name in STAGES[first:STAGES.index(last) + 1]:
        # oneDNN's CPU convolutions and max-pool are ~2x faster channels-last on the 32x32 maps of
        # the first two stages, and faster in NCHW on the small maps after; the values are the same
        big = x.shape[-1] >= 32
        x = model.stage(name)(x.contiguous(memory_format=torch.channels_last if big else torch.contiguous_format))
        yield name, x


def stage_output(model, x, layer, after=None):
    """The output of stage `layer` for the normalized batch x, running only the stages up to it
    (with `after`: x is the output of that stage, below `layer`, and only the stages between run)."""
    for _, x in stage_outputs(model, x, layer, after):
        pass
    return x


def classify(model, x, after=None):
    """The network's logits (N, classes) for the normalized batch x, model(x); with `after` a stage,
    x is that stage's output and only the stages above it and the classifier run."""
    return model.head(stage_output(model, x, STAGES[-1], after))


def channel_scores(model, x, layer, channel):
    """Per image, the sum of `channel`'s feature map at `layer`: the report's activation of a filter.

    channel may also be a list of channels: then (N, len(channel)) scores, one column a channel.
    """
    return stage_output(model, x, layer)[:, channel].sum((-2, -1))


@dataclass
class UnitScores:
    """How every channel of one stage responds to each of N images: (N, C) tensors on the CPU."""
    max: torch.Tensor     # the largest activation in the channel's map (Zeiler & Fergus's criterion)
    argmax: torch.Tensor  # its position as a flat index into the (H, W) map, the first one on ties
    sum: torch.Tensor     # the sum of the map (the report's criterion, as channel_scores)
    size: tuple           # (H, W) of the stage's maps

    @property
    def mean(self):
        """The mean activation over the channel's map, sum / (H * W): (N, C)."""
        return self.sum / (self.size[0] * self.size[1])


def default_batch_size(device):
    """Rows a pass where the caller does not say: 100 on a CPU (fastest on 2 cores: the activations stay
    in cache; 500 rows take 1.3x as long an image, width 64, AMD EPYC), 1000 on a GPU."""
    return 100 if device.type == "cpu" else 1000


def score_units(model, images, layers, batch_size=None):
    """Score every channel of every stage in `layers` on every image, in one batched pass: {layer:
    UnitScores}.

    images: uint8 (N, 3, 32, 32) as load_cifar10 returns them, on any device; they are normalized
    here, batch by batch, on the model's device, and the stages run once, up to the deepest in
    `layers`, under inference mode, default_batch_size rows a pass unless batch_size says.
    """
    device = next(model.parameters()).device
    batch_size = batch_size or default_batch_size(device)
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
    return {layer: UnitScores(*(torch.cat(column) for column in zip(*parts[layer])), size=sizes[layer])
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

