"""The conv1 filters: one grid per input channel (the report's "Conv1-channel 0", "channel 2", ...),
and every filter as an RGB image.

    python plot_conv1_filters.py

Each grid shows one 3x3 weight slice per filter on one grey scale centred on 0 (its colour bar);
the RGB grid maps every weight w to 0.5 + w / (2 max|w|), max over all filters, so grey is 0.
"""
from pathlib import Path

import utils
from visualize import cli, drawing


def main(argv=None):
    parser = cli.plot_parser(__doc__, script=__file__)
    args = parser.parse_args(argv)
    run = parser.load(args, test_split=False)
    weights = run.model.conv1.conv.weight.detach()  # (filters, input channels R G B, 3, 3)
    figures = Path(args.figures_dir)
    record = parser.figure_record(args, "conv1_filters", run)
    paths = []
    for c, colour in enumerate("RGB"):
        paths.append(drawing.save_mosaic(
            figures / f"conv1_filters_input_channel{c}.png", weights[:, c],
            f"conv1 filters, input channel {c} ({colour}): {len(weights)} filters, filter 0 top left\n{run.caption}",
            symmetric=True))
        paths.append(drawing.save_json(figures / f"conv1_filters_input_channel{c}.json",
                                       {"figure": record, "input_channel": c, "filters": len(weights)}))
    paths.append(drawing.save_rgb_mosaic(
        figures / "conv1_filters_rgb.png", drawing.signed_to_display(weights, per_image=False),
        f"conv1 filters as RGB images (0.5 + w / (2 max|w|), grey = 0)\n{run.caption}"))
    paths.append(drawing.save_json(figures / "conv1_filters_rgb.json",
                                   {"figure": record, "input_channel": None, "filters": len(weights)}))
    return paths

if __name__ == "__main__":
    utils.run_cli(main)
