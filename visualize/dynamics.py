"""Learning dynamics in numbers: each stage at each snapshot of training (snapshots.py), as curves
(plot_learning_dynamics.py). Conventions, each a choice the papers leave open (written down so an
independent implementation can be held against this one):

    representation  a stage's output (after its last ReLU) for an image, flattened to one vector of
                    C * H * W numbers (channel-major, as torch's flatten), on the first `images` test
                    images (IMAGES: 1,000 by default), normalised as the network sees them, in eval mode.
    linear CKA      (Kornblith et al. 2019) between the representations X (n, p) and Y (n, q) of the
                    same n images: with each column centred (its mean over the n images subtracted),
                        CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F),
                    computed in its Gram form <K, L>_F / (||K||_F ||L||_F), K = X X^T and L = Y Y^T of the
                    centred features (the same number; float32 products accumulated in float64). 1 for
                    representations equal up to an orthogonal map and an isotropic scale; NaN where either
                    is constant over the images (a silent stage).
    convergence     each stage's CKA between the snapshot and the last snapshot; the stage has converged
                    from the first snapshot epoch from which its CKA is at or above THRESHOLD (0.9) at that
                    snapshot and at every later one (the last is 1, so every stage converges by the last).
    linear probe    (Alain & Bengio 2016) multinomial logistic regression on the stage's globally
                    averaged channels (C numbers an image: each channel's mean over its map), fitted on the
                    first `probe_images` training images (PROBE_IMAGES: 5,000) of the run's data, without
                    augmentation; each feature standardised by the fitting images' mean and standard
                    deviation (with n - 1; a constant feature: divided by 1); loss = mean cross-entropy +
                    PROBE_L2 / 2 * ||W||_F^2 (the bias not penalised), minimised from zero by L-BFGS (strong
                    Wolfe line search) in float64 until the gradient's largest entry is below 1e-6 or
                    after PROBE_STEPS iterations (convex: one minimum). Scored on the whole test split
                    (a quick run: its first `split` images): the fraction whose argmax is the label.
    selectivity     the stage's mean over its channels of units.class_selectivity (the atlas's) over the
                    whole test split (a quick run: its first `split`); a silent channel counts as 0.
    evidence        for Grad-CAM at conv4_x and the plain gradient (visualize.attribution's defaults; the
                    trust table's rows "Grad-CAM conv4_x" and "saliency"), on the first `count` test images
                    (COUNT: 64), each explaining the class the snapshot predicts: the trust table's class
                    test (Spearman rho between the map of that class and of a random other class, seed
                    --seed; trust.per_image_similarity) and ROAD gap (LeRF - MoRF, the fraction of ROAD's
                    levels still classified as the target; trust.road_per_image, imputation noise 0.01,
                    seed --seed), each a mean over the images with its standard error (trust.summary).
"""
import math
from pathlib import Path

import torch
from tqdm import tqdm

from cifar10 import CIFAR10_FOLDER, dataset_root, load_cifar10
from data import normalize
from model import STAGES, fold_batchnorm
from visualize import cli, trust
from visualize.context import file_key, memo, test_split_scores
from visualize.drawing import new_figure, save, save_json, wrap_title
from visualize.scoring import default_batch_size, score_units, stage_outputs
from visualize.units import class_selectivity

IMAGES = 1000  # test images the CKA is measured on (--images)
THRESHOLD = 0.9  # CKA to the last snapshot from which a stage counts as converged (--threshold)
PROBE_IMAGES = 5000  # training images the probes are fitted on (--probe-images)
PROBE_L2 = 1e-3  # the probe's L2 penalty on its weights
PROBE_STEPS = 500  # L-BFGS iterations at most
COUNT = 64  # test images the evidence columns are measured on (--count)
# a --quick run's: a first look, its estimates over fewer images (the probes' fit most of the time)
QUICK_IMAGES, QUICK_PROBE_IMAGES, QUICK_COUNT = 250, 1000, 16
EVIDENCE = (("Grad-CAM conv4_x", "Grad-CAM at conv4_x"), ("saliency", "the plain gradient"))  # trust's row names


# --------------------------------------------------------------------------- linear CKA

def centred_gram(features):
    """K = X X^T (n, n) float64 of the features (n, ...) flattened to (n, p), each column centred first;
    float32 products over blocks of columns, summed in float64."""
    x = features.flatten(1)
    x = x - x.mean(0, dtype=torch.float64).to(x.dtype)
    gram = torch.zeros(len(x), len(x), dtype=torch.float64)
    for first in range(0, x.shape[1], 8192):
        block = x[:, first:first + 8192]
        gram += (block @ block.T).double()
    return gram


def cka_of_grams(k, l):
    """Linear CKA from two centred Gram matrices: <K, L>_F / (||K||_F ||L||_F); NaN where either is 0."""
    norms = k.norm() * l.norm()
    return (k * l).sum().item() / norms.item() if norms > 0 else math.nan


def linear_cka(x, y):
    """Linear CKA (the module's docstring) between two representations of the same n images, (n, ...) each."""
    return cka_of_grams(centred_gram(x), centred_gram(y))


def stage_grams(model, images, layers=STAGES):
    """{stage: centred_gram of its flattened outputs} on the uint8 images, one pass in eval mode."""
    device = next(model.parameters()).device
    rows = default_batch_size(device)
    outputs = {layer: [] for layer in layers}
    last = max(layers, key=STAGES.index)
    with torch.inference_mode():
        for start in range(0, len(images), rows):
            for name, out in stage_outputs(model, normalize(images[start:start + rows].to(device)), last):
                if name in outputs:
                    outputs[name].append(out.flatten(1).float().cpu())
    return {layer: centred_gram(torch.cat(parts)) for layer, parts in outputs.items()}


def converged_epoch(epochs, values, threshold=THRESHOLD):
    """The first of `epochs` from which every value is at or above `threshold` (NaN counts as below);
    None where even the last is below."""
    first = None
    for epoch, value in zip(epochs, values):
        if value >= threshold:  # False for NaN
            first = epoch if first is None else first
        else:
            first = None
    return first


# --------------------------------------------------------------------------- the linear probe

def fit_probe(features, labels, classes, l2=PROBE_L2, steps=PROBE_STEPS):
    """The probe of the module's docstring fitted on features (n, C) and labels (n,): a function
    features (m, C) -> predicted classes (m,)."""
    x = features.double()
    mean, std = x.mean(0), x.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    x = (x - mean) / std
    y = torch.as_tensor(labels, dtype=torch.long)
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=steps, tolerance_grad=1e-6, tolerance_change=0,
                                  history_size=20, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = torch.nn.functional.cross_entropy(x @ weight + bias, y) + l2 / 2 * weight.pow(2).sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    weight, bias = weight.detach(), bias.detach()
    return lambda f: (((f.double() - mean) / std) @ weight + bias).argmax(1)


def probe_accuracy(train_features, train_labels, test_features, test_labels, classes):
    """The probe's test accuracy, fitted on the training features (fit_probe)."""
    predict = fit_probe(train_features, train_labels, classes)
    return (predict(test_features) == torch.as_tensor(test_labels)).double().mean().item()


def training_split(run):
    """run's training split (uint8 images, labels as a tensor), without augmentation, read once a process."""
    root = dataset_root(run.data_dir, run.synthetic)
    images, labels, _ = memo(("train split", file_key(Path(root) / CIFAR10_FOLDER / "data_batch_1")),
                             lambda: load_cifar10(root, train=True))
    return images, torch.as_tensor(labels)


# --------------------------------------------------------------------------- one snapshot's numbers

def evidence_numbers(run, count=COUNT, seed=0):
    """{row name: {"class": (mean, SE), "ROAD gap": (mean, SE)}} of the EVIDENCE maps on run's first
    `count` test images, for the classes its network predicts (the module's docstring)."""
    model, images = fold_batchnorm(run.model), run.images[:count]  # every pass as the trust table's
    device = run.device
    targets = trust.predicted_or_true(run, list(range(count)), "predicted")
    names = [name for name, _ in EVIDENCE]
    maps = trust.draw_class_maps(model, images, targets.to(device), names)
    others = trust.random_other_classes(targets, model.fc.out_features, seed)
    other = trust.draw_class_maps(model, images, others.to(device), names)
    numbers = {}
    for name in names:
        road = trust.road_per_image(model, images, targets.to(device), maps[name], seed)
        numbers[name] = {"class": trust.summary(trust.per_image_similarity(maps[name], other[name])),
                         "ROAD gap": trust.summary(road["ROAD LeRF"] - road["ROAD MoRF"])}
    return numbers


def snapshot_numbers(run, last_grams, images=IMAGES, probe_images=PROBE_IMAGES, count=COUNT, seed=0, grams=None,
                     split=None):
    """One snapshot's numbers: {"cka": {stage: CKA to the last}, "probe": {stage: accuracy}, "selectivity":
    {stage: mean}, "evidence": evidence_numbers}. last_grams: stage_grams of the last snapshot; grams:
    this snapshot's, if computed already; split: the probes' test accuracy and the selectivity over the
    first `split` test images (a quick run's), not the whole split."""
    grams = grams or stage_grams(run.model, run.images[:images])
    scores = test_split_scores(run, STAGES, split)
    train_x, train_y = (part[:probe_images] for part in training_split(run))
    train_scores = score_units(run.model, train_x, STAGES)
    labels = torch.as_tensor(run.labels)[:len(scores[STAGES[0]].mean)]
    classes = run.model.fc.out_features
    return dict(cka={layer: cka_of_grams(grams[layer], last_grams[layer]) for layer in STAGES},
                probe={layer: probe_accuracy(train_scores[layer].mean, train_y, scores[layer].mean, labels, classes)
                       for layer in STAGES},
                selectivity={layer: class_selectivity(scores[layer].mean, labels)[0].mean().item() for layer in STAGES},
                evidence=evidence_numbers(run, count, seed))


def learning_dynamics(snapshot_runs, images=IMAGES, probe_images=PROBE_IMAGES, count=COUNT, seed=0, split=None):
    """[(epoch, PlotRun, snapshot_numbers)] of every snapshot, by epoch; split: as snapshot_numbers'."""
    last_grams = stage_grams(snapshot_runs[-1][1].model, snapshot_runs[-1][1].images[:images])
    out = []
    for epoch, run in tqdm(snapshot_runs, desc="snapshots", unit="snapshot", leave=False, dynamic_ncols=True):
        grams = last_grams if run is snapshot_runs[-1][1] else None
        out.append((epoch, run, snapshot_numbers(run, last_grams, images, probe_images, count, seed, grams, split)))
    return out


# --------------------------------------------------------------------------- the figure, the table, the JSON

def convergence_table(epochs, dynamics, threshold=THRESHOLD):
    """The printed table: a row per stage, its CKA to the last snapshot at each epoch and its convergence epoch."""
    lines = [f"{'CKA to the last':>16}" + "".join(f"{f'epoch {e}':>10}" for e in epochs) + f"{'converged':>11}"]
    for layer in STAGES:
        values = [numbers["cka"][layer] for _, _, numbers in dynamics]
        first = converged_epoch(epochs, values, threshold)
        lines.append(f"{layer:>16}" + "".join(f"{v:>10.3f}" for v in values) + f"{first if first is not None else '-':>11}")
    return "\n".join(lines)


def plot_learning_dynamics(dynamics, figures_dir, images=IMAGES, probe_images=PROBE_IMAGES, count=COUNT, seed=0,
                           threshold=THRESHOLD, record=None, suffix="", split=None):
    """figures_dir/dynamics<suffix>.png and .json of learning_dynamics' numbers; prints the convergence
    table; returns both paths. record: added to the JSON (the figure's metadata); split: as
    learning_dynamics' (the first `split` test images scored the probes and the selectivity)."""
    epochs = [epoch for epoch, _, _ in dynamics]
    last_run = dynamics[-1][1]
    split = len(last_run.images) if split is None else min(split, len(last_run.images))
    scored = "the test split" if split == len(last_run.images) else f"the first {split} test images"
    accuracy = [run.checkpoint.get("test_acc") for _, run, _ in dynamics]
    print(f"{last_run.caption}\n" + convergence_table(epochs, dynamics, threshold))
    fig = new_figure(13, 8.2)
    axes = fig.subplots(2, 3, gridspec_kw=dict(wspace=0.28, hspace=0.42)).ravel()
    colours = dict(zip(STAGES, ("#9e9ac8", "#6baed6", "#41ab5d", "#fd8d3c", "#d7301f")))
    converged = {}
    for layer in STAGES:
        cka = [numbers["cka"][layer] for _, _, numbers in dynamics]
        converged[layer] = converged_epoch(epochs, cka, threshold)
        label = f"{layer} (from epoch {converged[layer]})" if converged[layer] is not None else layer
        axes[0].plot(epochs, cka, "o-", color=colours[layer], label=label, ms=3)
        axes[1].plot(epochs, [numbers["probe"][layer] for _, _, numbers in dynamics], "o-", color=colours[layer],
                     label=layer, ms=3)
        axes[2].plot(epochs, [numbers["selectivity"][layer] for _, _, numbers in dynamics], "o-",
                     color=colours[layer], label=layer, ms=3)
    axes[0].axhline(threshold, color="grey", lw=0.8, ls="--")
    axes[0].set(title=f"convergence: linear CKA to the last snapshot\n(first {images} test images; dashed: "
                      f"{threshold:g})", ylabel="CKA")
    axes[1].plot(epochs, accuracy, "k--", lw=1, label="the network")
    axes[1].axhline(1 / last_run.model.fc.out_features, color="grey", lw=0.8, ls=":")
    axes[1].set(title=f"linear probe on each stage's averaged channels\n(fitted on {probe_images} training "
                      f"images; dotted: chance)\ntest accuracy on {scored}", ylabel="test accuracy")
    axes[2].set(title=f"mean class selectivity of the stage's channels\n(Morcos et al. 2018, the atlas's)\n"
                      f"over {scored}",
                ylabel="selectivity")
    methods = {"Grad-CAM conv4_x": "#d7301f", "saliency": "#2171b5"}
    for column, ax, what in ((("class", axes[3], "rho to a random other class's map (lower: class-specific)")),
                             ("ROAD gap", axes[4], "ROAD gap LeRF - MoRF (higher: more faithful)")):
        for name, title in EVIDENCE:
            means, errors = zip(*(numbers["evidence"][name][column] for _, _, numbers in dynamics))
            ax.errorbar(epochs, means, yerr=[0 if math.isnan(e) else 2 * e for e in errors], fmt="o-", ms=3,
                        capsize=2, color=methods[name], label=title)
        ax.set(title=f"{what}\n(first {count} test images, predicted class; bars: 2 SE)", ylabel=column)
    axes[3].axhline(trust.PASS_BELOW, color="grey", lw=0.8, ls="--")
    axes[4].axhline(0, color="grey", lw=0.8, ls=":")
    axes[5].plot(epochs, accuracy, "ko-", ms=3)
    axes[5].set(title="the network's test accuracy (whole test split)", ylabel="test accuracy")
    for ax in axes:
        ax.title.set_fontsize(8)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if epochs[-1] > 10:
            ax.set_xscale("symlog", linthresh=1)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    quick = " (the quick run: fewer images, a first look)" if cli.is_quick((record or {}).get("figure")) else ""
    title = wrap_title(f"learning dynamics, each stage at each snapshot ({', '.join(map(str, epochs))}){quick}: "
                       f"{last_run.caption}")
    fig.suptitle(title, fontsize=9)
    # the panels start below the title's lines (a real dataset's caption names its classes) and the
    # panels' own three-line titles
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.07, top=0.9 - 0.022 * (title.count("\n") + 1))
    figures_dir = Path(figures_dir)
    png = save(fig, figures_dir / f"dynamics{suffix}.png")
    content = {**(record or {}), "epochs": epochs, "iterations": [run.checkpoint["iteration"] for _, run, _ in dynamics],
               "test_acc": accuracy, "images": images, "threshold": threshold, "probe_images": probe_images,
               "probe_l2": PROBE_L2, "count": count, "seed": seed, "split_images": split,
               "stages": {layer: {"cka": [numbers["cka"][layer] for _, _, numbers in dynamics],
                                  "converged_epoch": converged[layer],
                                  "probe_accuracy": [numbers["probe"][layer] for _, _, numbers in dynamics],
                                  "selectivity": [numbers["selectivity"][layer] for _, _, numbers in dynamics]}
                          for layer in STAGES},
               "evidence": {name: {key: [numbers["evidence"][name][column][i] for _, _, numbers in dynamics]
                                   for column in ("class", "ROAD gap") for i, key in ((0, column), (1, f"{column} SE"))}
                            for name, _ in EVIDENCE}}
    return [png, save_json(figures_dir / f"dynamics{suffix}.json", content)]
