"""The pattern that excites conv5_x filter 0: gradient ascent on the input, from the test image
that excites the filter most.

    python plot_gradient_pattern.py [--layer conv5_x] [--channel 0] [--steps 100] [--lr 0.05] [--penalty 0.01]

First every test image is scored by the sum of the filter's feature map (the report's criterion)
and the best is printed. From that image x0, Adam maximizes  activation(x) - penalty * ||x - x0||^2
over the normalized input, clipping it after each step to the range of [0, 1] pixels. Saved: the
start image, the pattern, and their difference (shown as 0.5 + d / (2 max|d|), grey = 0).
"""
from pathlib import Path

import torch

import data
import utils
import visualize


def main(argv=None):
    p = visualize.plot_parser(__doc__, layer="conv5_x", channel=0)
    p.add_argument("--image-index", type=int, help="start from this test image (default: the top-activating one)")
    p.add_argument("--steps", type=int, default=100, help="Adam steps, at least 1 (default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.05,
                   help="Adam learning rate, in normalized input units, above 0 (default: %(default)s)")
    p.add_argument("--penalty", type=float, default=0.01,
                   help="lambda of lambda * ||x - x0||^2, 0 or above (default: %(default)s)")
    args = p.parse_args(argv)
    run = visualize.load_for_plots(args)  # checks every flag, --steps, --lr and --penalty included
    model, layer, channel = run.model, args.layer, args.channel
    if run.indices is None:
        scores = visualize.test_split_scores(run, [layer])[layer]  # shared with the atlas under plot_all.py
        (index,), (score,) = visualize.top_k(scores.sum[:, channel], 1)
        print(f"test image {visualize.image_label(run, index.item())} excites {layer} channel {channel} most: "
              f"feature-map sum {score:.4f}")
        run.indices = [index.item()]
    x0 = data.normalize(run.images[run.indices].to(run.device))
    x = visualize.gradient_ascent(model, x0, layer, channel, args.steps, args.lr, args.penalty)
    with torch.inference_mode():
        before, after = (visualize.channel_scores(model, image, layer, channel).item() for image in (x0, x))
    print(f"{layer} channel {channel} activation: {before:.4f} before, {after:.4f} after {args.steps} steps")
    if after <= before:
        print("the activation did not rise: the filter is silent on this image (no gradient) or --lr is too "
              "large; try another --image-index or a smaller --lr")
    panels = [(visualize.to_display(x0)[0], f"start: test image\n{visualize.image_label(run, run.indices[0])}"),
              (visualize.to_display(x)[0], "pattern"), (visualize.signed_to_display(x - x0)[0], "pattern - start")]
    return [visualize.save_panels(
        Path(args.figures_dir) / f"gradient_pattern_{layer}_channel{channel}.png", panels,
        f"gradient ascent on {layer} channel {channel}: activation {before:.3g} -> {after:.3g} "
        f"({args.steps} Adam steps, lr {args.lr}, penalty {args.penalty})\n{run.caption}", cols=3)]


if __name__ == "__main__":
    utils.run_cli(main)
