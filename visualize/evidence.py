"""The class-evidence figure (plot_class_evidence.py): test images, what the network says each is, and
attribution's maps of the evidence for a target class, one column a method; and the JSON beside it.

Columns: the image, then Grad-CAM at each of the chosen stages and each chosen pixel method, in the
order given. Each map is drawn on its own scale, written under it, so strengths compare between
panels only through those numbers:
    Grad-CAM      over the image: 0.5 * the image in grey + 0.5 * the map through 'jet' from 0 (blue)
                  to its max (red), as the paper draws it; the map upsampled (attribute's default)
    saliency,     sum over colour |r_c| (the magnitude visualize.faithfulness ranks pixels by), through
    SmoothGrad,   'inferno' from 0 (black) to its PERCENTILE-th percentile over the image's pixels
    integrated    (yellow; the few above it saturate), as Smilkov et al. cap theirs: a gradient's largest
    gradients     pixels would otherwise leave the rest black. The sign is dropped: for gradients it is
                  mostly noise to the eye (judged on the Fashion-MNIST network)
    occlusion     signed (one value a pixel already), through the diverging 'RdBu_r' from -max|.| (blue:
                  hiding the pixel raises y_c) through white (0) to +max|.| (red: hiding it lowers y_c)
The JSON holds the maps as attribute returns them (signed, per colour), not as drawn.
"""
from pathlib import Path

import numpy as np
import torch

from data import normalize
from utils import UserError
from visualize import cli
from visualize.attribution import ATTRIBUTION_METHODS, DEFAULT_OPTIONS, GRADCAM_LAYERS, check_options
from visualize.context import class_maps
from visualize.drawing import colour_mapped, format_indices, save_json, save_table, short_number, to_display, wrap_title
from visualize.scoring import classify

PERCENTILE = 99  # the gradient maps' colour scale ends here (Smilkov et al.'s cap): a few pixels saturate
TARGETS = ("predicted", "true")  # --target's words; a class index or name is the third kind
DEFAULT_IMAGES = "4531-4546"  # the report's test images
DEFAULT_LAYERS = ("conv4_x", "conv3_x")  # Grad-CAM's stages, as the issue asks
# the command line's flag of each method option (attribution.DEFAULT_OPTIONS); file names use them too
OPTION_FLAGS = {"n": "--samples", "sigma": "--sigma", "seed": "--seed", "m": "--steps", "k": "--window",
                "s": "--stride"}
COLUMN_TITLES = {"gradcam": "Grad-CAM", "saliency": "saliency\ndy_c/dx", "smoothgrad": "SmoothGrad",
                 "integrated_gradients": "integrated\ngradients", "occlusion": "occlusion"}
assert tuple(COLUMN_TITLES) == ATTRIBUTION_METHODS


# --------------------------------------------------------------------------- the flags' values

def parse_methods(text):
    """'gradcam,occlusion' -> ['gradcam', 'occlusion'] (once each, in that order), each a method."""
    methods = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    bad = [name for name in methods if name not in ATTRIBUTION_METHODS] or ([] if methods else [text])
    if bad:
        raise UserError(f"--methods {bad[0]!r} is not an attribution method; choose from "
                        f"{', '.join(ATTRIBUTION_METHODS)} (comma-separated)")
    return methods


def parse_gradcam_layers(text):
    """'conv4_x,conv3_x' -> ['conv4_x', 'conv3_x'], each a stage Grad-CAM may be drawn at."""
    layers = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip())) or [text]
    for layer in layers:
        try:
            check_options("gradcam", {}, layer, names={"layer": "--layer"})
        except ValueError as err:
            raise UserError(f"{err} (comma-separated)") from None
    return layers


def parse_target(text, classes):
    """--target: 'predicted' or 'true' as they are, a class index 0..C-1 or a class name -> its index."""
    if text in TARGETS:
        return text
    if text in classes:
        return classes.index(text)
    if text.lstrip("-").isdigit():
        index = int(text)
        if 0 <= index < len(classes):
            return index
        raise UserError(f"--target {index} is out of range: the network has {len(classes)} classes; choose "
                        f"predicted, true, 0..{len(classes) - 1} or a class name")
    raise UserError(f"--target {text!r} is not a class; choose predicted, true, a class index 0..{len(classes) - 1} "
                    f"or one of: {', '.join(classes)}")


def method_options(args):
    """The methods' options {attribute's name: value} from the parsed flags (OPTION_FLAGS), each checked
    by attribution.check_options: a bad one is one line naming its flag."""
    options = {name: getattr(args, flag[2:]) for name, flag in OPTION_FLAGS.items()}
    for method in ATTRIBUTION_METHODS:
        try:
            check_options(method, {k: v for k, v in options.items() if k in DEFAULT_OPTIONS[method]},
                          GRADCAM_LAYERS[0], names=OPTION_FLAGS)
        except ValueError as err:
            raise UserError(str(err)) from None
    return options


# --------------------------------------------------------------------------- the numbers

def evidence_columns(methods, layers):
    """The maps' columns, in order: ('gradcam', layer) for each layer where Grad-CAM is chosen, else (method, None)."""
    return [(method, layer) for method in methods for layer in (layers if method == "gradcam" else [None])]


def column_key(method, layer):
    return f"{method}_{layer}" if layer else method


def class_evidence(run, indices, targets, columns, options):
    """{column key: maps (N, 32, 32) or (N, 3, 32, 32) on the CPU, float32} for run's test images
    `indices`, the logits of `targets` (N,) and each method's `options` (those it takes, of all given);
    context.class_maps's, so plot_trust.py reuses them."""
    maps = {}
    for method, layer in columns:
        taken = {k: v for k, v in options.items() if k in DEFAULT_OPTIONS[method]}
        maps[column_key(method, layer)] = class_maps(run, indices, targets, method, layer or "conv4_x", **taken)
    return maps


def magnitude_map(r):
    """sum over colour |r_c|: a (3, 32, 32) gradient map as its column draws it, (32, 32)."""
    return r.abs().sum(0)


def float32_lists(tensor):
    """A tensor as nested lists of the shortest decimals that read back as the same float32s."""
    array = tensor.detach().float().cpu().numpy()
    return np.array([float(str(v)) for v in array.ravel()], dtype=object).reshape(array.shape).tolist()


def file_stem(indices, target, methods, layers, options):
    """'class_evidence' plus a part for every choice that is not the default."""
    parts = ["class_evidence"]
    if format_indices(indices) != DEFAULT_IMAGES:
        parts.append(f"images{format_indices(indices)}")
    if target != "predicted":
        parts.append(f"target{target}" if isinstance(target, int) else f"target-{target}")
    if methods != list(ATTRIBUTION_METHODS):
        parts.append("methods-" + "+".join(methods))
    if list(layers) != list(DEFAULT_LAYERS) and "gradcam" in methods:
        parts.append("layer-" + "+".join(layers))
    defaults = {k: v for method in ATTRIBUTION_METHODS for k, v in DEFAULT_OPTIONS[method].items()}
    for name, value in options.items():
        if value != defaults[name] and any(name in DEFAULT_OPTIONS[m] for m in methods):
            flag = OPTION_FLAGS[name][2:]
            parts.append(f"{flag}{value:g}" if isinstance(value, float) else f"{flag}{value}")
    return "_".join(parts)


# --------------------------------------------------------------------------- the figure and the JSON

# the flags file_stem writes its way: every one of plot_class_evidence.py's
EVIDENCE_NAMED = ("--images", "--target", "--methods", "--layer", *OPTION_FLAGS.values())


def plot_class_evidence(run, indices, target, methods, layers, options, figures_dir, figure=None):
    """plot_class_evidence.py: the figure and JSON for test images `indices`, the evidence for `target`
    ('predicted', 'true' or a class index) by `methods` (Grad-CAM at each of `layers`), with the
    methods' `options`; figures_dir/<file_stem>.png and .json (holding `figure`, a cli.figure_record,
    where given). Returns both paths."""
    images = run.images[indices]
    labels = torch.as_tensor([run.labels[i] for i in indices])
    with torch.inference_mode():
        probabilities = classify(run.model, normalize(images.to(run.device))).float().softmax(1).cpu()
    predicted = probabilities.argmax(1)
    targets = {"predicted": predicted, "true": labels}[target] if target in TARGETS else torch.full_like(labels, target)
    columns = evidence_columns(methods, layers)
    maps = class_evidence(run, indices, targets, columns, options)

    def name(c):
        return run.classes[c]
    rows = []
    shown = to_display(normalize(images))
    grey = shown.mean(3, keepdims=True).repeat(3, 3)
    for i, index in enumerate(indices):
        p_pred, t = probabilities[i, predicted[i]].item(), targets[i].item()
        caption = f"says {name(predicted[i])} {p_pred:.2f}"
        if t != predicted[i]:
            caption += f"\nmap of {name(t)} {probabilities[i, t]:.2f}"
        row = [(shown[i], caption)]
        for method, layer in columns:
            m = maps[column_key(method, layer)][i]
            if method == "gradcam":  # >= 0
                peak = m.max().item()
                heat = colour_mapped(m.numpy(), "jet", 0, max(peak, 1e-30))
                row.append((0.5 * grey[i] + 0.5 * heat, f"max {short_number(peak)}"))
            elif method == "occlusion":  # signed
                peak = max(m.abs().max().item(), 1e-30)
                row.append((colour_mapped(m.numpy(), "RdBu_r", -peak, peak), f"max|.| {short_number(peak)}"))
            else:
                magnitude = magnitude_map(m)
                cap = max(torch.quantile(magnitude.flatten().double(), PERCENTILE / 100).item(), 1e-30)
                row.append((colour_mapped(magnitude.numpy(), "inferno", 0, cap), f"p{PERCENTILE} {short_number(cap)}"))
        rows.append(row)

    target_text = {"predicted": "the predicted class", "true": "the true class"}.get(target, None) or \
        f"class {target} ({name(target)})"
    column_titles = ["test image"] + [COLUMN_TITLES[method] + (f"\n{layer}" if layer else "")
                                      for method, layer in columns]
    row_titles = [f"{index}\n{name(labels[i])}" for i, index in enumerate(indices)]
    title = "\n".join(wrap_title(part) for part in (
        f"class evidence for {target_text}: which pixels raise its logit y_c (before the softmax); "
        f"left, each test image and its true class, the class the network says and its probability",
        "each map on its own scale, written under it. Grad-CAM: over the image in grey, jet from 0 (blue) to its max "
        f"(red). Saliency, SmoothGrad, integrated gradients: sum over colour |r_c|, inferno from 0 (black) to its "
        f"{PERCENTILE}th percentile (yellow, above it saturated). Occlusion: signed, red where hiding the pixel "
        "lowers y_c, blue where it raises it, white 0",
        options_text(methods, options), run.caption))
    figures_dir = Path(figures_dir)
    stem = file_stem(indices, target, methods, layers, options) + (cli.name_suffix(figure, EVIDENCE_NAMED) if figure else "")
    png = save_table(figures_dir / f"{stem}.png", rows, title, column_titles, row_titles)

    record = {"images": list(indices), "target": target, "methods": [column_key(*c) for c in columns],
              "options": {k: v for k, v in options.items() if any(k in DEFAULT_OPTIONS[m] for m in methods)},
              "per_image": [{"index": index, "true": int(labels[i]), "true_name": name(labels[i]),
                             "predicted": int(predicted[i]), "predicted_name": name(predicted[i]),
                             "probability": float(probabilities[i, predicted[i]]),
                             "target": int(targets[i]), "target_name": name(targets[i]),
                             "target_probability": float(probabilities[i, targets[i]]),
                             "maps": {key: float32_lists(value[i]) for key, value in maps.items()}}
                            for i, index in enumerate(indices)]}
    return [png, save_json(figures_dir / f"{stem}.json", {"figure": figure, **record} if figure else record)]


def options_text(methods, options):
    """The chosen methods' options, for the title."""
    parts = []
    if "smoothgrad" in methods:
        parts.append(f"SmoothGrad n {options['n']}, sigma {options['sigma']:g} of the image's range, "
                     f"seed {options['seed']}")
    if "integrated_gradients" in methods:
        parts.append(f"integrated gradients m {options['m']} steps from the mean colour")
    if "occlusion" in methods:
        parts.append(f"occlusion: mean drop of y_c over the {options['k']}x{options['k']} windows (stride "
                     f"{options['s']}) set to the mean colour that cover a pixel")
    return "; ".join(parts)
