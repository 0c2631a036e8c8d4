"""How far each picture can be trusted, on both axes, in one table (plot_trust.py): the unit pictures of
the sanity checks and the class-evidence maps of visualize.attribution, a row each, beside two maps
that know nothing of the network (faithfulness.random_map, faithfulness.edge_map).

Columns, each measured the same way for every row it applies to, each a mean over images beside its
standard error (the sample standard deviation over the images / sqrt(their number)):

    weights: top, all   Adebayo et al. 2018's cascading randomisation: Spearman rho (sanity.spearman, over
                        the 32x32 pixels of faithfulness.relevance) between the map the trained network
                        draws and the one it draws with conv5_x re-initialised (top), and with every
                        stage re-initialised (all). The cascade re-initialises the stages one by one from
                        the top (sanity.reinitialised, one fresh network of the seed for every depth, the
                        fc kept); the JSON holds every depth. On the test images --images (the report's
                        4531-4546): the unit pictures are the sanity checks of conv5_x channel 1 on them
                        (sanity.unit_sanity_checks, memoized), the class maps start from the maps
                        plot_class_evidence.py draws of them (context.class_maps, memoized), so
                        plot_all.py computes each once. The mean is over the images where rho is defined.
    class               Sixt et al. 2020's random-logit test: rho between the map for the target class
                        and the map for a random other class (seeded), on the same images. Unit
                        pictures are not about a class: n/a.
    deletion, insertion faithfulness.perturbation_curves: the AUC of each of the first --count test
                        images (COUNT, a few hundred: fewer cannot tell the maps from the baselines).
    ROAD MoRF, LeRF     faithfulness.road on the same images: each image's fraction of the levels
                        10 %..90 % at which it is still classified as the target.
The baselines are computed like any other row: a seeded random map and the Sobel edge map depend on
neither the weights nor the class (rho 1 by construction, and measured), so their faithfulness is what
a map scores that knows nothing of the network.

Each row's verdicts are "pass", "fail" or "unresolved": a test is decided only where its number is
further than Z = 2 standard errors (about 95 %) from the line it is held against, and unresolved
where it is not.
    weights   rho below PASS_BELOW at both depths, fail where either depth is above it. rho is 0 where
              the redrawn map became constant (it kept none of the trained map's ranking), and the
              image is left out where the trained map is constant (a silent unit: nothing to keep)
    class     the same, for the class column
    faithful  the ROAD gap LeRF - MoRF wider than both baselines': per image, the row's gap minus the
              baseline's (the same images, so the difference is paired), its mean more than Z standard
              errors above 0 for both; fail where it is Z standard errors or more below 0 for either
A picture measured on one start only (the feature visualization starts from the mean colour once) has
no spread to measure: its weights test is decided on its value. Faithfulness on one image (--count 1)
is unresolved. ROAD decides faithfulness, not deletion: removing
scattered pixels into the mean colour takes an image out of the data the network knows, so a random
map can "delete" best (it does on the gallery's network), the bias ROAD's imputation was made to
remove; deletion and insertion are shown beside it.
"""
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from data import normalize
from model import STAGES, fold_batchnorm
from visualize import cli, faithfulness, sanity
from visualize.attribution import attribute
from visualize.context import class_maps
from visualize.drawing import format_indices, save_json, save_text_table, wrap_title

# The class maps of the table: (row name, attribute's method, its stage); attribute's default options
CLASS_MAPS = (("Grad-CAM conv4_x", "gradcam", "conv4_x"), ("Grad-CAM conv3_x", "gradcam", "conv3_x"),
              ("saliency", "saliency", None), ("SmoothGrad", "smoothgrad", None),
              ("integrated gradients", "integrated_gradients", None), ("occlusion", "occlusion", None))
CLASS_MAP_NAMES = tuple(name for name, _, _ in CLASS_MAPS)
BASELINES = ("random map", "Sobel edge map")
UNIT = {"layer": "conv5_x", "channel": 1}  # plot_sanity_checks.py's defaults
UNIT_IMAGES = cli.parse_indices(sanity.IMAGES)  # and its test images (plot_trust.py --images)
TOP = STAGES[-1]  # the stage re-initialised first
DEPTHS = sanity.cascade_depths(TOP)  # the cascade: conv5_x, then each stage below it, down to conv1
COUNT = 256  # the first test images the faithfulness columns are measured on (plot_trust.py --count)
QUICK_COUNT = 16  # a --quick run's: a first look, most verdicts unresolved
TARGETS = ("predicted", "true")
PASS_BELOW = 0.5  # rho under which a map is taken to have changed (weights, class)
Z = 2  # standard errors a number must be from its line for a verdict (about 95 %)
DEPENDENCE = ("weights: top", "weights: all", "class")
FAITHFULNESS = ("deletion AUC", "insertion AUC", "ROAD MoRF", "ROAD LeRF")
COLUMNS = DEPENDENCE + FAITHFULNESS
VERDICTS = ("pass", "fail", "unresolved")


def summary(per_image):
    """(mean, standard error) of the defined (not NaN) entries of a float64 tensor: the mean NaN where
    none is, the standard error (sample standard deviation / sqrt(n)) NaN where fewer than two are."""
    defined = per_image[~per_image.isnan()]
    if len(defined) == 0:
        return math.nan, math.nan
    if len(defined) == 1:
        return defined.item(), math.nan
    return defined.mean().item(), (defined.std() / math.sqrt(len(defined))).item()


# What the table's time is spent on (trust_table's times; plot_trust.py prints them as PART_LINE reads
# them, and bench_figures.py reports them)
PART_LINE = r"^trust table part (.+): ([\d.]+) s$"
PARTS = ("unit rows", "trained class maps", "class-map cascade and class test", "faithfulness maps",
         "deletion/insertion", "ROAD")


@contextmanager
def timed(times, part):
    """Add the wall seconds of the block to times[part] (nothing where times is None)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        if times is not None:
            times[part] = times.get(part, 0.0) + time.perf_counter() - started


def part_lines(times):
    """The seconds of each of PARTS as plot_trust.py prints them, a line a part (PART_LINE)."""
    return "\n".join(f"trust table part {part}: {times.get(part, 0.0):.1f} s" for part in PARTS)


@dataclass
class TrustRow:
    kind: str                                      # "unit picture", "class map" or "baseline"
    per_image: dict = field(default_factory=dict)  # {column: float64 (n,)}; a column left out is n/a
    cascade: list = field(default_factory=list)    # mean rho at each depth of DEPTHS (not the baselines)
    passes: dict = field(default_factory=dict)     # {"weights" | "class" | "faithful": one of VERDICTS}

    def summaries(self):
        """{column: (the mean over the images, its standard error)}."""
        return {column: summary(v) for column, v in self.per_image.items()}


def per_image_similarity(trained, redrawn):
    """sanity.similarities of the relevance of each image's trained and redrawn maps: its Spearman rho,
    (N,) float64; NaN where the trained map is constant (left out), 0 where only the redrawn one is."""
    pick = lambda m: faithfulness.relevance(m.cpu())[:, None]  # (N, 1, H, W) >= 0, as sanity.similarities reads
    return sanity.similarities(pick(redrawn), pick(trained))


def draw_class_maps(network, images, targets, names=CLASS_MAP_NAMES):
    """{row name: maps on the CPU} of the class maps `names` for the images and targets, drawn by
    `network` (the table's have their BatchNorms folded, fold_batchnorm: the same maps up to rounding,
    for less)."""
    chosen = [entry for entry in CLASS_MAPS if entry[0] in names]
    return {name: attribute(network, images, targets, method, **({"layer": layer} if layer else {})).cpu()
            for name, method, layer in chosen}


def random_other_classes(targets, classes, seed):
    """For each target a class drawn uniformly from the other classes - 1, by a generator seeded with `seed`."""
    shift = torch.randint(1, classes, (len(targets),), generator=torch.Generator().manual_seed(seed))
    return (targets.cpu() + shift) % classes


def class_map_dependence(model, images, targets, seed=0, names=CLASS_MAP_NAMES, trained=None):
    """({row name: {"weights: top", "weights: all", "class": per-image rho (N,)}}, {row name: the mean rho
    at each depth of DEPTHS}) of the class maps `names` and the two baselines on the uint8 images and
    their targets (N,). trained: the trained network's maps {row name: maps}, if drawn already. Every map
    is drawn with the BatchNorms folded (fold_batchnorm)."""
    device = next(model.parameters()).device
    folded = fold_batchnorm(model)
    trained = trained if trained is not None else draw_class_maps(folded, images, targets, names)
    fresh = sanity.fresh_network(model, seed)
    cascade = {name: [] for name in trained}
    for depth in tqdm(range(1, len(DEPTHS) + 1), desc="class maps, stages re-initialised", unit="depth",
                      leave=False, dynamic_ncols=True):
        network = fold_batchnorm(sanity.reinitialised(model, DEPTHS[:depth], seed, fresh), copy=False)
        redrawn = draw_class_maps(network, images, targets, names)
        for name in trained:
            cascade[name].append(per_image_similarity(trained[name], redrawn[name]))
    others = random_other_classes(targets, model.fc.out_features, seed).to(device)
    other = draw_class_maps(folded, images, others, names)
    per_image = {name: {"weights: top": rhos[0], "weights: all": rhos[-1],
                        "class": per_image_similarity(trained[name], other[name])} for name, rhos in cascade.items()}
    means = {name: [sanity.defined_mean(r) for r in rhos] for name, rhos in cascade.items()}
    for name, base in baseline_maps(images, seed).items():  # drawn again exactly as before: they read
        rho = per_image_similarity(base, base)                # neither the weights nor the class
        per_image[name] = {column: rho for column in DEPENDENCE}
        means[name] = [sanity.defined_mean(rho)] * len(DEPTHS)
    return per_image, means


def baseline_maps(images, seed=0):
    """{baseline name: maps (N, H, W) on the CPU}: the seeded random map and the Sobel edge map of the images."""
    return {BASELINES[0]: faithfulness.random_map(len(images), seed), BASELINES[1]: faithfulness.edge_map(images).cpu()}


def faithfulness_per_image(network, images, targets, maps, seed=0, step=faithfulness.DELETION_STEP,
                           noise=faithfulness.ROAD_NOISE, times=None):
    """{name: {column of FAITHFULNESS: (N,) float64}} of the maps {name: maps} of the same images: each
    image's deletion and insertion AUC (faithfulness.perturbation_curves, their end points once for all
    maps), and its fraction of ROAD's levels still classified as the target, in each order (road_per_image);
    every pass through `network` (the table's has its BatchNorms folded, fold_batchnorm). times: a dict
    the seconds of each part are added to (PARTS)."""
    with timed(times, "deletion/insertion"):
        curves = faithfulness.perturbation_curves(network, images, targets, maps, step=step, seed=seed)
    scores = {name: {"deletion AUC": c["deletion"].auc, "insertion AUC": c["insertion"].auc} for name, c in curves.items()}
    with timed(times, "ROAD"):
        for name, m in tqdm(maps.items(), desc=f"ROAD on {len(images)} images", unit="map", leave=False,
                            dynamic_ncols=True):
            scores[name].update(road_per_image(network, images, targets, m, seed, noise))
    return {name: {column: v.double().cpu() for column, v in row.items()} for name, row in scores.items()}


def road_per_image(model, images, targets, maps, seed=0, noise=faithfulness.ROAD_NOISE):
    """{"ROAD MoRF", "ROAD LeRF": (N,) float64}: each image's fraction of ROAD's levels still classified
    as the target, in each order."""
    return {f"ROAD {order}": faithfulness.road(model, images, targets, maps, order, noise=noise, seed=seed)
            .correct.double().mean(1).cpu() for order in ("MoRF", "LeRF")}


def class_map_faithfulness(model, images, targets, seed=0, step=faithfulness.DELETION_STEP,
                           noise=faithfulness.ROAD_NOISE, names=CLASS_MAP_NAMES, times=None):
    """{row name: {column of FAITHFULNESS: (N,)}} of the class maps `names` and the two baselines on the
    uint8 images and their targets (N,), every pass with the BatchNorms folded (fold_batchnorm). times: as
    faithfulness_per_image's."""
    network = fold_batchnorm(model)
    with timed(times, "faithfulness maps"):
        maps = {**draw_class_maps(network, images, targets, names), **baseline_maps(images, seed)}
    return faithfulness_per_image(network, images, targets, maps, seed, step, noise, times)


def unit_picture_rows(run, unit_images=UNIT_IMAGES, seed=0):
    """{technique: TrustRow} of the unit pictures: the sanity checks of UNIT on the test images `unit_images`."""
    checks = sanity.unit_sanity_checks(run, UNIT["layer"], UNIT["channel"], unit_images, seed)
    return {name: TrustRow("unit picture", {"weights: top": rhos[1], "weights: all": rhos[-1]},
                           cascade=checks.similarity[name][1:])
            for name, rhos in checks.per_start.items()}


def changed(per_image):
    """Has the map changed, rho below PASS_BELOW? One of VERDICTS (see the module's docstring)."""
    mean, error = summary(per_image)
    if math.isnan(mean):  # every trained map constant: nothing to measure
        return "unresolved"
    error = 0.0 if math.isnan(error) else error  # one start: decided on its value
    return "pass" if mean + Z * error < PASS_BELOW else "fail" if mean - Z * error >= PASS_BELOW else "unresolved"


def combined(verdicts):
    """Several tests as one: fail if any fails, else unresolved if any is, else pass."""
    return "fail" if "fail" in verdicts else "unresolved" if "unresolved" in verdicts else "pass"


def above_zero(differences):
    """Is the mean of paired differences above 0? One of VERDICTS: pass Z standard errors above it, fail
    at Z standard errors below it or further (or at it with no spread), unresolved between."""
    mean, error = summary(differences)
    if math.isnan(error):  # one image (--count 1): no spread to hold the difference against
        return "unresolved"
    return "pass" if mean - Z * error > 0 else "fail" if mean + Z * error <= 0 else "unresolved"


def road_gap(row):
    """Each image's ROAD gap LeRF - MoRF of a row: (N,)."""
    return row.per_image["ROAD LeRF"] - row.per_image["ROAD MoRF"]


def verdicts(rows):
    """Each row's passes (the module's docstring), against the baselines' per-image values."""
    for row in rows.values():
        if row.kind == "baseline":
            continue
        row.passes["weights"] = combined([changed(row.per_image["weights: top"]), changed(row.per_image["weights: all"])])
        if "class" in row.per_image:
            row.passes["class"] = changed(row.per_image["class"])
        if "ROAD MoRF" in row.per_image:
            row.passes["faithful"] = combined([above_zero(road_gap(row) - road_gap(rows[name])) for name in BASELINES])
    return rows


def predicted_or_true(run, indices, target):
    """The class each of run's test images `indices` is explained for: its label, or what the network predicts."""
    if target == "true":
        return torch.as_tensor([run.labels[i] for i in indices])
    return faithfulness.predictions(run.model, normalize(run.images[indices].to(run.device))).cpu()


def trust_table(run, count=COUNT, target="predicted", seed=0, step=faithfulness.DELETION_STEP,
                noise=faithfulness.ROAD_NOISE, unit_images=UNIT_IMAGES, times=None):
    """{row name: TrustRow}: the unit pictures and the class maps' dependence on the test images
    `unit_images`, the class maps' and the baselines' faithfulness on the first `count` test images,
    each for the predicted or true class (`target`). times: a dict the wall seconds of each of PARTS
    are added to (what plot_all.py's other scripts computed already, memoized, costs nothing here)."""
    with timed(times, "unit rows"):
        rows = unit_picture_rows(run, unit_images, seed)
    with timed(times, "trained class maps"):
        unit_targets = predicted_or_true(run, unit_images, target)
        trained = {name: class_maps(run, unit_images, unit_targets, method, layer or "conv4_x")
                   for name, method, layer in CLASS_MAPS}
    with timed(times, "class-map cascade and class test"):
        dependence, cascades = class_map_dependence(run.model, run.images[unit_images], unit_targets.to(run.device),
                                                    seed, trained=trained)
    first = list(range(count))
    faithful = class_map_faithfulness(run.model, run.images[first], predicted_or_true(run, first, target).to(run.device),
                                      seed, step, noise, times=times)
    for name in (*CLASS_MAP_NAMES, *BASELINES):
        rows[name] = TrustRow("baseline" if name in BASELINES else "class map", {**dependence[name], **faithful[name]},
                              cascade=[] if name in BASELINES else cascades[name])
    return verdicts(rows)


def default_count(split_size, quick=False):
    """The first test images the faithfulness columns take unless told: COUNT (QUICK_COUNT for a quick
    run), or all of a smaller split."""
    return min(QUICK_COUNT if quick else COUNT, split_size)


def table_suffix(count, target, seed, step, noise, unit_images, split_size, quick=False):
    """The file name's additions for every choice that is not the default ('' for the defaults; a quick
    run's defaults are its own, and it ends in _quick)."""
    default_images = cli.parse_indices(sanity.QUICK_IMAGES) if quick else UNIT_IMAGES
    parts = [(unit_images != default_images, f"images{format_indices(unit_images)}"),
             (count != default_count(split_size, quick), f"count{count}"),
             (target != "predicted", target), (seed != 0, f"seed{seed}"),
             (step != faithfulness.DELETION_STEP, f"step{step:g}"), (noise != faithfulness.ROAD_NOISE, f"noise{noise:g}"),
             (quick, "quick")]
    return "".join(f"_{text}" for chosen, text in parts if chosen)


def cell_text(value, error):
    """A number as the table writes it: 'n/a' where the column does not apply, 'undefined' where no
    image defines it (every trained map constant), else the mean and, where measured, its standard error."""
    if value is None:
        return "n/a"
    if math.isnan(value):
        return "undefined"
    return f"{value:.2f}" + ("" if math.isnan(error) else f" ±{error:.2f}")


# the flags the file names write their way (table_suffix)
TRUST_NAMED = ("--images", "--count", "--target", "--seed", "--step-percent", "--noise", "--quick")


def plot_trust(run, figures_dir, count=None, target="predicted", seed=0, step=faithfulness.DELETION_STEP,
               noise=faithfulness.ROAD_NOISE, unit_images=UNIT_IMAGES, figure=None):
    """plot_trust.py: the table as trust<suffix>.png and .json in figures_dir; prints it; returns both
    paths. count: the faithfulness's test images (None: default_count of the split). With `figure` (a
    cli.figure_record) the JSON holds it, and a quick one is named and titled as such."""
    quick = cli.is_quick(figure)
    count = default_count(len(run.images), quick) if count is None else count
    times = {}
    rows = trust_table(run, count, target, seed, step, noise, unit_images, times)
    print(part_lines(times))
    header = [*COLUMNS, "verdicts"]
    summaries = {name: row.summaries() for name, row in rows.items()}
    cells = [[cell_text(*summaries[name].get(column, (None, None))) for column in COLUMNS]
             + [", ".join(f"{test} {verdict}" for test, verdict in row.passes.items()) or "reference"]
             for name, row in rows.items()]
    print(f"{'':>22}" + "".join(f"{column:>15}" for column in header[:-1]))
    for name, line in zip(rows, cells):
        print(f"{name:>22}" + "".join(f"{text:>15}" for text in line[:-1]) + f"  {line[-1]}")
    title = "\n".join(wrap_title(part) for part in (
        f"trust: unit pictures (sanity checks of {UNIT['layer']} channel {UNIT['channel']}) and class maps ({target} class), "
        f"beside maps that know nothing of the network; each a mean ± its standard error over the images",
        f"weights and class, on test images {format_indices(unit_images)}: Spearman rho to the trained map with {TOP} (top) "
        f"or every stage (all) re-initialised, seed {seed}; class: rho to the map of a random other class; pass below "
        f"{PASS_BELOW}",
        f"faithful, on the first {count} test images: deletion / insertion, mean AUC of the target's probability, {step:g} % "
        f"steps (lower / higher is faithful); ROAD: fraction still the target over 10-90 % removed (MoRF lower, LeRF "
        f"higher), noise {noise:g}; passes where its LeRF - MoRF gap beats both baselines'",
        f"a verdict only where the number is {Z} standard errors from its line, else unresolved"
        + (f"; the quick run: {count} and {len(unit_images)} images, a first look" if quick else ""), run.caption))
    figures_dir = Path(figures_dir)
    suffix = (table_suffix(count, target, seed, step, noise, unit_images, len(run.images), quick)
              + (cli.name_suffix(figure, TRUST_NAMED) if figure else ""))
    png = save_text_table(figures_dir / f"trust{suffix}.png", cells, title, header, list(rows),
                          [row.kind for row in rows.values()])
    record = {"count": count, "target": target, "seed": seed, "step_percent": step, "road_noise": noise,
              "road_levels": list(faithfulness.ROAD_LEVELS), "unit": {**UNIT, "images": unit_images},
              "dependence_images": unit_images, "depths": DEPTHS, "pass_below": PASS_BELOW, "z": Z,
              "rows": {name: {"kind": row.kind,
                              **{key: value for column in COLUMNS if column in summaries[name]
                                 for key, value in zip((column, f"{column} SE"), summaries[name][column])},
                              "passes": row.passes,
                              **({"cascade": list(row.cascade)} if row.cascade else {})}
                       for name, row in rows.items()}}
    json_path = save_json(figures_dir / f"trust{suffix}.json", {"figure": figure, **record} if figure else record,
                          indent=1)
    return [png, json_path]
