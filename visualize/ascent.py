"""The report's gradient-ascent pattern: the input that excites one channel most, found by Adam on
the normalized pixels from a test image, with a pull back towards that image. Also the
straight-through ReLU, which lets an optimisation move a channel that is silent at its start.
"""
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from data import normalize
from visualize import cli
from visualize.context import test_split_scores
from visualize.drawing import save_json, save_panels, signed_to_display, to_display
from visualize.scoring import channel_scores, top_k


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


@contextmanager
def straight_through_relu(model, layer):
    """Inside the block, the last ReLU of `layer` passes its gradient where its input is negative too.

    Its output, and so every activation reported, stays max(0, a); only the backward pass changes,
    to that of the identity, so a channel silent at the start of an ascent still gets a gradient
    that raises it (with the true ReLU it would stay at 0 for good).
    """
    # a module that runs several copies of the stage (sanity.CascadeStage) names them: each one's
    copies = getattr(model.stage(layer), "copies", [model.stage(layer)])
    relus = [[m for m in stage.modules() if isinstance(m, torch.nn.ReLU)][-1] for stage in copies]
    handles = [relu.register_forward_hook(lambda module, inputs, output: inputs[0] + (output - inputs[0]).detach())
               for relu in relus]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


GRADIENT_PATTERN_NAMED = ("--layer", "--channel")  # the flags its file name writes its way


def plot_gradient_pattern(run, layer, channel, figures_dir, steps=100, lr=0.05, penalty=0.01, index=None,
                          figure=None):
    """plot_gradient_pattern.py: gradient_ascent from test image `index` (None: the one whose feature-map
    sum of the channel is largest, the report's criterion, printed), and the figure of the start, the
    pattern and their difference. With `figure` (a cli.figure_record) the JSON beside it holds it, the
    start and the activations, and the file names carry its other flags. Returns the paths."""
    if index is None:
        scores = test_split_scores(run, [layer])[layer]  # shared with the atlas under plot_all.py
        (index,), (score,) = top_k(scores.sum[:, channel], 1)
        index = index.item()
        print(f"test image {run.image_label(index)} excites {layer} channel {channel} most: "
              f"feature-map sum {score:.4f}")
    x0 = normalize(run.images[[index]].to(run.device))
    x = gradient_ascent(run.model, x0, layer, channel, steps, lr, penalty)
    with torch.inference_mode():
        before, after = (channel_scores(run.model, image, layer, channel).item() for image in (x0, x))
    print(f"{layer} channel {channel} activation: {before:.4f} before, {after:.4f} after {steps} steps")
    if after <= before:
        print("the activation did not rise: the filter is silent on this image (no gradient) or --lr is too "
              "large; try another --image-index or a smaller --lr")
    panels = [(to_display(x0)[0], f"start: test image\n{run.image_label(index)}"),
              (to_display(x)[0], "pattern"), (signed_to_display(x - x0)[0], "pattern - start")]
    name = f"gradient_pattern_{layer}_channel{channel}" + (cli.name_suffix(figure, GRADIENT_PATTERN_NAMED) if figure else "")
    png = save_panels(Path(figures_dir) / f"{name}.png", panels,
                      f"gradient ascent on {layer} channel {channel}: activation {before:.3g} -> {after:.3g} "
                      f"({steps} Adam steps, lr {lr}, penalty {penalty})\n{run.caption}", cols=3)
    if figure is None:
        return [png]
    return [png, save_json(Path(figures_dir) / f"{name}.json", {
        "figure": figure, "layer": layer, "channel": channel, "image": index, "steps": steps, "lr": lr,
        "penalty": penalty, "activation": {"start": before, "pattern": after}})]
