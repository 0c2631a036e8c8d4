"""Each unit's numbers: how selective a channel is for one class (Morcos et al. 2018) and what the
network's test accuracy loses without it (ablation). No drawing here; the atlas shows them.
"""
import torch
from tqdm import tqdm

from data import normalize
from model import STAGES
from visualize.scoring import classify, stage_outputs

# The ablations' default number of test images, the first N of the split. At width 64, ablating the
# atlas's 64 default channels costs ~12x a forward pass over the same images (a 2-core AMD EPYC,
# AVX512, torch 2.14.1, one thread, 2026-12-04; ~19x a scoring pass on the AMX Xeon): with 1000, about
# 1.2 forward passes of the 10,000 test images; all of them would cost ~12, more than the rest of
# plot_all.py together.
ABLATION_IMAGES = 1000
QUICK_ABLATION_IMAGES = 100  # a --quick run's: a first look, its accuracy drops a rough estimate


def class_selectivity(mean, labels):
    """(selectivity, leading class) of every channel: two (C,) tensors, from its activations on N images.

    mean: (N, C), each image's activation of each channel averaged over its feature map
    (scoring.UnitScores.mean); labels: the N images' classes. With mu_c the mean of `mean` over the
    images of class c (the classes with at least one image), mu_max = max_c mu_c, whose class is the
    leading one, and mu_rest the mean of the other classes' mu_c, Morcos et al. 2018's class
    selectivity index is

        selectivity = (mu_max - mu_rest) / (mu_max + mu_rest)

    Every stage ends in a ReLU, so mu_c >= 0 and it lies in [0, 1]: 0 for a unit that responds to
    every class alike, 1 for one that responds to one class only. A silent unit (every mu_c = 0)
    gets 0 and leading class -1. Ties for mu_max: the lower class index leads.
    """
    labels = torch.as_tensor(labels)
    present = torch.unique(labels)  # sorted
    if len(present) < 2:
        raise ValueError("class selectivity needs images of at least two classes")
    mu = torch.stack([mean[labels == c].double().mean(0) for c in present])  # (classes, C)
    mu_max = mu.amax(0)
    leading = present[(mu == mu_max).int().argmax(0)]  # the first class that reaches mu_max
    mu_rest = (mu.sum(0) - mu_max) / (len(present) - 1)
    silent = mu_max <= 0
    selectivity = torch.where(silent, 0.0, (mu_max - mu_rest) / torch.where(silent, 1.0, mu_max + mu_rest))
    return selectivity, torch.where(silent, -1, leading)


def ablate(model, images, channels, batch_size=100, group=4):
    """The network's predicted classes with each channel of `channels` = {stage: [c, ...]} set to 0
    in its stage's output, one channel at a time, for each of the uint8 test images `images`.

    Returns (unablated, ablated): the (N,) predictions of the network itself, and {stage: (N, K)},
    column k the predictions with channel channels[stage][k] ablated. With A_L(x) the output of stage
    L and H_L the network above it (the later stages, the average pool and fc), the prediction with
    channel c of L ablated is

        argmax_j H_L(A_L(x) * m_c)_j,   m_c = 1 except at channel c, where it is 0 at every position

    Only H_L depends on c, so per batch of images the stages up to the deepest in `channels` run once
    and each A_L(x) serves all of L's channels; `group` channels are ablated in one batch of
    group x batch_size (as fast as one at a time, within 10%). Ablating a channel of conv2_x runs ~70%
    of the network again, of conv5_x only fc: at width 64, 16 channels of each of conv2_x..conv5_x
    cost ~19 scoring passes (scoring.score_units to conv5_x) over the same images.
    """
    device = next(model.parameters()).device
    layers = sorted(channels, key=STAGES.index)
    unablated, ablated = [], {layer: [] for layer in layers}
    with torch.inference_mode():
        for start in tqdm(range(0, len(images), batch_size), desc=f"ablating channels of {', '.join(layers)}",
                          unit="batch", leave=False, dynamic_ncols=True):
            x = normalize(images[start:start + batch_size].to(device))
            outputs = {name: out for name, out in stage_outputs(model, x, layers[-1]) if name in ablated}
            unablated.append(classify(model, outputs[layers[-1]], after=layers[-1]).argmax(1).cpu())
            for layer in layers:
                out, n = outputs[layer], len(x)
                columns = []
                for first in range(0, len(channels[layer]), group):
                    chosen = channels[layer][first:first + group]
                    copies = out.repeat(len(chosen), 1, 1, 1)  # copy k: the images with channel chosen[k] at 0
                    for k, channel in enumerate(chosen):
                        copies[k * n:(k + 1) * n, channel] = 0
                    columns.append(classify(model, copies, after=layer).argmax(1).view(len(chosen), n).T.cpu())
                ablated[layer].append(torch.cat(columns, 1))
    return torch.cat(unablated), {layer: torch.cat(parts) for layer, parts in ablated.items()}


def ablation_effect(predictions, unablated, labels, classes):
    """What ablating one channel does, as the atlas's JSON records it: predictions (N,) with the
    channel ablated, unablated (N,) without, labels (N,) the truth, classes the class names.

    accuracy and unablated_accuracy are the fractions of the N images classified right; of the
    classes with at least one image, `class` is the one whose accuracy drops most,
    class_drop = class_unablated_accuracy - class_accuracy (ties: the lower class index; the drop
    is negative where ablating helps every class).
    """
    labels = torch.as_tensor(labels)
    right, right_before = predictions == labels, unablated == labels
    per_class = [(right_before[labels == c].double().mean().item(), right[labels == c].double().mean().item(), c)
                 for c in torch.unique(labels).tolist()]
    before, after, worst = max(per_class, key=lambda t: (t[0] - t[1], -t[2]))
    return dict(images=len(labels), accuracy=right.double().mean().item(),
                unablated_accuracy=right_before.double().mean().item(), **{"class": classes[worst]},
                class_accuracy=after, class_unablated_accuracy=before, class_drop=before - after)
