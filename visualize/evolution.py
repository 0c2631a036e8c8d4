"""Zeiler & Fergus's Figure 4 for a ResNet: what a few units of a stage respond to at each snapshot of
training (snapshots.py), as the unit atlas draws a unit's strongest activation.

For each snapshot and each channel asked for, the tile is the atlas's top-1 (atlas.top_entries with
k = 1): the test image with the channel's largest single activation over the whole test split, at that
snapshot's weights, its projection back to the pixels from that one activation (ResNet.reconstruct,
top1=True, the deconvnet unless told) beside the image patch, both cropped to the receptive field of
the strongest unit as the atlas crops it (atlas.unit_block: light blue outside the image, white where
the unit is silent on every test image); the projection is scaled to its own max|r| (0.5 + r / (2
max|r|), grey = 0). One pass over the test split per snapshot (context.test_split_scores, shared with
plot_learning_dynamics.py in plot_all.py) scores every channel of every stage.
"""
from pathlib import Path

from visualize import atlas
from visualize.context import test_split_scores
from visualize.drawing import METHOD_TITLES, bare, format_indices, method_suffix, new_figure, save, save_json, wrap_title

EVOLUTION_LAYERS = atlas.ATLAS_LAYERS
EVOLUTION_CHANNELS = 8  # the default: channels 0-7 (atlas.default_channels), or every channel of a stage with fewer
DEFAULT_CHANNELS_HELP = atlas.channels_help(EVOLUTION_CHANNELS)


def snapshot_units(run, channels, count=None):
    """{layer: [unit]} of one snapshot's PlotRun for channels = {layer: [c, ...]}: each unit
    {"channel", "top": [its atlas top-1 entry], "class": that image's class name}, over the test split
    (its first `count` images, given a count)."""
    scores = test_split_scores(run, list(channels), count)
    size = run.images.shape[-1]
    units = {}
    for layer, layer_channels in channels.items():
        units[layer] = []
        for channel in layer_channels:
            top = atlas.top_entries(run.model, layer, scores[layer], channel, 1, size)
            units[layer].append(dict(channel=channel, top=top, **{"class": run.classes[run.labels[top[0]["image"]]]}))
    return units


def feature_evolution(snapshot_runs, channels, count=None):
    """[(epoch, PlotRun, {layer: [unit]})] of every snapshot, by epoch (snapshot_units of each)."""
    return [(epoch, run, snapshot_units(run, channels, count)) for epoch, run in snapshot_runs]


def tile_label(unit):
    entry = unit["top"][0]
    if entry["activation"] <= 0:
        return "silent"
    return f"{entry['activation']:.3g}, {unit['class']}"


def plot_feature_evolution(evolution, layer, figures_dir, method="deconvnet", record=None, suffix="", count=None):
    """figures_dir/evolution_<layer><method suffix><suffix>.png and .json: one row per channel, one column
    per snapshot, each tile atlas.unit_block of the unit's top-1 at that snapshot, headed by its activation
    and the image's class; returns both paths. record: added to the JSON (the figure's metadata); count:
    the test images searched were the first `count` (the quick run's), not the whole split."""
    last_run = evolution[-1][1]
    searched = len(last_run.images) if count is None else min(count, len(last_run.images))
    over = ("the test split" if searched == len(last_run.images) else
            f"the first {searched} test images (the quick run: a first look)")
    rows, cols = len(evolution[0][2][layer]), len(evolution)
    size = last_run.images.shape[-1]
    top, _, bottom, _ = last_run.model.receptive_field(layer, 0, 0, size, clip=False)
    extent = min(bottom - top + 1, size)
    title = "\n".join(wrap_title(part) for part in (
        f"{layer}: how each unit's strongest activation over {over} changes through training "
        f"(Zeiler & Fergus's Figure 4)",
        f"per channel (rows) and snapshot (columns): the top-1 {METHOD_TITLES[method]} (left, 0.5 + r / (2 max|r|), "
        f"grey = 0) beside the image patch (right), both cropped to the strongest unit's receptive field "
        f"({extent}x{extent}; light blue: outside the image); above each: the activation and the image's class",
        last_run.caption))
    head = 0.3 + 0.15 * (title.count("\n") + 1)
    fig = new_figure(max(8.0, 1.45 * cols + 0.6), 1.0 * rows + head + 0.45)
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw=dict(wspace=0.06, hspace=0.32))
    for col, (epoch, run, units) in enumerate(evolution):
        for row, unit in enumerate(units[layer]):
            ax = axes[row, col]
            ax.imshow(atlas.unit_block(run, layer, unit, method), interpolation="nearest")
            bare(ax)
            ax.set_title(tile_label(unit), fontsize=6, pad=2)
            if row == 0:
                acc = run.checkpoint.get("test_acc")
                ax.annotate(f"epoch {epoch}" + (f"\n{100 * acc:.1f}% test" if acc is not None else ""),
                            (0.5, 1.32), xycoords="axes fraction", ha="center", va="bottom", fontsize=8)
            if col == 0:
                ax.set_ylabel(f"ch {unit['channel']}", fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.subplots_adjust(left=0.04, right=0.995, bottom=0.01, top=1 - (head + 0.45) / fig.get_figheight())
    figures_dir = Path(figures_dir)
    name = f"evolution_{layer}{method_suffix(method)}{suffix}"
    png = save(fig, figures_dir / f"{name}.png")
    json_path = figures_dir / f"{name}.json"
    units = [dict(channel=unit["channel"], tiles=[]) for unit in evolution[0][2][layer]]
    for epoch, run, snapshot in evolution:
        for out, unit in zip(units, snapshot[layer]):
            out["tiles"].append(dict(epoch=epoch, iteration=run.checkpoint["iteration"], **unit["top"][0],
                                     **{"class": unit["class"]}))
    content = {**(record or {}), "layer": layer, "method": method, "images": searched,
               "epochs": [epoch for epoch, _, _ in evolution],
               "test_acc": [run.checkpoint.get("test_acc") for _, run, _ in evolution],
               "channels": format_indices([unit["channel"] for unit in units]), "units": units}
    return [png, save_json(json_path, content)]
