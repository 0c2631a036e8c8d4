"""figures/index.html: one static page to read every figure of a figures folder, and the run it shows.

    page.write_page(figures_dir, checkpoint, device)   # plot_all.py calls it last; -> the page's path

The page is rebuilt from the files in the folder, not from what this process drew, so nothing drawn by
a single script, by an earlier run or by a script newer than this module goes missing. Every plot
script writes beside each PNG a JSON of the same name whose "figure" is its cli.figure_record (the
figure's kind, flags, the command that draws it again and the checkpoint it came from); the page reads
nothing from file names. By its kind (KINDS) a figure goes into a section in the README's order, with
a caption saying what it shows (from its JSON; a --quick run's says so and on how many images its
numbers rest) and the record's command, the files beside it (same stem: .json, .pt) linked. A figure
whose record names another checkpoint, or this one at another iteration, is shown apart, under that
checkpoint ("Figures of other checkpoints"); every file without a record lands in "Other files". The
atlas's units become one sortable table, the sanity checks and the trust table tables of numbers (the
trust table's each a mean with its standard error).

Plain HTML, CSS and a few lines of script, all in the one file. Every link is a file of the folder or
an anchor of the page, so the folder can be zipped and sent. Everything from the checkpoint, the data
or a file name is escaped (html.escape), so a class name such as <script> shows as text. Two URL
fragments drive the script: #sort=<column>-<asc|desc> sorts the atlas's table (e.g. selectivity-desc,
so a sorted view can be linked); #selftest writes each image's natural width into its tag
(data-natural-width), for the browser test.
"""
import html
import json
import math
import re
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote

from cifar10 import dataset_root, describe_dataset
from utils import UserError, write_text_atomic
from visualize import cli
from visualize.context import load_run
from visualize.drawing import METHOD_TITLES, format_indices
from visualize.progress import PROGRESS_FIGURES

PAGE = "index.html"
SECTIONS = {  # id: heading, in the README's order
    "progress": "Learning progress",
    "maps": "Filters and feature maps",
    "reconstructions": "Reconstructions, by method",
    "atlas": "The unit atlas, per stage",
    "featurevis": "Feature visualization and the gradient pattern",
    "trust": "Sanity checks and trust",
    "evidence": "Class evidence",
    "training": "What it learned, and when",
    "zeiler_fergus": "Invariance and occlusion (Zeiler & Fergus)",
    "elsewhere": "Figures of other checkpoints",
    "other": "Other files",
}
WIDE_SECTIONS = {"reconstructions", "atlas", "trust", "evidence", "training", "zeiler_fergus"}  # two a row on a laptop
METHOD_SUBSECTIONS = {"deconvnet": "Deconvnet (Zeiler & Fergus, the report's)", "guided": "Guided backpropagation",
                      "gradient": "The plain gradient"}


# ------------------------------------------------------------------- each kind of figure, from its record
# Each describer gets the JSON beside the PNG (its "figure" key: cli.figure_record) and returns
# (subsection or None, caption); the command is the record's own.

def progress_figure(record):
    split, _, what = str(record.get("curve", "")).partition("_")
    what = {"accuracy": "accuracy", "loss": "cross-entropy loss"}.get(what, what)
    caption = (f"Training {what} of every batch (faint) and its mean over windows of iterations, against the "
               f"iteration." if split == "train" else f"Test {what} on the whole test split after every epoch.")
    return None, caption + " train.py draws it too, as it trains."


def filters_figure(record):
    channel = record.get("input_channel")
    if channel is None:
        return None, "conv1's filters as RGB images, one display scale for the whole grid, grey = 0."
    return None, (f"conv1's filters on input channel {channel} ({'RGB'[int(channel)]} of the image), one colour "
                  f"scale symmetric around 0.")


def feature_maps_figure(record):
    layer, chosen = record.get("layer"), record["figure"]["flags"].get("--channels") not in (None, "auto")
    shown = (f"channels {format_indices(record.get('channels', []))} of its {layer} feature maps, each labelled with "
             f"its maximum" if chosen else
             f"its {layer} feature maps (where the stage has more than 64: the 64 most active, labelled)")
    return None, f"Test image {record.get('image')} and {shown}, on one colour scale."


def reconstructions_figure(record):
    method, path, layer = record.get("method", "deconvnet"), record.get("path", "both"), record.get("layer")
    through = "" if layer == "conv1" else f", through {'both branches' if path == 'both' else 'the ' + str(path)} of " \
                                          f"each residual sum"
    scale = ("one display scale for all panels, so strengths compare" if record.get("scale") == "shared" else
             "each scaled to its own max|r|")
    caption = (f"{layer} channel {record.get('channel')}: the {METHOD_TITLES.get(method, method)}"
               f"{' of its strongest activation (top-1)' if record.get('top1') else ''}{through}, beside test images "
               f"{format_indices(record.get('images', []))}, each headed by the channel's activation on it; {scale}, "
               f"grey = 0.")
    return METHOD_SUBSECTIONS.get(method, method), caption


def atlas_ablated(record):
    units = record.get("units") or [{}]
    return (units[0].get("ablation") or {}).get("images")


def atlas_figure(record):
    method, ablated = record.get("method", "deconvnet"), atlas_ablated(record)
    caption = (f"The atlas of {record.get('layer')}: for each channel the 9 test images with its largest single "
               f"activation, the top-1 {METHOD_TITLES.get(method, method)} beside each image, cropped to the unit's "
               f"receptive field; above each block its leading class, class selectivity and the accuracy lost when it "
               f"is set to 0{f' (first {ablated} test images)' if ablated else ''}. Every unit's numbers: the table "
               f"above.")
    return None, caption


def gradient_pattern_figure(record):
    layer, channel = record.get("layer"), record.get("channel")
    start = (f"test image {record['image']}" if record["figure"]["flags"].get("--image-index") is not None else
             f"test image {record.get('image')}, the one that excites {layer} channel {channel} most (the sum of its "
             f"feature map)")
    return None, (f"The report's gradient pattern of {layer} channel {channel}: from {start}, {record.get('steps')} Adam "
                  f"steps on the input raise that sum; the start, the pattern, and their difference (grey = 0).")


def feature_visualization_figure(record):
    objective = "its centre unit" if record.get("objective") == "neuron" else "its mean over the feature map"
    start = ("from the test image that excites it most, beside the report's pattern from the same image"
             if record.get("start") == "top" else "from the data's mean colour")
    return None, (f"Feature visualization of {record.get('layer')} channels "
                  f"{format_indices(record.get('channels', []))}: for each an image optimised to excite {objective}, a "
                  f"1/f Fourier image made robust to small shifts, zooms and rotations, {start}.")


def sanity_figure(record):
    layer = record.get("layer")
    return None, (f"Sanity checks (Adebayo et al. 2018) of {layer} channel {record.get('channel')}: every technique "
                  f"redrawn as the stages are re-initialised from {layer} down, under each picture its Spearman "
                  f"similarity to the trained network's (1: unchanged, 0: unrelated), a mean over test images "
                  f"{format_indices(record.get('images', []))}; the numbers below.")


def trust_figure(record):
    return None, ("The trust table: each technique, unit pictures and class maps alike, by how much it depends on the "
                  "weights (and on the class, on test images "
                  f"{format_indices(record.get('dependence_images', []))}) and how faithful it is (on the first "
                  f"{record.get('count')} test images), beside a random map and an edge map; the numbers below.")


def class_evidence_figure(record):
    return None, (f"Class evidence: test images {format_indices(record.get('images', []))} with their true and "
                  f"predicted class and its probability, and for each method the map of the pixels that made the "
                  f"prediction.")


def quick_basis(kind, record):
    """What a --quick figure's numbers rest on, in words (how many images, or steps); None where its
    kind has no --quick."""
    if kind == "atlas":
        return f"the accuracy drops on {atlas_ablated(record)} test images"
    if kind == "sanity":
        return f"the similarities on {len(record.get('images', []))} test images"
    if kind == "feature_visualization":
        return f"{record.get('steps')} optimisation steps"
    if kind == "trust":
        return (f"faithfulness on {record.get('count')} test images, the weights and class on "
                f"{len(record.get('dependence_images', []))}")
    if kind == "learning_dynamics":
        return (f"the CKA on {record.get('images')} test images, the probes fitted on {record.get('probe_images')} "
                f"training images and scored with the selectivity on {record.get('split_images')} test images, the "
                f"evidence on {record.get('count')}")
    if kind == "feature_evolution":
        return f"the strongest activations over the first {record.get('images')} test images"
    return None


def invariance_figure(record):
    caption = ("Invariance: test images shifted vertically, scaled and rotated; against each, how far the representation "
               "moves from the original's at conv1, conv5_x and the pooled features (divided by its norm), and the "
               "probability of the true class; a line an image, black their mean ± its standard error.")
    return None, caption


def occlusion_figure(record):
    caption = ("Occlusion: a grey square slid over each test image; where it is, the activation of the image's "
               "strongest conv5_x channel, the probability of the true class and the most probable class, with that "
               "channel's projection to the pixels: does the network look at the object or at its context?")
    return None, caption


def dynamics_figure(record):
    caption = ("Learning dynamics from the run's snapshots: each stage's linear CKA to its last snapshot (when it "
               "converges), a linear probe's test accuracy and its mean class selectivity, and Grad-CAM's and the "
               "gradient's class test and ROAD gap, against the epoch.")
    return None, caption


def evolution_figure(record):
    caption = (f"How units of {record.get('layer')} change through training (Zeiler & Fergus's Figure 4): per channel and "
               f"snapshot, the strongest activation over {record.get('images', 'the')} test images projected back to the "
               f"pixels, beside its image patch, cropped to the receptive field.")
    return None, caption


# ------------------------------------------------------------------- HTML pieces

def e(value):
    """Text for HTML, attributes included: every &, <, >, " and ' escaped."""
    return html.escape(str(value), quote=True)


def href(name):
    """The relative URL of a file in the folder, escaped for an attribute."""
    return e(quote(name))


def anchor(name):
    """The element id of a file's figure: its name with anything but letters, digits and _.- as _."""
    return e("f-" + re.sub(r"[^A-Za-z0-9_.-]", "_", name))


def png_size(path):
    """(width, height) from a PNG's header, None for a file that is not one: the page reserves each
    image's box before it loads."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def cell(value, digits=3):
    """A <td> of a JSON value, with data-value for sorting: numbers right-aligned (floats to `digits`
    decimals), None (undefined: JSON's null for NaN) as n/a, sorted last."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '<td class="num" data-value="NaN">n/a</td>'
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        shown = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
        return f'<td class="num" data-value="{e(repr(value))}">{e(shown)}</td>'
    text = value if isinstance(value, str) else json.dumps(value)
    return f'<td data-value="{e(text)}">{e(text)}</td>'


def table(columns, rows, table_id=None, sortable=False):
    """A <table>: columns [(key, title, numeric)], rows lists of ready <td> strings."""
    head = "".join(
        f'<th data-key="{e(key)}" data-type="{"num" if numeric else "text"}"' +
        (f'><button type="button">{e(title)}</button></th>' if sortable else f">{e(title)}</th>")
        for key, title, numeric in columns)
    body = "".join(f"<tr>{''.join(row)}</tr>" for row in rows)
    attributes = (f' id="{e(table_id)}"' if table_id else "") + (' class="sortable"' if sortable else "")
    return f"<table{attributes}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ------------------------------------------------------------------- the tables of numbers

def atlas_table(atlas_records):
    """Every atlas unit, a row: stage, channel, leading class, selectivity, accuracy lost when ablated,
    the class that loses most and how much; each row links to its stage's picture. One JSON a stage
    (the deconvnet's where there are several: the numbers do not depend on the method)."""
    columns = [("stage", "stage", False), ("channel", "channel", True), ("leading", "leading class", False),
               ("selectivity", "selectivity", True), ("lost", "accuracy lost when ablated (points)", True),
               ("class", "class that loses most", False), ("class_lost", "its loss (points)", True),
               ("picture", "picture", False)]
    rows = []
    for png, record in atlas_records:
        for unit in record.get("units", []):
            ablation = unit.get("ablation") or {}
            lost = (100 * (ablation["unablated_accuracy"] - ablation["accuracy"])
                    if "accuracy" in ablation else None)
            class_lost = 100 * ablation["class_drop"] if "class_drop" in ablation else None
            rows.append([
                cell(record.get("layer", "")), cell(unit["channel"]), cell(unit.get("leading_class") or "none (silent)"),
                cell(unit.get("selectivity")), cell(lost, 1),
                cell(ablation.get("class") if class_lost else "none"), cell(class_lost, 1),
                f'<td data-value="{e(png)}"><a href="{href(png)}" title="its block is headed &quot;channel '
                f'{e(unit["channel"])}&quot;">{e(png)}</a></td>'])
    if not rows:
        return ""
    images = sorted({(unit.get("ablation") or {}).get("images") for _, record in atlas_records
                     for unit in record.get("units", [])} - {None})
    images = " or ".join(map(str, images)) or "?"
    return (f'<div class="note">Every unit of the atlas. Selectivity: Morcos et al.\'s class selectivity index '
            f'over the test split; accuracy lost: the test accuracy on the first {e(images)} test images with the '
            f'channel set to 0, below the network\'s own, in points. Click a heading to sort (again to reverse); '
            f'<a href="#sort=selectivity-desc">most selective first</a>, '
            f'<a href="#sort=lost-desc">most needed first</a>.</div>'
            f'<div class="scroll">{table(columns, rows, "atlas-units", sortable=True)}</div>')


def sanity_table(record):
    """A sanity JSON's similarities: a row per technique, a column per depth (trained; the unit's stage
    random; + each stage below also random)."""
    depths = record.get("depths") or []
    similarity = record.get("similarity") or {}
    if not depths or not isinstance(similarity, dict):
        return ""
    layer = record.get("layer", depths[1] if len(depths) > 1 else "")
    titles = [("+ " if d not in ("trained", layer) else "") + str(d) + (" random" if d == layer else "") for d in depths]
    columns = [("technique", "technique", False)] + [(str(d), title, True) for d, title in zip(depths, titles)]
    rows = [[f"<th>{e(name)}</th>"] + [cell(v) for v in values] for name, values in similarity.items()]
    return table(columns, rows)


def row_keys(rows):
    """Every key of the JSON objects `rows`, once, in the order of the row that has the most (the others'
    extra keys after them): a table's columns."""
    return list(dict.fromkeys(key for row in sorted(rows, key=len, reverse=True) for key in row))


def trust_table(record):
    """A trust JSON's rows: a row per technique, its kind, each column's mean with its standard error
    beside it (sorted by the mean; n/a where the column does not apply, undefined where no image defines it),
    then its verdicts. The columns are the JSON's, in the order of the row that has the most."""
    rows = record.get("rows")
    if not isinstance(rows, dict) or not rows or not all(isinstance(r, dict) for r in rows.values()):
        return ""
    keys = [key for key in row_keys(rows.values()) if key not in ("kind", "passes", "cascade") and not key.endswith(" SE")]
    columns = ([("technique", "technique", False), ("kind", "kind", False)] + [(key, key, True) for key in keys]
               + [("verdicts", "verdicts", False)])

    def mean_cell(row, key):
        value, error = row.get(key), row.get(f"{key} SE")
        if key not in row or not isinstance(value, (int, float, type(None))):
            return '<td class="num" data-value="NaN">n/a</td>'
        if value is None:
            return '<td class="num" data-value="NaN">undefined</td>'
        shown = f"{value:.2f}" + (f" ±{error:.2f}" if isinstance(error, (int, float)) else "")
        return f'<td class="num" data-value="{e(repr(value))}">{e(shown)}</td>'
    body = []
    for name, row in rows.items():
        passes = row.get("passes") if isinstance(row.get("passes"), dict) else {}
        verdicts = ", ".join(f"{test} {verdict}" for test, verdict in passes.items()) or "reference"
        body.append([f'<th data-value="{e(name)}">{e(name)}</th>', cell(str(row.get("kind", "")))]
                    + [mean_cell(row, key) for key in keys] + [cell(verdicts)])
    return table(columns, body, sortable=True)


LARGE = object()  # a JSON value too large for a cell (a map, a list): it stays in the JSON


def shown_value(value):
    """What a table cell shows of a JSON value: a scalar as it is, booleans as yes/no, an object of at
    most 8 scalars as 'key value, ...'; LARGE for anything else."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None or isinstance(value, (str, int, float)):
        return value
    if isinstance(value, dict) and len(value) <= 8 and all(isinstance(v, (str, int, float)) for v in value.values()):
        return ", ".join(f"{key} {shown_value(v)}" for key, v in value.items())
    return LARGE


def json_table(record):
    """The largest table in a JSON whose layout this module does not pin (the trust table's, the class
    evidence's): a list of objects, a row each, or an object of objects, a row per key, with the
    columns a cell can show (shown_value); '' when there is none. Sortable by every column."""
    found = []
    for value in [record, *(record.values() if isinstance(record, dict) else [])]:
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            found.append((None, value))
        elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            found.append((list(value), list(value.values())))
    if not found:
        return ""
    names, rows = max(found, key=lambda f: len(f[1]))
    keys = [key for key in row_keys(rows) if all(shown_value(row.get(key)) is not LARGE for row in rows)]
    numeric = {key: all(isinstance(shown_value(row.get(key)), (int, float, type(None))) for row in rows) for key in keys}
    columns = ([("name", "", False)] if names else []) + [(key, key, numeric[key]) for key in keys]
    body = [([f'<th data-value="{e(name)}">{e(name)}</th>'] if names else []) +
            [cell(shown_value(row.get(key))) for key in keys] for name, row in zip(names or rows, rows)]
    return table(columns, body, sortable=True)


# ------------------------------------------------------------------- the run

def data_name(data_dir, synthetic):
    """cifar10.describe_dataset's name of the data in data_dir (checkpoints before it was stored in the
    config, and test data other than the training data); where it cannot be read, its folder."""
    try:
        return describe_dataset(dataset_root(data_dir, synthetic), synthetic)
    except UserError:
        return f"the data in {data_dir} (not readable now)"


def run_description(run, checkpoint, note=""):
    """The run the figures show, from the checkpoint's config and history: a table of what it is (and
    `note`, HTML, under it), beside every training setting of its config."""
    ckpt = run.checkpoint
    config, history = ckpt.get("config", {}), ckpt.get("history", {})
    trained_on = config.get("data_name") or data_name(config.get("data_dir", "data"), config.get("synthetic", False))
    same = (run.data_dir, run.synthetic) == (config.get("data_dir", "data"), config.get("synthetic", False))
    tested_on = "the same" if same else data_name(run.data_dir, run.synthetic)
    asked = (f"{config['iterations']} iterations" if config.get("iterations") else
             f"{config['epochs']} epochs" if config.get("epochs") else "")
    trained = f"{ckpt.get('iteration', '?')} iterations (epoch {ckpt.get('epoch', '?')})" + (
        f"; the run asked for {asked}" if asked else "")
    if history.get("test_acc"):
        accuracy = (f"{100 * history['test_acc'][-1]:.2f} % at iteration {history['test_iteration'][-1]} "
                    f"(epoch {history['test_epoch'][-1]}), the last test of the whole test split")
    else:
        accuracy = "not measured yet (no epoch has ended)"
    summary = [("checkpoint", str(checkpoint)), ("network", f"width-{run.model.width} ResNet-18"),
               ("trained on", trained_on), ("CIFAR-10?", "yes" if trained_on == "CIFAR-10" else "no"),
               ("test images from", tested_on), ("classes", ", ".join(map(str, config.get("classes", run.classes)))),
               ("trained for", trained), ("test accuracy", accuracy)]
    shown = {"data_name", "classes"}
    settings = [(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
                for key, value in config.items() if key not in shown]
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in summary)
    wide = ' class="wide"'  # a long value (the speed settings' reason) takes a line of its own
    setting_items = "".join(f'<div{wide if len(v) > 60 else ""}><dt>{e(k)}</dt><dd>{e(v)}</dd></div>'
                            for k, v in settings)
    return (f'<div class="run-grid"><div><table class="run">{rows}</table>{note}</div><div>'
            f'<h3>Training settings (the checkpoint\'s config: train.py\'s flags and what it chose)</h3>'
            f'<dl class="settings">{setting_items}</dl></div></div>')


# ------------------------------------------------------------------- the page

# kind (cli.figure_record's "kind"): (section, describer, the table of its JSON's numbers or None), in
# the order the page shows them
KINDS = {
    "progress": ("progress", progress_figure, None),
    "conv1_filters": ("maps", filters_figure, None),
    "feature_maps": ("maps", feature_maps_figure, None),
    "reconstructions": ("reconstructions", reconstructions_figure, None),
    "atlas": ("atlas", atlas_figure, None),  # one table for all stages
    "gradient_pattern": ("featurevis", gradient_pattern_figure, None),
    "feature_visualization": ("featurevis", feature_visualization_figure, None),
    "sanity": ("trust", sanity_figure, sanity_table),
    "trust": ("trust", trust_figure, trust_table),
    "class_evidence": ("evidence", class_evidence_figure, json_table),
    "feature_evolution": ("training", evolution_figure, None),
    "learning_dynamics": ("training", dynamics_figure, None),
    "invariance": ("zeiler_fergus", invariance_figure, None),
    "occlusion": ("zeiler_fergus", occlusion_figure, None),
}
# The reconstructions' subsections in this order, whatever the file names' order
SUBSECTION_ORDER = list(METHOD_SUBSECTIONS.values())


class Figure(NamedTuple):
    name: str  # the PNG's file name
    subsection: str | None
    caption: str
    command: str
    beside: list  # the names of the files beside it (same stem)
    numbers: str  # HTML: the table of its JSON's numbers, or ''


def figure_of(record):
    """A JSON's figure_record, if it has one the page can read (a dict with a kind, flags and a command)."""
    figure = (record or {}).get("figure")
    if isinstance(figure, dict) and isinstance(figure.get("flags"), dict) and isinstance(figure.get("command"), str):
        return figure
    return None


def same_run(figure, checkpoint, iteration):
    """Whether a figure_record is of the page's run: the same checkpoint file, trained as far."""
    try:
        same_file = Path(figure.get("checkpoint", "")).resolve() == Path(checkpoint).resolve()
    except (OSError, TypeError, ValueError):
        return False
    return same_file and figure.get("iteration", iteration) == iteration


def elsewhere_heading(figure):
    """The subsection of the figures another checkpoint drew: which one, and how far it was trained."""
    iteration = figure.get("iteration")
    return (f"Drawn from {figure.get('checkpoint', 'an unknown checkpoint')}"
            + (f" at iteration {iteration}" if iteration is not None else "") + ", not this page's run")


def order(kind, record, subsection):
    """Where a figure goes among those of its section: by kind (KINDS' order), then the learning curves
    in train.py's order and the reconstructions by method; ties by name."""
    if kind == "progress":
        curve = record.get("curve")
        return list(KINDS).index(kind), PROGRESS_FIGURES.index(curve) if curve in PROGRESS_FIGURES else 0
    if subsection in SUBSECTION_ORDER:
        return list(KINDS).index(kind), SUBSECTION_ORDER.index(subsection)
    return list(KINDS).index(kind), 0


def classify_files(folder, checkpoint=None, iteration=None):
    """The folder's files: ({section: [Figure, ...]}, {atlas PNG: its JSON record}, [every other
    file's name]). A PNG goes into a section by the figure_record in the JSON beside it (its kind),
    described from that JSON; one whose record names another checkpoint than `checkpoint` (None: any),
    or the same one trained to another iteration, goes into "elsewhere", under its checkpoint; one
    without a record the page knows is among the others. Each section in KINDS' order."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != PAGE and not p.name.startswith("."))
    stems = {}
    for name in names:
        stems.setdefault(name.rsplit(".", 1)[0], []).append(name)
    claimed, found, atlas_records = set(), {key: [] for key in SECTIONS}, {}
    for name in names:
        stem = name[:-len(".png")]
        if not name.endswith(".png") or f"{stem}.json" not in stems[stem]:
            continue
        record = read_json(folder / f"{stem}.json")
        figure = figure_of(record)
        if figure is None or figure.get("kind") not in KINDS:
            continue
        section, describe, numbers = KINDS[figure["kind"]]
        subsection, caption = describe(record)
        basis = quick_basis(figure["kind"], record) if cli.is_quick(figure) else None
        if basis:
            caption = f"The quick run, a first look: {basis}. {caption}"
        ours = checkpoint is None or same_run(figure, checkpoint, iteration)
        if not ours:
            section, subsection = "elsewhere", elsewhere_heading(figure)
        elif section == "atlas":
            atlas_records[name] = record
        beside = [other for other in stems[stem] if other != name]
        rank = order(figure["kind"], record, subsection)
        found[section].append(((rank, name) if ours else (subsection, rank, name),
                               Figure(name, subsection, caption, figure["command"], beside,
                                      numbers(record) if numbers else "")))
        claimed.update([name, *beside])
    sections = {key: [figure for _, figure in sorted(entries, key=lambda entry: entry[0])]
                for key, entries in found.items()}
    return sections, atlas_records, [name for name in names if name not in claimed]


def read_json(path):
    """A JSON object from a file; None for one that cannot be read or is no object (it is linked all
    the same; only its numbers are left out)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def figure_card(folder, figure):
    size = png_size(folder / figure.name)
    dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
    links = " ".join(f'<a href="{href(b)}">{e(b)}</a>' for b in figure.beside)
    return (f'<figure id="{anchor(figure.name)}"><a href="{href(figure.name)}"><img src="{href(figure.name)}"{dims} '
            f'alt="{e(figure.caption)}"></a><figcaption><a class="name" href="#{anchor(figure.name)}">'
            f'{e(figure.name)}</a> {e(figure.caption)}' + (f'<code>{e(figure.command)}</code>' if figure.command else "")
            + (f'<span class="data">beside it: {links}</span>' if links else "") + f'</figcaption>{figure.numbers}</figure>')


def section_body(folder, figures, grid):
    """A section's figures in `grid`s, a heading before each subsection."""
    if not figures:
        return '<p class="none">None in this folder.</p>'
    parts, cards, subsection = [], [], None
    for figure in figures:
        if figure.subsection != subsection:
            parts.append(f'<div class="{grid}">{"".join(cards)}</div>' if cards else "")
            parts.append(f"<h3>{e(figure.subsection)}</h3>")
            subsection, cards = figure.subsection, []
        cards.append(figure_card(folder, figure))
    return "".join(parts) + f'<div class="{grid}">{"".join(cards)}</div>'


def other_files(folder, names):
    """The files the page cannot describe: a PNG shown as a figure, anything else linked."""
    figures = [Figure(name, None, "A figure without a record of what drew it (a JSON beside it, of the same name, "
                                  "with its \"figure\"): this page cannot say what it shows.", "", [], "")
               for name in names if name.endswith(".png")]
    files = "".join(f'<li><a href="{href(name)}">{e(name)}</a></li>' for name in names if not name.endswith(".png"))
    return (section_body(folder, figures, "grid") if figures else "") + (
        f'<ul class="files">{files}</ul>' if files else "")


def page_html(folder, run, checkpoint):
    folder = Path(folder)
    sections, atlas_records, others = classify_files(folder, checkpoint, run.checkpoint.get("iteration"))
    by_layer = {}  # one atlas JSON a stage for the table: the deconvnet's where several methods were drawn
    for png, record in atlas_records.items():
        layer = record.get("layer", png)
        if layer not in by_layer or record.get("method") == "deconvnet":
            by_layer[layer] = (png, record)
    parts, nav = [], []
    for key, heading in SECTIONS.items():
        if key == "other":
            if not others:
                continue
            body, count = other_files(folder, others), len(others)
        else:
            figures = sections[key]
            if key == "elsewhere" and not figures:
                continue
            body = section_body(folder, figures, "grid wide" if key in WIDE_SECTIONS else "grid")
            if key == "elsewhere":
                body = ('<p class="note">Figures in this folder that a run drew from another checkpoint, or from '
                        'this one at another iteration: each under the checkpoint its record names. They do not '
                        'show this page\'s run.</p>' + body)
            body, count = (atlas_table(list(by_layer.values())) if key == "atlas" else "") + body, len(figures)
        nav.append(f'<a href="#{key}">{e(heading)} <span>{count}</span></a>')
        parts.append(f'<section id="{key}"><h2>{e(heading)}</h2>{body}</section>')
    title = f"{Path(checkpoint).name}: what a width-{run.model.width} ResNet-18 learned"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>{e(title)}</title><style>{STYLE}</style></head>'
            f'<body><header><h1>{e(title)}</h1><nav><a href="#run">The run</a>{"".join(nav)}</nav></header><main>'
            f'<section id="run"><h2>The run</h2>{run_description(run, checkpoint, NOTE)}</section>'
            f'{"".join(parts)}</main><script>{SCRIPT}</script></body></html>\n')


NOTE = ('<p class="note">Rebuilt by plot_all.py from the files in this folder: each figure is described from the '
        'JSON beside it, which records what drew it, and its caption gives the command that draws it again. '
        'Click a figure for the full-size file.</p>')


def write_page(figures_dir, checkpoint, device, data_dir=None, synthetic=None):
    """figures_dir/index.html for the figures in it, the run described from `checkpoint` (loaded as
    the plot scripts load it: context.load_run, so plot_all.py pays nothing for it). Returns its path."""
    run = load_run(checkpoint, device, data_dir, synthetic, test_split=False)
    path = Path(figures_dir) / PAGE
    write_text_atomic(path, page_html(figures_dir, run, checkpoint))  # a reader never sees half a page
    print(f"wrote {path}")
    return path


STYLE = """
:root { --ink: #1d2330; --soft: #5b6475; --line: #d9dde5; --bg: #f6f7f9; --accent: #2458a6; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink); background: var(--bg); }
header { position: sticky; top: 0; z-index: 2; background: #fff; border-bottom: 1px solid var(--line); padding: 8px 24px; }
h1 { font-size: 19px; margin: 0 0 4px; }
nav { display: flex; flex-wrap: wrap; gap: 4px 14px; font-size: 14px; }
nav a span { color: var(--soft); font-size: 12px; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
main { max-width: 1500px; margin: 0 auto; padding: 0 24px 48px; }
section { padding-top: 8px; }
h2 { font-size: 18px; margin: 24px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 15px; margin: 16px 0 8px; color: var(--soft); }
section[id], figure[id] { scroll-margin-top: 80px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(420px, 100%), 1fr)); gap: 14px; align-items: start; }
.grid.wide { grid-template-columns: repeat(auto-fill, minmax(min(600px, 100%), 1fr)); }
figure { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 10px; }
figure img { display: block; width: 100%; height: auto; }
figcaption { font-size: 13.5px; margin-top: 8px; }
figcaption .name { display: block; font-weight: 600; word-break: break-all; }
code { display: block; margin-top: 6px; padding: 4px 6px; background: var(--bg); border-radius: 4px;
       font: 12.5px/1.4 ui-monospace, "DejaVu Sans Mono", monospace; white-space: pre-wrap; word-break: break-word; }
.data { display: block; margin-top: 4px; font-size: 13px; }
table { border-collapse: collapse; font-size: 13.5px; background: #fff; }
th, td { padding: 3px 9px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
thead th { background: #eef1f5; position: sticky; top: 0; }
figure table { margin-top: 8px; width: 100%; }
figure { min-width: 0; overflow-x: auto; }  /* a wide table (the trust table's) scrolls inside its card */
td.num { white-space: nowrap; }
table.run { width: 100%; }
table.run th { white-space: nowrap; color: var(--soft); font-weight: 600; }
.run-grid { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 24px; align-items: start; }
@media (max-width: 1000px) { .run-grid { grid-template-columns: minmax(0, 1fr); } }
.run-grid h3 { margin-top: 0; }
dl.settings { display: grid; grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); gap: 2px 16px;
              margin: 0; font-size: 13.5px; }
dl.settings div { display: flex; gap: 8px; border-bottom: 1px solid var(--line); padding: 2px 0; min-width: 0; }
dl.settings div.wide { grid-column: 1 / -1; }
dl.settings dt { color: var(--soft); font-weight: 600; }
dl.settings dd { margin: 0; font: 12.5px/1.5 ui-monospace, "DejaVu Sans Mono", monospace; word-break: break-word; }
.scroll { max-height: 70vh; overflow: auto; border: 1px solid var(--line); margin-bottom: 14px; display: inline-block; max-width: 100%; }
table.sortable th button { all: unset; cursor: pointer; }
table.sortable th[aria-sort=ascending] button::after { content: " \\25B2"; }
table.sortable th[aria-sort=descending] button::after { content: " \\25BC"; }
table.sortable tbody tr:hover { background: #f0f4fb; }
.note { color: var(--soft); font-size: 13.5px; margin: 6px 0 10px; max-width: 1100px; }
.none { color: var(--soft); }
ul.files { font-size: 14px; }
"""

# Sorting: numbers by data-value (NaN last), text as text; ties keep the page's order. Then the fragment.
SCRIPT = """
function sortTable(table, key, dir) {
  var th = table && table.querySelector('th[data-key="' + key + '"]');
  if (!th) return;
  var col = th.cellIndex, num = th.dataset.type === 'num', body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  rows.forEach(function (r, i) { if (r.dataset.order === undefined) r.dataset.order = i; });
  rows.sort(function (a, b) {
    var x = a.cells[col].dataset.value, y = b.cells[col].dataset.value, c;
    if (num) { x = parseFloat(x); y = parseFloat(y);
      c = isNaN(x) ? (isNaN(y) ? 0 : 1) : isNaN(y) ? -1 : (dir === 'desc' ? y - x : x - y); }
    else c = (dir === 'desc' ? -1 : 1) * x.localeCompare(y);
    return c || a.dataset.order - b.dataset.order;
  });
  rows.forEach(function (r) { body.appendChild(r); });
  table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('aria-sort'); });
  th.setAttribute('aria-sort', dir === 'desc' ? 'descending' : 'ascending');
}
document.querySelectorAll('table.sortable th').forEach(function (th) {
  th.addEventListener('click', function () {
    var again = th.getAttribute('aria-sort');
    var dir = again ? (again === 'descending' ? 'asc' : 'desc') : (th.dataset.type === 'num' ? 'desc' : 'asc');
    sortTable(th.closest('table'), th.dataset.key, dir);
  });
});
function fromFragment() {
  location.hash.slice(1).split('&').forEach(function (part) {
    var m = /^sort=(.+)-(asc|desc)$/.exec(part);
    if (m) sortTable(document.getElementById('atlas-units'), m[1], m[2]);
  });
}
window.addEventListener('hashchange', fromFragment);
fromFragment();
window.addEventListener('load', function () {
  if (location.hash.indexOf('selftest') < 0) return;
  document.querySelectorAll('img').forEach(function (img) { img.dataset.naturalWidth = img.naturalWidth; });
});
"""
