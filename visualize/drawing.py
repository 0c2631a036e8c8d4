"""Drawing: matplotlib is imported here and nowhere else in the repo. Grids, display scales, mosaics,
panels, titles and saving; every figure module builds on these.

Display conventions, the same in every figure: nearest interpolation, no ticks, one colour scale per
grid, and signed images (reconstructions, weights, differences) as 0.5 + r / (2 max|r|), so grey is 0.
"""
import json
import math
import textwrap
from pathlib import Path

import numpy as np

from data import denormalize
from utils import write_atomic, write_text_atomic

TITLE_WIDTH = 90  # characters a title line holds at the figures' sizes; a long data name takes two
# How titles name each of model.METHODS, ResNet.reconstruct's ways back to the pixels
FEATURE_MAP_TILES = 64  # a feature-map figure shows every channel of a stage with at most this many
SCALES = ("image", "shared")  # the display scale of reconstructions: max|r| per image, or one for all panels
METHOD_TITLES = {"deconvnet": "deconvnet reconstruction", "guided": "guided backpropagation", "gradient": "gradient"}


def wrap_title(text, width=TITLE_WIDTH):
    """A title wrapped to `width` characters a line (a wide figure's: more), never inside a word or at a hyphen."""
    return textwrap.fill(text, width, break_long_words=False, break_on_hyphens=False)


def format_indices(indices):
    """[0, 1, 2, 5] -> '0-2,5': an index list as file names and titles write it (runs as ranges);
    the inverse of cli.parse_indices."""
    parts, start = [], 0
    for i in range(1, len(indices) + 1):
        if i == len(indices) or indices[i] != indices[i - 1] + 1:
            first, last = indices[start], indices[i - 1]
            parts.append(str(first) if first == last else f"{first}-{last}")
            start = i
    return ",".join(parts)


def method_suffix(method):
    """'' for the default method (the deconvnet, the report's), else '_<method>': file names carry it."""
    return "" if method == "deconvnet" else f"_{method}"


def grid_shape(n):
    """(rows, columns) of the near-square grid that holds n panels, filled row by row."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def tile(maps, pad=1, fill=float("nan"), header=0, cols=None):
    """(N, H, W) or (N, H, W, 3) maps -> one array: the grid_shape(N) grid (or one of `cols` columns),
    filled row by row, `pad` cells of `fill` apart, each map below `header` rows of `fill` (room for a
    label)."""
    maps = np.asarray(maps, dtype=np.float32)
    n, h, w = maps.shape[:3]
    rows, cols = grid_shape(n) if cols is None else (math.ceil(n / cols), cols)
    cell_h, cell_w = header + h + pad, w + pad
    out = np.full((rows * cell_h - pad, cols * cell_w - pad, *maps.shape[3:]), fill, dtype=np.float32)
    for i, m in enumerate(maps):
        r, c = divmod(i, cols)
        out[r * cell_h + header:r * cell_h + header + h, c * cell_w:c * cell_w + w] = m
    return out


def to_display(x):
    """A normalized batch (N, 3, H, W) -> (N, H, W, 3) pixels in [0, 1] as numpy, for imshow."""
    return denormalize(x.detach().float()).permute(0, 2, 3, 1).cpu().numpy()


def signed_to_display(r, per_image=True):
    """Signed (N, 3, H, W) -> (N, H, W, 3) in [0, 1]: 0.5 + r / (2 max|r|), grey = 0.

    The max is taken per image (as every reconstruction is shown) or, with
    per_image=False, over the whole batch (one scale for a grid of filters).
    """
    r = r.detach().float()
    dims = (1, 2, 3) if per_image else (0, 1, 2, 3)
    scale = r.abs().amax(dims, keepdim=True).clamp_min(1e-12)
    return (0.5 + r / (2 * scale)).permute(0, 2, 3, 1).cpu().numpy()


def colour_mapped(values, cmap, low, high):
    """values (..., H, W) -> (..., H, W, 3) RGB in [0, 1] through the matplotlib colour map `cmap`,
    low and high its two ends (values beyond them get the end's colour)."""
    import matplotlib
    scaled = (np.asarray(values, dtype=np.float64) - low) / (high - low)
    return matplotlib.colormaps[cmap](np.clip(scaled, 0, 1))[..., :3]


def new_figure(width, height, dpi=150):
    """A figure of width x height inches drawn by the Agg renderer: no pyplot, no global state."""
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=dpi)


def bare(ax):
    ax.set_xticks([])
    ax.set_yticks([])


def save(fig, path, quiet=False):
    """Save a figure (the Agg renderer, no pyplot state), say so (unless quiet), and return the path."""
    path = Path(path)
    write_atomic(path, lambda f: fig.savefig(f, format=path.suffix[1:] or "png"))
    if not quiet:
        print(f"wrote {path}")
    return path


def json_ready(value):
    """`value` with every float NaN (a number no image defines) as None, JSON's null, through its dicts,
    lists and tuples."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {key: json_ready(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def save_json(path, record, indent=None):
    """`record` as JSON at `path` (NaN written as null, json_ready; infinity refused: JSON has neither),
    written atomically (write_text_atomic), so a reader never sees half of it; says so and returns the
    path. The JSON beside a figure holds its figure_record (visualize.cli) under "figure", for the page."""
    path = Path(path)
    write_text_atomic(path, json.dumps(json_ready(record), indent=indent, allow_nan=False) + "\n")
    print(f"wrote {path}")
    return path


def short_number(v):
    """An activation as a panel shows it: 3 significant digits, no exponent below 1000."""
    v = float(v)
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def show_mosaic(fig, ax, maps, symmetric=False, labels=None, index_ticks=False):
    """Draw (N, H, W) maps as one mosaic, filled row by row, on one colour scale, with its colour bar.

    symmetric: the scale is -m..m around 0 (for weights) rather than min..max (for feature maps).
    Maps under 16 pixels a side are enlarged (each pixel a block of pixels), so the one-pixel gaps stay
    thin beside them. Without labels the grid is near-square (grid_shape). labels: a text above each
    map, and as many columns as fill the axes. index_ticks: each row is labelled with the index of its
    first map and each column with +0, +1, ..., so map i sits at row label + column label.
    """
    import matplotlib
    maps = maps.detach().float().cpu()
    low, high = (-maps.abs().max(), maps.abs().max()) if symmetric else (maps.min(), maps.max())
    k = max(1, math.ceil(16 / max(maps.shape[-2:])))
    maps = maps.repeat_interleave(k, 1).repeat_interleave(k, 2).numpy()
    n, h, w = maps.shape
    rows, cols = grid_shape(n)

    def points_per_pixel(rows, cols, header):  # how large a mosaic pixel is drawn, from the axes' box
        box = ax.get_position()
        return 72 * min(box.width * fig.get_figwidth() / (cols * (w + 1)),
                        box.height * fig.get_figheight() / (rows * (header + h + 1)))

    header = 0
    if labels is not None:  # room for a label of ~6 points above each map; as many columns as fill the axes
        header = math.ceil(10 / points_per_pixel(rows, cols, 0))
        box = ax.get_position()
        shape = box.width * fig.get_figwidth() / (box.height * fig.get_figheight())
        cols = min(n, max(1, round(math.sqrt(n * shape * (header + h + 1) / (w + 1)))))
        rows = math.ceil(n / cols)
        header = math.ceil(10 / points_per_pixel(rows, cols, 0))
    cmap = matplotlib.colormaps["gray"].with_extremes(bad="lightsteelblue")  # the gaps: no grey level
    image = ax.imshow(tile(maps, header=header, cols=cols), cmap=cmap, vmin=low.item(), vmax=high.item(),
                      interpolation="nearest")
    bare(ax)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    column_centres = [c * (w + 1) + (w - 1) / 2 for c in range(cols)]
    if labels:
        ax.apply_aspect()  # the box as drawn: the labels' size follows from it
        size = points_per_pixel(rows, cols, header)
        fontsize = min(6.5, 0.7 * header * size, 1.6 * w * size / max(map(len, labels)))
        for i, label in enumerate(labels):
            r, c = divmod(i, cols)
            ax.text(column_centres[c], r * (header + h + 1) + (header - 1) / 2, label, ha="center",
                    va="center", fontsize=fontsize)
    if index_ticks:
        ax.set_xticks(column_centres, [f"+{c}" for c in range(cols)])
        ax.set_yticks([r * (h + 1) + (h - 1) / 2 for r in range(rows)], [str(r * cols) for r in range(rows)])
        ax.xaxis.set_ticks_position("top")
        ax.tick_params(length=0, pad=1, labelsize=6 if cols <= 12 else 5)


def save_mosaic(path, maps, title, symmetric=False):
    """One figure holding show_mosaic(maps)."""
    fig = new_figure(6.4, 6)
    ax = fig.add_subplot()
    show_mosaic(fig, ax, maps, symmetric)
    ax.set_title(title, fontsize=9)
    return save(fig, path)


def save_rgb_mosaic(path, rgb, title):
    """(N, H, W, 3) images in [0, 1] as one mosaic with white gaps."""
    fig = new_figure(6, 6.3)
    ax = fig.add_subplot()
    ax.imshow(tile(rgb, fill=1.0), interpolation="nearest")
    bare(ax)
    ax.set_title(title, fontsize=9)
    return save(fig, path)


def save_panels(path, panels, title, cols=None):
    """RGB panels [(array (H, W, 3) in [0, 1], panel title[, note written across the panel]), ...] in a grid
    with `cols` columns."""
    rows, cols = grid_shape(len(panels)) if cols is None else (math.ceil(len(panels) / cols), cols)
    size = min(max(8 / cols, 1.3), 2.6)  # inches a panel: few panels get room for their titles
    fig = new_figure(size * cols + 0.4, (size + 0.3) * rows + 0.9)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (image, panel_title, *note) in zip(axes, panels):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(panel_title, fontsize=7)
        if note:
            ax.text(0.5, 0.5, note[0], transform=ax.transAxes, ha="center", va="center", fontsize=7)
    for ax in axes:
        bare(ax)
        ax.set_frame_on(ax.has_data())  # empty cells of the last row stay blank
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save(fig, path)


# The row shading of save_text_table by a row's kind, and of a cell by its verdict
KIND_COLOURS = {"unit picture": "#eef3fb", "class map": "#f7f2ea", "baseline": "#e6e6e6"}
VERDICT_COLOURS = {"pass": "#cdebc5", "fail": "#f4c7c3", "unresolved": "#f6e7b4"}


def save_text_table(path, cells, title, column_titles, row_titles, row_kinds):
    """A table of text: cells[i][j] written in row i (titled row_titles[i] at its left, shaded by
    KIND_COLOURS[row_kinds[i]]) and column j, under the title; a last column of "<test> pass|fail|unresolved, ..."
    verdicts is shaded red where any test fails, else yellow where any is unresolved, else green."""
    title_height = 0.13 * (title.count("\n") + 1) + 0.15  # inches, at 7 points a line
    table_height = 0.22 * (len(cells) + 1)
    height = title_height + table_height + 0.15
    fig = new_figure(0.95 * len(column_titles) + 3.6, height)
    ax = fig.add_axes((0.01, 0.1 / height, 0.98, table_height / height))
    ax.axis("off")
    rows = [[title_, *row] for title_, row in zip(row_titles, cells)]
    header = ["", *column_titles]
    characters = [max(len(str(row[j])) for row in [header, *rows]) + 2 for j in range(len(header))]
    table = ax.table(cellText=rows, colLabels=header, loc="upper center", cellLoc="center", bbox=(0, 0, 1, 1),
                     colWidths=[c / sum(characters) for c in characters])
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    for i, kind in enumerate(row_kinds, start=1):
        for j in range(len(header)):
            table[i, j].set_facecolor(KIND_COLOURS.get(kind, "white"))
        verdict = cells[i - 1][-1]
        shade = next((word for word in ("fail", "unresolved", "pass") if word in verdict), None)
        if shade:
            table[i, len(header) - 1].set_facecolor(VERDICT_COLOURS[shade])
    fig.text(0.5, 1 - 0.06 / height, title, ha="center", va="top", fontsize=7)
    return save(fig, path)


def save_table(path, cells, title, column_titles, row_titles):
    """RGB panels in a table: cells[i][j] = (array (H, W, 3) in [0, 1], or None for a blank cell;
    caption written under it), one row per row title (written at its left) and one column per column
    title (written above the first row)."""
    rows, cols = len(cells), len(column_titles)
    size = 1.25  # inches a panel
    fig = new_figure(size * cols + 0.6, (size + 0.35) * rows + 0.25 * (title.count("\n") + 1) + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, row in enumerate(cells):
        for j, (image, caption) in enumerate(row):
            ax = axes[i, j]
            bare(ax)
            if image is None:  # the caption stands in the blank cell
                ax.set_frame_on(False)
                ax.text(0.5, 0.5, caption, transform=ax.transAxes, ha="center", va="center", fontsize=6.5)
            else:
                ax.imshow(image, interpolation="nearest")
                ax.set_xlabel(caption, fontsize=7)
            if i == 0:
                ax.set_title(column_titles[j], fontsize=7)
            if j == 0:
                ax.set_ylabel(row_titles[i], fontsize=8)
    # 0.1 inch from the top (suptitle's default, 2 % of the height, pushed a tall table's title into its column titles)
    fig.suptitle(title, fontsize=8, y=1 - 0.1 / fig.get_figheight(), va="top")
    fig.tight_layout()
    return save(fig, path)
