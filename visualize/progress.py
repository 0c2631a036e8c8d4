"""The learning progress: the report's four figures (train accuracy and loss, test accuracy and loss
against iterations), drawn by train.py after its epochs and redrawn by plot_learning_progress.py
from a checkpoint's history. The numbers first (progress_curves), then the figures.
"""
from pathlib import Path

import torch

from checkpoint import curve_window, window_means
from cifar10 import SYNTHETIC_NAME
from visualize.drawing import new_figure, save, save_json, wrap_title


def epoch_last_iterations(history):
    """The iterations that ended an epoch: those whose evaluation counts one more epoch than the one before
    (an evaluation at the end of a run stopped mid-epoch does not)."""
    epochs = [0] + history["test_epoch"]
    return {it for it, before, after in zip(history["test_iteration"], epochs, epochs[1:]) if after > before}


def band(x, values, columns=600):
    """(x, low, high) of a long noisy curve in `columns` buckets: each bucket's mean x and min..max.

    Drawing 20k per-batch points costs ~0.4 s a figure; their min..max per pixel column looks the same.
    """
    x, v = torch.tensor(x, dtype=torch.float64), torch.tensor(values, dtype=torch.float64)
    size = max(1, -(-len(v) // columns))
    return ([c.mean().item() for c in x.split(size)], [c.min().item() for c in v.split(size)],
            [c.max().item() for c in v.split(size)])


def progress_curves(history):
    """What the four learning-progress figures draw, as numbers: {figure name: curve}.

    A train curve has `each` (x, y: every iteration counted, faint in the figure), `mean` (x, y:
    window_means over curve_window(n) iterations, at the windows' centres), `window`, `what` (the
    y label) and perhaps `note` (what `each` leaves out). The
    train accuracy leaves out the last batch of every epoch: it is partial where the training set is not a
    multiple of the batch size (50,000 = 390 x 128 + 80 for CIFAR-10), so its accuracy is noisier and drew
    false dips. A test curve has `each` (x, y: one point per evaluation of the whole test set).
    """
    n = len(history["train_loss"])
    window = curve_window(n)
    last = epoch_last_iterations(history)
    keep = [i not in last for i in range(1, n + 1)]
    iterations = list(range(1, n + 1))
    accuracy = [(i, a) for i, a, k in zip(iterations, history["train_acc"], keep) if k]
    return {
        "train_accuracy": dict(each=tuple(map(list, zip(*accuracy))) if accuracy else ([], []),
                               mean=window_means(history["train_acc"], window, keep), window=window,
                               what="train accuracy (per mini-batch)",
                               note="; last batch of each epoch left out" if last else ""),
        "train_loss": dict(each=(iterations, list(history["train_loss"])),
                           mean=window_means(history["train_loss"], window), window=window, what="train loss"),
        "test_accuracy": dict(each=(history["test_iteration"], history["test_acc"]),
                              what="test accuracy (whole test set)"),
        "test_loss": dict(each=(history["test_iteration"], history["test_loss"]), what="test loss (whole test set)"),
    }


PROGRESS_FIGURES = ("train_accuracy", "train_loss", "test_accuracy", "test_loss")  # each NAME.png


def save_progress_figures(history, figures_dir, title, figure=None):
    """The report's four learning-progress figures, against iterations, for a run of any length: a train
    curve is the mean of each window of curve_window(n) iterations over every iteration drawn faint (as a
    min..max band where there are more iterations than pixel columns); the legend names what is drawn.
    With `figure` (plot_learning_progress.py's cli.figure_record) a JSON beside each holds it and what
    the curve is. Returns the paths."""
    paths = []
    for name, curve in progress_curves(history).items():
        fig = new_figure(6, 4, dpi=100)
        ax = fig.add_subplot()
        x, y = curve["each"]
        if "mean" in curve:
            if len(x) > 600:
                bx, low, high = band(x, y)
                ax.fill_between(bx, low, high, color="C0", alpha=0.25, lw=0,
                                label=f"each iteration (min..max of every {-(-len(x) // 600)}){curve.get('note', '')}")
            else:
                ax.plot(x, y, color="C0", alpha=0.35, lw=0.7, label=f"each iteration{curve.get('note', '')}")
            mx, my = curve["mean"]
            ax.plot(mx, my, color="C1", lw=1.5, marker="o" if len(mx) <= 30 else None, ms=3,
                    label=f"mean of each {curve['window']} iterations, at its centre")
            ax.legend(loc="lower right" if name == "train_accuracy" else "upper right", fontsize=8)
        else:
            ax.plot(x, y, lw=1.5, marker="o", ms=3)
        ax.set_xlabel("iteration")
        ax.set_ylabel(curve["what"])
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        fig.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.88)  # room for a two-line title
        paths.append(save(fig, Path(figures_dir) / f"{name}.png", quiet=True))  # train.py draws them as it runs
        if figure is not None:
            paths.append(save_json(Path(figures_dir) / f"{name}.json", {"figure": figure, "curve": name,
                                                                        "what": curve["what"]}))
    return paths


def progress_title(config):
    """The title of the learning-progress figures: the width and the data as cifar10.describe_dataset
    named it when the run started (a checkpoint's config)."""
    name = config.get("data_name") or (SYNTHETIC_NAME if config["synthetic"] else f"the data in {config['data_dir']}")
    return wrap_title(f"width-{config['width']} ResNet-18, {name}")
