"""Train the report's ResNet-18 on CIFAR-10 and plot its learning progress.

    python train.py                                         # the report's recipe (needs CIFAR-10)
    python train.py --synthetic --iterations 300 --width 16  # offline demo on synthetic data

The recipe (defaults): batch 128, Adam(lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 5e-4),
learning rate halved every 10 epochs, 52 epochs = 20,332 iterations, RandomCrop(32, padding=4) +
RandomHorizontalFlip + Normalize, cross-entropy, the whole test set evaluated after every epoch.

The whole training set lives on the device as one uint8 tensor; each batch is gathered, cropped,
flipped and normalised there with tensor ops (no DataLoader, no PIL). The augmentation of an epoch
is drawn up front from a generator seeded by (seed, epoch), so a run resumed mid-epoch continues
with exactly the batches it would have seen.

Speed settings (--bf16, --channels-last, --compile, --cuda-graph) default to the device's: on CUDA bf16
autocast, channels_last and the training step replayed from a CUDA graph; elsewhere fp32 and NCHW, as
the report trained. Each but the CUDA graph can be turned on for any device.
"""
import argparse
import csv
import math
import os
import signal
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import utils
from model import ResNet, state_shapes

# Settings a checkpoint fixes: on --resume they come from the checkpoint (an explicit, different
# value is an error). The others (--epochs, --iterations, --device, ...) may change on resume.
RECIPE = dict(data_dir="data", synthetic=False, batch_size=128, lr=1e-3, weight_decay=5e-4,
              lr_step_epochs=10, lr_gamma=0.5, width=64, seed=0)
DEFAULT_EPOCHS = 52
LOG_EVERY = 50  # iterations between host syncs (progress bar, NaN check): fewer syncs, faster GPU
# Speed settings a flag left unset takes: key -> (on CUDA, on any other device). A CPU run trains in
# fp32, as the report did; every setting works on a CPU when asked, except the CUDA graph.
SPEED_DEFAULTS = dict(bf16=(True, False), channels_last=(True, False), compile=(False, False),
                      cuda_graph=(True, False))


def parse_args(argv=None):
    p = utils.OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Recipe flags default to None so that --resume can tell "not given" from "given".
    p.add_argument("--data-dir", help=f"folder holding cifar-10-batches-py/ (default: {RECIPE['data_dir']}/)")
    p.add_argument("--synthetic", action="store_true", default=None,
                   help="train on synthetic gratings in the CIFAR-10 format (offline demo; NOT CIFAR-10)")
    p.add_argument("--epochs", type=int, help=f"epochs to train in all (default: {DEFAULT_EPOCHS})")
    p.add_argument("--iterations", type=int, help="stop after this many iterations in all (smoke runs)")
    p.add_argument("--batch-size", type=int, help=f"default: {RECIPE['batch_size']}")
    p.add_argument("--lr", type=float, help=f"Adam learning rate (default: {RECIPE['lr']})")
    p.add_argument("--weight-decay", type=float, help=f"Adam weight decay (default: {RECIPE['weight_decay']})")
    p.add_argument("--lr-step-epochs", type=int, help=f"multiply the lr by --lr-gamma every this many "
                                                      f"epochs (default: {RECIPE['lr_step_epochs']})")
    p.add_argument("--lr-gamma", type=float, help=f"default: {RECIPE['lr_gamma']}")
    p.add_argument("--width", type=int, help=f"channels of conv1; later stages have 2x, 4x, 8x "
                                             f"(default: {RECIPE['width']})")
    p.add_argument("--seed", type=int, help=f"default: {RECIPE['seed']}")
    p.add_argument("--checkpoint", default="checkpoints/resnet18_cifar10.pt",
                   help="checkpoint to write, or to continue with --resume (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run in --checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start a new run over an existing --checkpoint")
    p.add_argument("--figures-dir", help="where the learning-progress PNGs go (default: figures/; with --resume, "
                                         "the resumed run's)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ... (default: auto)")
    # Speed settings: None = the device's default (SPEED_DEFAULTS), resolved in resolve_speed.
    on = argparse.BooleanOptionalAction
    p.add_argument("--bf16", action=on, help="bf16 autocast (default: on for CUDA, off elsewhere: fp32)")
    p.add_argument("--channels-last", action=on,
                   help="channels_last memory layout (default: on for CUDA, off elsewhere: NCHW)")
    p.add_argument("--compile", action=on, help="torch.compile the model (default: off; costs compile time)")
    p.add_argument("--cuda-graph", action=on,
                   help="replay each training step (forward, backward, Adam) from a CUDA graph "
                        "(default: on for CUDA unless --compile; CUDA only)")
    return p.parse_args(argv)


def resolve_config(args, ckpt):
    """Merge the command line with the recipe defaults, or with the checkpoint being resumed."""
    config = dict(ckpt["config"]) if ckpt else {}
    if args.data_dir is not None:  # stored absolute (below), so compared absolute on --resume
        args.data_dir = str(Path(args.data_dir).resolve())
    for key, default in RECIPE.items():
        given = getattr(args, key)
        if ckpt and given is not None and given != config[key]:
            flag = "--" + key.replace("_", "-")
            raise utils.UserError(f"{args.checkpoint} was made with {flag} {config[key]}, not {given}; "
                                  f"drop {flag} to resume it, or train anew with another --checkpoint")
        if not ckpt:
            config[key] = default if given is None else given
    config["epochs"] = args.epochs if args.epochs is not None else config.get("epochs", DEFAULT_EPOCHS)
    config["iterations"] = args.iterations if args.iterations is not None else config.get("iterations")
    for key in ("checkpoint", "device", *SPEED_DEFAULTS):
        config[key] = getattr(args, key)
    # a resumed run keeps its own figures folder unless given another; kept absolute, so a run
    # resumed from another working directory still draws into it
    figures_dir = args.figures_dir if args.figures_dir is not None else config.get("figures_dir", "figures")
    config["figures_dir"] = str(Path(figures_dir).absolute())
    config["data_dir"] = str(Path(config["data_dir"]).resolve())  # plot scripts may run from elsewhere
    for key in ("epochs", "batch_size", "width", "lr_step_epochs"):
        if config[key] < 1:
            raise utils.UserError(f"--{key.replace('_', '-')} must be at least 1, got {config[key]}")
    if config["iterations"] is not None and config["iterations"] < 1:
        raise utils.UserError(f"--iterations must be at least 1, got {config['iterations']}")
    if not (math.isfinite(config["lr"]) and config["lr"] > 0):
        raise utils.UserError(f"--lr must be a finite number above 0, got {config['lr']}; the recipe's is 1e-3")
    if not (math.isfinite(config["weight_decay"]) and config["weight_decay"] >= 0):
        raise utils.UserError(f"--weight-decay must be a finite number, 0 or above (0 turns it off), "
                              f"got {config['weight_decay']}; the recipe's is 5e-4")
    if not 0 < config["lr_gamma"] <= 1:
        raise utils.UserError(f"--lr-gamma must lie in (0, 1] (1 keeps the lr constant), got {config['lr_gamma']}; "
                              f"the recipe's is 0.5")
    return config


def resolve_speed(config, device):
    """Turn the speed flags left unset (None) into the device's defaults, in place: the config then
    records the settings the run really uses."""
    cuda = device.type == "cuda"
    if config["cuda_graph"] and not cuda:
        raise utils.UserError(f"--cuda-graph needs a CUDA device, and this run is on {device}; drop --cuda-graph")
    if config["cuda_graph"] and config["compile"]:
        raise utils.UserError("--cuda-graph and --compile are two ways to cut the launch cost; pick one")
    if config["cuda_graph"] is None and config["compile"]:
        config["cuda_graph"] = False  # asking for torch.compile replaces the default CUDA graph
    for key, (on_cuda, elsewhere) in SPEED_DEFAULTS.items():
        if config[key] is None:
            config[key] = on_cuda if cuda else elsewhere
    return config


def speed_label(config):
    """The speed settings of a run, in words, for the startup line."""
    words = [("bf16 autocast" if config["bf16"] else "fp32"), *(["channels_last"] if config["channels_last"] else []),
             *(["torch.compile"] if config["compile"] else []), *(["CUDA graph"] if config["cuda_graph"] else [])]
    return ", ".join(words)


def training_memory(width, batch_size, num_classes=10):
    """(bytes, parameters, activation floats per image) that training this network needs, estimated
    without allocating it:

        bytes = 16 x parameters           (fp32 weights, gradients, Adam's two moments)
              + 4 x batch x activations   (every layer's output per image, kept for the backward pass)

    Parameters come from model.state_shapes. Every layer's output is a multiple of the width (the
    classifier's excepted), so activations are counted in one-image forward passes at widths 1 and 2
    and extrapolated exactly. Within ~15 % of the peak memory measured on a CPU (widths 16-128,
    batches 64-1024).
    """
    shapes = state_shapes(width, num_classes)
    parameters = sum(math.prod(shapes[name]) for name, _ in ResNet(1, num_classes).named_parameters())
    counts = []
    for small in (1, 2):
        outputs = []
        model = ResNet(small, num_classes).eval()
        for m in model.modules():
            if not list(m.children()):
                m.register_forward_hook(lambda m, i, out: outputs.append(out.numel()))
        with torch.inference_mode():
            model(torch.zeros(1, 3, 32, 32))
        counts.append(sum(outputs))
    activations = counts[0] + (counts[1] - counts[0]) * (width - 1)
    return 16 * parameters + 4 * batch_size * activations, parameters, activations


def check_memory(config, device):
    """UserError, before anything is allocated, if --width and --batch-size need more memory than
    `device` has free (where that is known)."""
    free = utils.available_memory(device)
    if free is None:
        return
    need, parameters, activations = training_memory(config["width"], config["batch_size"])
    if need > free:
        raise utils.UserError(
            f"--width {config['width']} with --batch-size {config['batch_size']} needs about {need / 2**30:.3g} GiB "
            f"on {device} (16 B x {parameters / 1e6:.3g} M parameters + 4 B x batch x {activations / 1e6:.3g} M "
            f"activations an image), but {free / 2**30:.3g} GiB are free; lower --width or --batch-size")


def check_outputs(ckpt_path, figures_dir):
    """UserError, before any work, unless the checkpoint, its history CSV and the figures can all be written."""
    csv_path = ckpt_path.with_suffix(".csv")
    if csv_path.absolute() == ckpt_path.absolute():
        raise utils.UserError(f"--checkpoint {ckpt_path} ends in .csv, where the history CSV goes, so one would "
                              f"overwrite the other; name the checkpoint {ckpt_path.with_suffix('.pt')}")
    figures_dir = Path(figures_dir)
    if figures_dir.absolute() in (ckpt_path.absolute(), csv_path.absolute()):
        raise utils.UserError(f"--figures-dir {figures_dir} is where the checkpoint or its history CSV goes; "
                              f"pass another --figures-dir")
    utils.check_writable(ckpt_path, "--checkpoint")
    utils.check_writable(csv_path, "the history CSV")
    utils.check_writable(figures_dir, "--figures-dir", folder=True)
    for name in PROGRESS_FIGURES:
        utils.check_writable(figures_dir / f"{name}.png", "the figure")


# --------------------------------------------------------------------------- the pipeline (bench.py uses it)

def epoch_plan(num_images, epoch, seed):
    """Shuffle order and augmentation of one epoch, drawn from a generator seeded by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_images, generator=g)
    offsets, flips = data.draw_augmentation(num_images, g)
    return order, offsets, flips


def prepare_batch(images, index, offsets, flips, channels_last=False):
    """Gather uint8 images on their device, crop + flip, normalise: the network's input batch."""
    x = data.normalize(data.random_crop_flip(images[index], offsets, flips))
    # The gather leaves channels-last strides; convolutions on CPU are fastest on the layout asked for.
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def epoch_batches(images, labels, epoch, seed, batch_size, channels_last=False, first=0, last=None):
    """Batches first..last-1 of one epoch as (network input, labels), gathered and augmented on the device."""
    order, offsets, flips = (t.to(images.device) for t in epoch_plan(len(images), epoch, seed))
    last = -(-len(images) // batch_size) if last is None else last
    for step in range(first, last):
        batch = slice(step * batch_size, (step + 1) * batch_size)
        index = order[batch]
        yield prepare_batch(images, index, offsets[batch], flips[batch], channels_last), labels[index]


def autocast(device, bf16):
    # No cast cache: each weight is cast once a step anyway, and a CUDA graph must not keep casts alive.
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False) if bf16 else nullcontext()


def train_step(model, optimizer, x, y, bf16=False):
    """One optimisation step; returns (loss, number correct) as device tensors (no host sync)."""
    with autocast(x.device, bf16):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.argmax(1) == y).sum()


@torch.inference_mode()
def evaluate(model, images, labels, bf16=False, channels_last=False, batch_size=None):
    """(accuracy as a fraction, mean cross-entropy) on a whole uint8 split."""
    if batch_size is None:  # big batches fill a GPU; on a CPU they spill out of the caches
        batch_size = 1000 if images.device.type == "cuda" else 128
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    for start in range(0, len(images), batch_size):
        x = data.normalize(images[start:start + batch_size])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = labels[start:start + batch_size]
        with autocast(images.device, bf16):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    return correct.item() / len(images), loss_sum.item() / len(images)


def make_optimizer(model, config, cuda_graph=False):
    """The recipe's Adam and StepLR. For a CUDA graph, Adam is capturable (its step count lives on the
    device) and its lr is a device tensor, which StepLR updates in place, so a replay sees each decay."""
    lr = config["lr"]
    if cuda_graph:
        lr = torch.tensor(lr, device=next(model.parameters()).device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=config["weight_decay"], capturable=cuda_graph)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config["lr_step_epochs"],
                                                gamma=config["lr_gamma"])
    return optimizer, scheduler


def plain_numbers(obj):
    """obj with every one-element tensor in it (a tensor lr) turned into a float."""
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, dict):
        return {k: plain_numbers(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain_numbers(v) for v in obj)
    return obj


def portable_state(optimizer, scheduler):
    """(Adam's, StepLR's) state dicts as a checkpoint keeps them: plain-float learning rates and
    capturable off, however this run stepped, so that any run, graphed or not, can load them."""
    opt = optimizer.state_dict()
    opt["param_groups"] = [dict(plain_numbers(g), capturable=False) for g in opt["param_groups"]]
    return opt, plain_numbers(scheduler.state_dict())


def load_optimizer_state(optimizer, state):
    """Load a checkpoint's Adam state, keeping how this run steps: capturable or not, and the very lr
    tensor a CUDA graph reads (filled with the checkpoint's lr)."""
    live = [(group["capturable"], group["lr"]) for group in optimizer.param_groups]
    groups = [dict(saved, capturable=capturable) for saved, (capturable, _) in zip(state["param_groups"], live)]
    optimizer.load_state_dict(dict(state, param_groups=groups))  # capturable moves `step` to the device
    for group, (_, lr) in zip(optimizer.param_groups, live):
        if isinstance(lr, torch.Tensor):
            lr.fill_(float(group["lr"]))
            group["lr"] = lr
        else:
            group["lr"] = float(group["lr"])


# --------------------------------------------------------------------------- the training step in a CUDA graph

def training_state(model, optimizer):
    """A copy of everything a training step changes: weights, BatchNorm buffers, Adam's state."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {p: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()})


def restore_training_state(model, optimizer, saved):
    """Copy `saved` back in place (a captured graph holds these very tensors). Adam state created
    since is zeroed: Adam starts from zeros, so that equals no state at all."""
    weights, adam = saved
    for k, v in model.state_dict().items():
        v.copy_(weights[k])
    for p, s in optimizer.state.items():
        for k, v in s.items():
            v.copy_(adam[p][k]) if p in adam else v.zero_()


class GraphedStep:
    """train_step(model, optimizer, x, y, bf16), replayed from a CUDA graph: one graph launch a step
    instead of hundreds of kernel launches, whose CPU cost is expected to bound a ResNet-18 step at
    batch 128 on a fast GPU. (Not yet run on a GPU: no GPU was lent where this was written.)

    A graph has fixed shapes and addresses, so there is one graph per batch size (an epoch's partial
    last batch gets its own), each with static input and label buffers that a call copies the batch
    into. The first call of a size captures it: a few eager warm-up steps on a side stream (Adam's
    state, cuDNN's choices), then the capture, then every weight, BatchNorm buffer and Adam state is
    put back as it was, so the warm-up leaves no trace, and the graph's first replay is this call's
    step. That replay is checked against the first warm-up step, an eager step from the same state on
    the same batch: a graph that updates the weights differently stops the run.

    The optimizer must come from make_optimizer(..., cuda_graph=True) (capturable Adam, tensor lr).
    Returns (loss, number correct) like train_step; they are the graph's output buffers, overwritten by
    the next call. On a CPU (tests) the same object runs the step eagerly on its static buffers where
    CUDA would replay the graph, so everything but the capture itself is exercised there.
    """

    WARMUP = 3
    # |graph update - eager update| / |eager update| allowed: a graph that skips or repeats the update,
    # or reads a stale lr or input, is off by ~1 or more; rounding by far less
    TOLERANCE = 0.1

    def __init__(self, model, optimizer, bf16=False):
        self.model, self.optimizer, self.bf16 = model, optimizer, bf16
        self.graphs = {}  # batch size -> (static input, static labels, replay)

    def __call__(self, x, y):
        if len(y) not in self.graphs:
            return self.capture(x, y)
        static_x, static_y, replay = self.graphs[len(y)]
        static_x.copy_(x)
        static_y.copy_(y)
        return replay()

    def capture(self, x, y):
        static_x, static_y = x.clone(), y.clone()  # clone keeps x's memory format

        def step():
            return train_step(self.model, self.optimizer, static_x, static_y, self.bf16)

        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        saved = training_state(self.model, self.optimizer)
        cuda = x.device.type == "cuda"
        side = torch.cuda.Stream(x.device) if cuda else None
        if cuda:
            side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side) if cuda else nullcontext():
            for i in range(self.WARMUP):
                step()
                if i == 0:
                    eager = [p.detach().clone() for p in params]
        if cuda:
            torch.cuda.current_stream(x.device).wait_stream(side)
            self.optimizer.zero_grad(set_to_none=True)  # backward then allocates .grad from the graph's pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = step()

            def replay():
                graph.replay()
                return outputs
        else:
            replay = step
        restore_training_state(self.model, self.optimizer, saved)
        self.graphs[len(y)] = static_x, static_y, replay
        result = replay()  # this call's step

        before = saved[0]
        names = {p: n for n, p in self.model.named_parameters()}
        update = sum(((e - before[names[p]]) ** 2).sum() for p, e in zip(params, eager)).sqrt()
        error = sum(((p.detach() - e) ** 2).sum() for p, e in zip(params, eager)).sqrt()
        if error > self.TOLERANCE * update:  # one host sync per graph, once a run
            raise utils.UserError(f"the CUDA-graph step for batch size {len(y)} updates the weights unlike "
                                  f"the eager step (relative difference {(error / update).item():.3g}); "
                                  f"train with --no-cuda-graph")
        return result


# --------------------------------------------------------------------------- history: CSV and figures

def new_history():
    # Per-iteration train_loss and train_acc (index i = iteration i + 1); test_* once per evaluation.
    return {key: [] for key in utils.HISTORY_KEYS}


def curve_window(n):
    """Iterations each point of the train curves averages in a run of n: the report's 100 from 1,000
    iterations on, else n // 10 (at least 1), so every run gets about 10 points or more."""
    return min(100, max(1, n // 10))


def window_means(values, window, keep=None):
    """(centres, means) of `values` (values[i] belongs to iteration i + 1) over consecutive complete
    windows of `window` iterations; a partial window at the end is left out, as in the report. The
    window of iterations a..b is drawn at its centre (a + b) / 2. keep: per iteration, whether it
    counts; a window's mean is over its kept iterations, and a window with none kept has no point."""
    v = torch.tensor(values, dtype=torch.float64)
    w = torch.ones_like(v) if keep is None else torch.tensor(keep, dtype=torch.float64)
    n = len(v) // window * window
    sums = (v * w)[:n].view(-1, window).sum(1)
    counts = w[:n].view(-1, window).sum(1)
    centres = torch.arange(len(sums), dtype=torch.float64) * window + (window + 1) / 2
    kept = counts > 0
    return centres[kept].tolist(), (sums[kept] / counts[kept]).tolist()


def epoch_last_iterations(history):
    """The iterations that ended an epoch: those whose evaluation counts one more epoch than the one before
    (an evaluation at the end of a run stopped mid-epoch does not)."""
    epochs = [0] + history["test_epoch"]
    return {it for it, before, after in zip(history["test_iteration"], epochs, epochs[1:]) if after > before}


def write_history_csv(history, path):
    """One row per iteration; test columns are filled where they exist. train_loss_mean100 holds, on the last
    iteration of each window, the mean train loss of the window of the train-loss figure: 100 iterations
    (the report's) in runs of at least 1,000, curve_window(n) in shorter ones."""
    window = curve_window(len(history["train_loss"]))
    centres, means = window_means(history["train_loss"], window)
    loss_means = {round(c + (window - 1) / 2): m for c, m in zip(centres, means)}
    tests = {it: (e, a, l) for it, e, a, l in zip(history["test_iteration"], history["test_epoch"],
                                                   history["test_acc"], history["test_loss"])}
    tmp = Path(path).with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iteration", "train_acc", "train_loss", "train_loss_mean100", "epoch", "test_acc", "test_loss"])
        for i, (loss, acc) in enumerate(zip(history["train_loss"], history["train_acc"]), start=1):
            epoch, tacc, tloss = tests.get(i, ("", "", ""))
            w.writerow([i, f"{acc:.6f}", f"{loss:.6f}", f"{loss_means[i]:.6f}" if i in loss_means else "", epoch,
                        f"{tacc:.6f}" if tacc != "" else "", f"{tloss:.6f}" if tloss != "" else ""])
    tmp.replace(path)


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


def save_progress_figures(history, figures_dir, title):
    """The report's four learning-progress figures, against iterations, for a run of any length: a train
    curve is the mean of each window of curve_window(n) iterations over every iteration drawn faint (as a
    min..max band where there are more iterations than pixel columns); the legend names what is drawn."""
    from matplotlib.figure import Figure
    Path(figures_dir).mkdir(parents=True, exist_ok=True)
    paths = []
    for name, curve in progress_curves(history).items():
        fig = Figure(figsize=(6, 4), dpi=100)
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
        paths.append(Path(figures_dir) / f"{name}.png")
        fig.savefig(paths[-1])
    return paths


# --------------------------------------------------------------------------- the run

class StopRequest:
    """Turns the first Ctrl-C / SIGTERM into a flag, so the loop can save a checkpoint and exit.

    A second one exits at once with os._exit, after saying what is on disk (`on_disk()`): no
    exception unwinds and no interpreter shutdown runs, so the exit cannot hang, wherever the signal
    lands. (A KeyboardInterrupt raised while the writer's thread was starting left a job that never
    ran, and the wait for it never ended.) A save in progress is abandoned: save_atomic leaves the
    previous checkpoint whole.
    """

    def __init__(self, on_disk):
        self.signal = None
        self.on_disk = on_disk
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.signal is None:
            self.signal = signum
            return
        try:
            sys.stdout.flush()
            print(f"\nstopped at once by a second signal ({signum}): {self.on_disk()}", file=sys.stderr, flush=True)
        finally:
            utils.release_claims()  # os._exit skips every finally
            os._exit(130)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def exit(self, message):
        """The last words of a stopped run, then exit status 130 at once. Signals are blocked first, so a
        second one arriving now neither adds a line nor lands in the interpreter's shutdown."""
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        sys.stdout.flush()
        print(message, file=sys.stderr, flush=True)
        utils.release_claims()  # os._exit skips every finally
        os._exit(130)


def checkpoint_state(model, optimizer, scheduler, iteration, epoch, config, history):
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    optimizer_state, scheduler_state = portable_state(optimizer, scheduler)
    return dict(model=model.state_dict(), optimizer=optimizer_state, scheduler=scheduler_state,
                iteration=iteration, epoch=epoch, rng=rng, config=config, history=history)


def snapshot(obj):
    """A deep copy with every tensor on the CPU: training goes on mutating the originals in place."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class BackgroundWriter:
    """Runs one output job at a time on a worker thread, so a GPU keeps training while the checkpoint,
    CSV and figures of the last epoch are written. A new job first waits for the previous one, and
    wait() re-raises a job's error in the training thread (an OSError as one line)."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending = None

    def submit(self, job, *args):
        self.wait()
        self.pending = self.pool.submit(job, *args)

    def wait(self):
        pending, self.pending = self.pending, None
        if pending is not None:
            try:
                pending.result()
            except OSError as err:
                raise utils.UserError(f"could not write {err.filename or 'the outputs'}: {err.strerror or err}; "
                                      f"the last checkpoint written stays as it was") from None


def progress_title(config):
    """The title of the learning-progress figures (also when plot_learning_progress.py redraws them):
    the data as data.describe_dataset named it when the run started; a long name takes two lines."""
    name = config.get("data_name") or (data.SYNTHETIC_NAME if config["synthetic"] else f"the data in {config['data_dir']}")
    return textwrap.fill(f"width-{config['width']} ResNet-18, {name}", 90, break_long_words=False,
                         break_on_hyphens=False)


def write_outputs(state, ckpt_path, figures_dir, title, figures=True, saved=None):
    """Checkpoint, history CSV and (with figures) the figures; saved(iteration) once the checkpoint is on disk."""
    utils.save_atomic(state, ckpt_path)
    if saved is not None:
        saved(state["iteration"])
    write_history_csv(state["history"], ckpt_path.with_suffix(".csv"))
    if figures:
        save_progress_figures(state["history"], figures_dir, title)


@utils.releasing_claims
def main(argv=None):
    args = parse_args(argv)
    ckpt_path = Path(args.checkpoint)
    ckpt = None
    if args.resume and args.overwrite:
        raise utils.UserError("--resume continues the run in --checkpoint, --overwrite starts a new one over it; "
                              "pass one of them")
    if ckpt_path.is_dir():
        utils.check_writable(ckpt_path, "--checkpoint")  # says: a folder where the file must go
    utils.CheckpointClaim(ckpt_path)  # one run per checkpoint, held to the end of main (released by its decorator)
    if args.resume:
        if not ckpt_path.is_file():
            raise utils.UserError(f"--resume given, but there is no checkpoint at {ckpt_path}; "
                                  f"drop --resume to start a new run, or pass --checkpoint PATH")
        ckpt = utils.read_checkpoint(ckpt_path, config_keys=(*RECIPE, "epochs"))
    elif ckpt_path.exists() and not args.overwrite:
        raise utils.UserError(f"{ckpt_path} already exists; pass --resume to continue it, --overwrite "
                              f"to start over, or --checkpoint NEW_PATH")
    config = resolve_config(args, ckpt)
    check_outputs(ckpt_path, config["figures_dir"])
    device = utils.resolve_device(config["device"])
    check_memory(config, device)
    resolve_speed(config, device)
    config["device"] = str(device)  # as used: "auto" resolved
    bf16, channels_last = config["bf16"], config["channels_last"]

    root = data.dataset_root(config["data_dir"], config["synthetic"])
    train_images, train_labels, classes = data.load_cifar10(root, train=True)
    test_images, test_labels, _ = data.load_cifar10(root, train=False)
    config["classes"] = classes
    config["data_name"] = data_name = data.describe_dataset(root, config["synthetic"])
    train_images, train_labels = train_images.to(device), train_labels.to(device)
    test_images, test_labels = test_images.to(device), test_labels.to(device)

    torch.manual_seed(config["seed"])
    model = utils.build_model(ckpt, ckpt_path) if ckpt else ResNet(config["width"], num_classes=len(classes))
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer, scheduler = make_optimizer(model, config, config["cuda_graph"])
    history, iteration, epoch = new_history(), 0, 0
    if ckpt:
        load_optimizer_state(optimizer, ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        history, iteration, epoch = ckpt["history"], ckpt["iteration"], ckpt["epoch"]
        torch.set_rng_state(ckpt["rng"]["torch"])
    if config["cuda_graph"]:
        step_fn = GraphedStep(model, optimizer, bf16)
    else:
        train_model = torch.compile(model) if config["compile"] else model

        def step_fn(x, y):
            return train_step(train_model, optimizer, x, y, bf16)

    steps_per_epoch = -(-len(train_images) // config["batch_size"])
    total = config["epochs"] * steps_per_epoch
    if config["iterations"] is not None:
        total = min(total, config["iterations"])
    if iteration >= total:
        raise utils.UserError(f"{ckpt_path} has already finished {iteration} iterations ({epoch} epochs); "
                              f"pass a larger --epochs or --iterations to train further")

    writer = BackgroundWriter()
    title = progress_title(config)
    saved = [ckpt["iteration"] if ckpt else None]  # the iteration of the checkpoint on disk from this run

    def save(figures=True):
        state = snapshot(checkpoint_state(model, optimizer, scheduler, iteration, epoch, config, history))
        writer.submit(write_outputs, state, ckpt_path, config["figures_dir"], title, figures,
                      lambda it: saved.__setitem__(0, it))

    def on_disk():
        if saved[0] is not None:
            return f"{ckpt_path} holds the last good state, iteration {saved[0]}"
        if ckpt_path.exists():
            return f"no checkpoint of this run was written yet; {ckpt_path} is still the earlier run's"
        return f"no checkpoint was written yet ({ckpt_path} does not exist)"

    # installed before the line below, which tells a watching process the loop is armed
    stop = StopRequest(lambda: on_disk() + ("; continue with --resume" if saved[0] is not None else ""))
    print(f"training a width-{config['width']} ResNet-18 on {data_name}: {len(train_images)} train / "
          f"{len(test_images)} test images, {total} iterations on {device} ({speed_label(config)})")
    bar = tqdm(total=total, initial=iteration, unit="it", dynamic_ncols=True, leave=False)
    started = time.time()
    try:
        while iteration < total and stop.signal is None:
            first = iteration - epoch * steps_per_epoch
            last = min(steps_per_epoch, first + total - iteration)
            losses = torch.zeros(last - first, device=device)
            accs = torch.zeros(last - first, device=device)
            done = 0  # steps of this stretch whose loss/accuracy are already in history
            model.train()
            batches = epoch_batches(train_images, train_labels, epoch, config["seed"], config["batch_size"],
                                    channels_last, first, last)
            for step, (x, y) in enumerate(batches, start=first):
                loss, correct = step_fn(x, y)
                losses[step - first], accs[step - first] = loss, correct / len(y)
                iteration += 1
                if step + 1 == last or (step + 1 - first) % LOG_EVERY == 0 or stop.signal is not None:
                    new_losses = losses[done:step + 1 - first].tolist()
                    if not all(map(math.isfinite, new_losses)):
                        writer.wait()  # a save in flight lands first, so the message says what is on disk
                        raise utils.UserError(
                            f"the loss became {new_losses[-1]} by iteration {iteration}; stopped without saving "
                            f"it: {on_disk()}; lower --lr and train again")
                    history["train_loss"] += new_losses
                    history["train_acc"] += accs[done:step + 1 - first].tolist()
                    bar.update(step + 1 - first - done)
                    bar.set_postfix(loss=f"{new_losses[-1]:.3f}", acc=f"{history['train_acc'][-1]:.3f}",
                                    lr=f"{float(optimizer.param_groups[0]['lr']):.2e}")
                    done = step + 1 - first
                    if stop.signal is not None:
                        break
            if stop.signal is not None:
                break
            if last == steps_per_epoch:  # a whole epoch: decay the lr on its schedule, evaluate
                epoch += 1
                scheduler.step()
            if last == steps_per_epoch or iteration == total:
                acc, loss = evaluate(model, test_images, test_labels, bf16, channels_last)
                for key, value in zip(("test_iteration", "test_epoch", "test_acc", "test_loss"),
                                      (iteration, epoch, acc, loss)):
                    history[key].append(value)
                bar.write(f"epoch {epoch} iteration {iteration}: test accuracy {acc:.4f}, test loss {loss:.4f}")
                save()
        if stop.signal is not None:
            save(figures=False)
    finally:
        bar.close()
        try:
            writer.wait()  # whatever happened, the last good state is on disk before we exit
        finally:
            if stop.signal is None:
                stop.restore()  # a stopped run keeps its handler to its end: a second signal exits at once
    if stop.signal is not None:
        stop.exit(f"stopped by signal {stop.signal} at iteration {iteration}: saved {ckpt_path}; "
                  f"continue with --resume")
    print(f"done in {time.time() - started:.0f} s: test accuracy {history['test_acc'][-1]:.4f}; "
          f"{ckpt_path}, {ckpt_path.with_suffix('.csv')} and the learning-progress figures in {config['figures_dir']}/")


if __name__ == "__main__":
    utils.run_cli(main)
