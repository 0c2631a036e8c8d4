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

Speed settings (--precision, --channels-last, --cuda-graph, --compile) default to what the device can do,
decided in speed.py: its rules rule out what cannot be fast there, and a short probe at the run's width
and batch keeps the fastest of the rest. A flag given always wins; --show-settings prints the choice.
"""
import argparse
import csv
import dataclasses
import json
import math
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import speed
import utils
from model import ResNet, state_shapes
from visualize.progress import (PROGRESS_FIGURES, curve_window, progress_title, save_progress_figures,
                                window_means)

# Settings a checkpoint fixes: on --resume they come from the checkpoint (an explicit, different
# value is an error). The others (--epochs, --iterations, --device, ...) may change on resume.
RECIPE = dict(data_dir="data", synthetic=False, batch_size=128, lr=1e-3, weight_decay=5e-4,
              lr_step_epochs=10, lr_gamma=0.5, width=64, seed=0)
DEFAULT_EPOCHS = 52
LOG_EVERY = 50  # iterations between host syncs (progress bar, NaN check): fewer syncs, faster GPU
# The learning-progress figures are redrawn at most this often (and at the end): drawing four figures
# holds the GIL for ~1 s, which a GPU run of a few seconds an epoch would feel every epoch.
FIGURES_EVERY_S = 10


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
    # Speed settings: None = decided by speed.py from what the device can do (and its probe).
    on = argparse.BooleanOptionalAction
    p.add_argument("--precision", choices=speed.PRECISIONS,
                   help="fp32, bf16 autocast, or fp16 autocast with a GradScaler (default: the device's)")
    p.add_argument("--bf16", action=on, help="--bf16 is --precision bf16, --no-bf16 is --precision fp32")
    p.add_argument("--channels-last", action=on, help="channels_last memory layout, else NCHW (default: the device's)")
    p.add_argument("--compile", action=on, help="torch.compile the model (default: off; costs compile time)")
    p.add_argument("--cuda-graph", action=on,
                   help="replay each training step (forward, backward, Adam) from a CUDA graph "
                        "(default: the device's; CUDA only)")
    p.add_argument("--show-settings", action="store_true",
                   help="print the speed settings this run would use here (after its probe) as one JSON line, "
                        "and exit without training")
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
    for key in ("checkpoint", "device"):
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


def asked_speed(args):
    """speed.SWITCHES -> what the command line gave, None where it gave nothing (--bf16 is a --precision)."""
    precision = args.precision
    if args.bf16 is not None:
        implied = "bf16" if args.bf16 else "fp32"
        if precision not in (None, implied):
            raise utils.UserError(f"--precision {precision} and --{'' if args.bf16 else 'no-'}bf16 disagree; "
                                  f"pass one of them")
        precision = implied
    return dict(precision=precision, channels_last=args.channels_last, cuda_graph=args.cuda_graph,
                compile=args.compile)


def speed_plan(asked, ckpt, caps):
    """speed.plan for this run. A resumed run on the same kind of device keeps the settings its run chose
    (a new probe could choose others, and the resumed run would then not equal one run); flags still win."""
    config = ckpt["config"] if ckpt else {}
    if config.get("device_name") != caps.name or not all(k in config for k in speed.SWITCHES):
        return speed.plan(caps, asked)
    kept = {k: config[k] if asked[k] is None else asked[k] for k in speed.SWITCHES}
    plan = speed.plan(caps, kept)
    given = [f"{k}={asked[k]}" for k in speed.SWITCHES if asked[k] is not None]
    return speed.Plan(caps, plan.candidates, (plan.reasons[0], "resumed: as the checkpoint's run chose on this device",
                                              *(["given: " + ", ".join(given)] if given else [])))


def record_speed(config, settings, probe, reason, caps):
    """The config records what the run uses and why: the settings, the reason, the probe's images/s."""
    config.update(dataclasses.asdict(settings), speed_reason=reason, speed_probe=probe, device_name=caps.name)


def probe_measure(config, device, num_classes):
    """measure(settings, steps) -> images/s for speed.choose: a fresh model of the run's width trained
    at its batch size on one random batch (speed does not depend on the pixels) under `settings`. A
    graph that is dropped in the probe would be dropped in the run too: it measures 0."""
    def measure(settings, steps):
        g = torch.Generator().manual_seed(0)
        batch = config["batch_size"]
        images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)
        y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
        x = prepare_batch(images, torch.arange(batch, device=device), torch.full((batch, 2), 4, device=device),
                          torch.zeros(batch, dtype=torch.bool, device=device), settings.channels_last)
        model = ResNet(config["width"], num_classes).to(device)
        if settings.channels_last:
            model.to(memory_format=torch.channels_last)
        optimizer, _ = make_optimizer(model, config, settings.cuda_graph)
        step = make_step(model, optimizer, settings, speed.grad_scaler(device, settings.precision),
                         say=lambda line: None)
        rate = speed.time_steps(lambda: step(x, y), batch, steps, device)
        return 0.0 if getattr(step, "dropped", None) else rate
    return measure


def training_memory(width, batch_size, num_classes=10, cuda_graph=False, eval_batch=1000):
    """(bytes, parameters, activation floats per image) that training this network needs, estimated
    without allocating it:

        bytes = 16 x parameters           (fp32 weights, gradients, Adam's two moments)
              + 4 x batch x activations   (every layer's output per image, kept for the backward pass)
              [+ 8 x eval_batch x largest] (cuda_graph: see below)

    Parameters come from model.state_shapes. Every layer's output is a multiple of the width (the
    classifier's excepted), so activations are counted in one-image forward passes at widths 1 and 2
    and extrapolated exactly. Within ~15 % of the peak memory measured on a CPU (widths 16-128,
    batches 64-1024).

    CUDA graphs share one pool, and the warm-up's cache is emptied before the capture, so the graphs
    hold one step's activations and gradients as eager training does. But that pool is kept apart from
    the eager allocator, so the test evaluation (inference, eval_batch images at a time, a layer's input
    and output alive at once) cannot reuse it: counted as 2 x 4 B x eval_batch x the largest layer output.
    """
    shapes = state_shapes(width, num_classes)
    parameters = sum(math.prod(shapes[name]) for name, _ in ResNet(1, num_classes).named_parameters())
    counts, largest = [], []
    for small in (1, 2):
        outputs = []
        model = ResNet(small, num_classes).eval()
        for m in model.modules():
            if not list(m.children()):
                m.register_forward_hook(lambda m, i, out: outputs.append(out.numel()))
        with torch.inference_mode():
            model(torch.zeros(1, 3, 32, 32))
        counts.append(sum(outputs))
        largest.append(max(outputs))
    activations = counts[0] + (counts[1] - counts[0]) * (width - 1)
    need = 16 * parameters + 4 * batch_size * activations
    if cuda_graph:
        need += 8 * eval_batch * (largest[0] + (largest[1] - largest[0]) * (width - 1))
    return need, parameters, activations


def check_memory(config, device, cuda_graph=False):
    """UserError, before anything is allocated, if --width and --batch-size need more memory than
    `device` has free (where that is known); cuda_graph: if the run may train from CUDA graphs."""
    free = utils.available_memory(device)
    if free is None:
        return
    need, parameters, activations = training_memory(config["width"], config["batch_size"], cuda_graph=cuda_graph)
    if need > free:
        graphs = " and the CUDA graphs' evaluation room" if cuda_graph else ""
        raise utils.UserError(
            f"--width {config['width']} with --batch-size {config['batch_size']} needs about {need / 2**30:.3g} GiB "
            f"on {device} (16 B x {parameters / 1e6:.3g} M parameters + 4 B x batch x {activations / 1e6:.3g} M "
            f"activations an image{graphs}), but {free / 2**30:.3g} GiB are free; lower --width or --batch-size")


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


def train_step(model, optimizer, x, y, precision="fp32", scaler=None):
    """One optimisation step; returns (loss, number correct) as device tensors (no host sync, but
    fp16's GradScaler reads on the host whether the gradients are finite, and skips the step if not)."""
    with speed.autocast(x.device, precision):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return loss.detach(), (logits.argmax(1) == y).sum()


def make_step(model, optimizer, settings, scaler=None, say=None):
    """The run's step(x, y) -> (loss, number correct) under `settings` (a speed.Settings): train_step
    eagerly, on the torch.compile'd model, or replayed from CUDA graphs (say: where their drop is told)."""
    if settings.cuda_graph:
        return speed.GraphedStep(lambda x, y: train_step(model, optimizer, x, y, settings.precision),
                                 model, optimizer, say)
    train_model = torch.compile(model) if settings.compile else model
    return lambda x, y: train_step(train_model, optimizer, x, y, settings.precision, scaler)


@torch.inference_mode()
def evaluate(model, images, labels, precision="fp32", channels_last=False, batch_size=None):
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
        with speed.autocast(images.device, precision):
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
    return portable_dicts(optimizer.state_dict(), scheduler.state_dict())


def portable_dicts(optimizer_state, scheduler_state):
    """portable_state of state dicts already taken (the writer's thread makes a snapshot portable)."""
    groups = [dict(plain_numbers(g), capturable=False) for g in optimizer_state["param_groups"]]
    return dict(optimizer_state, param_groups=groups), plain_numbers(scheduler_state)


def load_optimizer_state(optimizer, state):
    """Load a checkpoint's Adam state, keeping how this run steps: capturable or not, the very lr
    tensor a CUDA graph reads (filled with the checkpoint's lr), and the parameters' memory format."""
    live = [(group["capturable"], group["lr"]) for group in optimizer.param_groups]
    groups = [dict(saved, capturable=capturable) for saved, (capturable, _) in zip(state["param_groups"], live)]
    optimizer.load_state_dict(dict(state, param_groups=groups))  # capturable moves `step` to the device
    for group, (_, lr) in zip(optimizer.param_groups, live):
        if isinstance(lr, torch.Tensor):
            lr.fill_(float(group["lr"]))
            group["lr"] = lr
        else:
            group["lr"] = float(group["lr"])
    speed.match_memory_format(optimizer)


# --------------------------------------------------------------------------- history: CSV and figures

def new_history():
    # Per-iteration train_loss and train_acc (index i = iteration i + 1); test_* once per evaluation.
    return {key: [] for key in utils.HISTORY_KEYS}


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


def live_state(model, optimizer, scheduler, scaler, iteration, epoch, config, history):
    """What a checkpoint holds, as the training's own objects: snapshot copies them, make_portable ends them."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict() if scaler is not None else None,
                iteration=iteration, epoch=epoch, rng=rng, config=config, history=history)


def make_portable(state):
    """The state with Adam's and StepLR's dicts made portable (portable_dicts): what a checkpoint keeps."""
    state["optimizer"], state["scheduler"] = portable_dicts(state["optimizer"], state["scheduler"])
    return state


def checkpoint_state(model, optimizer, scheduler, iteration, epoch, config, history, scaler=None):
    return make_portable(live_state(model, optimizer, scheduler, scaler, iteration, epoch, config, history))


def snapshot(obj):
    """(copy, ready): a deep copy with every tensor on the CPU, since training goes on mutating the
    originals in place, and ready(), which returns once the copy is whole. CUDA tensors are copied
    without blocking into pinned memory and ready() waits for those copies, on the writer's thread, so
    the training thread never waits for the GPU's queue to drain (~300 blocking copies a save before)."""
    devices = set()

    def copy(obj):
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "cuda":
                return obj.detach().to("cpu", copy=True)
            devices.add(obj.device)
            return torch.empty_like(obj, device="cpu", pin_memory=True).copy_(obj.detach(), non_blocking=True)
        if isinstance(obj, dict):
            return {k: copy(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(copy(v) for v in obj)
        return obj

    copied = copy(obj)
    events = []
    for device in devices:
        events.append(torch.cuda.Event())
        events[-1].record(torch.cuda.current_stream(device))
    return copied, lambda: [event.synchronize() for event in events]


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


def write_outputs(state, ready, ckpt_path, figures_dir, title, figures, saved):
    """On the writer's thread: once the snapshot is whole (ready), the checkpoint, then saved(iteration),
    the history CSV and (with figures) the figures."""
    ready()
    utils.save_atomic(make_portable(state), ckpt_path)
    saved(state["iteration"])
    write_history_csv(state["history"], ckpt_path.with_suffix(".csv"))
    if figures:
        save_progress_figures(state["history"], figures_dir, title)


@dataclass
class OnDisk:
    """What the checkpoint path holds, for the last words of a stopped or failed run: `iteration` is that
    of the checkpoint this run (or the run it resumes) wrote there, None before any."""
    path: Path
    iteration: int = None

    def saved(self, iteration):
        self.iteration = iteration

    def describe(self):
        if self.iteration is not None:
            return f"{self.path} holds the last good state, iteration {self.iteration}"
        if self.path.exists():
            return f"no checkpoint of this run was written yet; {self.path} is still the earlier run's"
        return f"no checkpoint was written yet ({self.path} does not exist)"


class StepLog:
    """Each step's loss and accuracy, kept on the device and read LOG_EVERY steps at a time (one host sync)."""

    def __init__(self, device):
        self.losses = torch.zeros(LOG_EVERY, device=device)
        self.accs = torch.zeros(LOG_EVERY, device=device)
        self.count = 0

    def add(self, loss, correct, batch):
        self.losses[self.count], self.accs[self.count] = loss, correct / batch
        self.count += 1
        return self.count == LOG_EVERY

    def take(self):
        """(losses, accuracies) logged since the last take, as floats."""
        count, self.count = self.count, 0
        return self.losses[:count].tolist(), self.accs[:count].tolist()


def open_checkpoint(args, ckpt_path):
    """The checkpoint --resume continues (None for a new run), after checking the path may be used."""
    if args.resume and args.overwrite:
        raise utils.UserError("--resume continues the run in --checkpoint, --overwrite starts a new one over it; "
                              "pass one of them")
    if ckpt_path.is_dir():
        utils.check_writable(ckpt_path, "--checkpoint")  # says: a folder where the file must go
    if not args.show_settings:  # one run per checkpoint, held to the end of main (released by its decorator)
        utils.CheckpointClaim(ckpt_path)
    if args.resume:
        if not ckpt_path.is_file():
            raise utils.UserError(f"--resume given, but there is no checkpoint at {ckpt_path}; "
                                  f"drop --resume to start a new run, or pass --checkpoint PATH")
        return utils.read_checkpoint(ckpt_path, config_keys=(*RECIPE, "epochs"))
    if ckpt_path.exists() and not args.overwrite and not args.show_settings:
        raise utils.UserError(f"{ckpt_path} already exists; pass --resume to continue it, --overwrite "
                              f"to start over, or --checkpoint NEW_PATH")
    return None


class Run:
    """One training run: the data on the device, the model and its optimizer, where the run stands
    (iteration, epoch, history) and what its checkpoint path holds. train() runs it to its end or to a stop."""

    def __init__(self, config, ckpt, ckpt_path, device, settings, splits, total):
        self.config, self.ckpt_path, self.device, self.settings, self.total = config, ckpt_path, device, settings, total
        self.train_images, self.train_labels, self.test_images, self.test_labels = splits
        self.steps_per_epoch = -(-len(self.train_images) // config["batch_size"])
        torch.manual_seed(config["seed"])
        model = utils.build_model(ckpt, ckpt_path) if ckpt else ResNet(config["width"], len(config["classes"]))
        self.model = model.to(device)
        if settings.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer, self.scheduler = make_optimizer(self.model, config, settings.cuda_graph)
        self.scaler = speed.grad_scaler(device, settings.precision)
        self.history, self.iteration, self.epoch = new_history(), 0, 0
        self.on_disk = OnDisk(ckpt_path)
        if ckpt:
            load_optimizer_state(self.optimizer, ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.scaler is not None and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
            self.history, self.iteration, self.epoch = ckpt["history"], ckpt["iteration"], ckpt["epoch"]
            torch.set_rng_state(ckpt["rng"]["torch"])
            self.on_disk.iteration = ckpt["iteration"]
        self.step = make_step(self.model, self.optimizer, settings, self.scaler, say=self.graph_dropped)
        self.writer = BackgroundWriter()
        self.title = progress_title(config)
        self.drawn = None  # time.monotonic() of the last figures drawn

    def graph_dropped(self, why):
        """GraphedStep's fallback: a batch size (or, once no graph is left, the run) goes on eagerly, and
        its checkpoint says so."""
        self.config.update(cuda_graph=self.step.dropped is None, speed_reason=f"{self.config['speed_reason']}; {why}")
        tqdm.write(why)

    def save(self, figures=True):
        """Hand the state to the writer's thread; the figures at most every FIGURES_EVERY_S, and at the end."""
        figures = figures and (self.iteration == self.total or self.drawn is None
                               or time.monotonic() - self.drawn >= FIGURES_EVERY_S)
        if figures:
            self.drawn = time.monotonic()
        state, ready = snapshot(live_state(self.model, self.optimizer, self.scheduler, self.scaler, self.iteration,
                                           self.epoch, self.config, self.history))
        self.writer.submit(write_outputs, state, ready, self.ckpt_path, self.config["figures_dir"], self.title,
                           figures, self.on_disk.saved)

    def log(self, steps, bar):
        """Move the steps logged into the history and the progress bar; UserError if the loss went NaN/inf."""
        losses, accs = steps.take()
        if not losses:  # the stretch's last step filled the log, which was read then
            return
        if not all(map(math.isfinite, losses)):
            self.writer.wait()  # a save in flight lands first, so the message says what is on disk
            raise utils.UserError(f"the loss became {losses[-1]} by iteration {self.iteration}; stopped without "
                                  f"saving it: {self.on_disk.describe()}; lower --lr and train again")
        self.history["train_loss"] += losses
        self.history["train_acc"] += accs
        bar.update(len(losses))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{accs[-1]:.3f}",
                        lr=f"{float(self.optimizer.param_groups[0]['lr']):.2e}")

    def end_stretch(self, whole_epoch, bar):
        """After a whole epoch: decay the lr on its schedule. After it or at the run's end: evaluate, save."""
        if whole_epoch:
            self.epoch += 1
            self.scheduler.step()
        if whole_epoch or self.iteration == self.total:
            acc, loss = evaluate(self.model, self.test_images, self.test_labels, self.settings.precision,
                                 self.settings.channels_last)
            for key, value in zip(("test_iteration", "test_epoch", "test_acc", "test_loss"),
                                  (self.iteration, self.epoch, acc, loss)):
                self.history[key].append(value)
            bar.write(f"epoch {self.epoch} iteration {self.iteration}: test accuracy {acc:.4f}, test loss {loss:.4f}")
            self.save()

    def train(self, stop, bar):
        """Train to `total` iterations, or until stop.signal; True if stopped. The stretches are the rest of
        the current epoch, then whole epochs, the last one cut at total."""
        steps = StepLog(self.device)
        stopping = False
        while self.iteration < self.total and not stopping:
            first = self.iteration - self.epoch * self.steps_per_epoch
            last = min(self.steps_per_epoch, first + self.total - self.iteration)
            self.model.train()
            for x, y in epoch_batches(self.train_images, self.train_labels, self.epoch, self.config["seed"],
                                      self.config["batch_size"], self.settings.channels_last, first, last):
                full = steps.add(*self.step(x, y), len(y))
                self.iteration += 1
                stopping = stop.signal is not None  # the one place a stop is noticed
                if full or stopping:
                    self.log(steps, bar)
                if stopping:
                    break
            else:
                self.log(steps, bar)
                self.end_stretch(last == self.steps_per_epoch, bar)
        if stopping:
            self.save(figures=False)
        return stopping


@utils.releasing_claims
def main(argv=None):
    args = parse_args(argv)
    ckpt_path = Path(args.checkpoint)
    ckpt = open_checkpoint(args, ckpt_path)
    config = resolve_config(args, ckpt)
    if not args.show_settings:  # it writes nothing
        check_outputs(ckpt_path, config["figures_dir"])
    device = utils.resolve_device(config["device"])
    speed.use_device(device)
    caps = speed.detect(device)
    plan = speed_plan(asked_speed(args), ckpt, caps)
    check_memory(config, device, cuda_graph=any(c.cuda_graph for c in plan.candidates))
    config["device"] = str(device)  # as used: "auto" resolved

    root = data.dataset_root(config["data_dir"], config["synthetic"])
    train_images, train_labels, classes = data.load_cifar10(root, train=True)
    test_images, test_labels, _ = data.load_cifar10(root, train=False)
    config["classes"] = classes
    config["data_name"] = data_name = data.describe_dataset(root, config["synthetic"])
    splits = tuple(t.to(device) for t in (train_images, train_labels, test_images, test_labels))
    iteration = ckpt["iteration"] if ckpt else 0
    total = config["epochs"] * -(-len(train_images) // config["batch_size"])
    if config["iterations"] is not None:
        total = min(total, config["iterations"])
    if iteration >= total:
        raise utils.UserError(f"{ckpt_path} has already finished {iteration} iterations ({ckpt['epoch']} epochs); "
                              f"pass a larger --epochs or --iterations to train further")
    # before the run seeds torch: the probe's models draw their initial weights from it
    settings, probe, reason = speed.choose(plan, total - iteration, probe_measure(config, device, len(classes)))
    record_speed(config, settings, probe, reason, caps)
    if args.show_settings:
        print(json.dumps(dict(device=str(device), **dataclasses.asdict(settings), reason=reason, probe=probe)))
        return

    run = Run(config, ckpt, ckpt_path, device, settings, splits, total)
    # installed before the line below, which tells a watching process the loop is armed
    stop = StopRequest(lambda: run.on_disk.describe() + ("; continue with --resume"
                                                         if run.on_disk.iteration is not None else ""))
    print(f"training a width-{config['width']} ResNet-18 on {data_name}: {len(train_images)} train / "
          f"{len(test_images)} test images, {total} iterations on {device}: {settings.label()} ({reason})")
    bar = tqdm(total=total, initial=iteration, unit="it", dynamic_ncols=True, leave=False)
    started = time.time()
    try:
        stopped = run.train(stop, bar)
    finally:
        bar.close()
        try:
            run.writer.wait()  # whatever happened, the last good state is on disk before we exit
        finally:
            if stop.signal is None:
                stop.restore()  # a stopped run keeps its handler to its end: a second signal exits at once
    if stopped:
        stop.exit(f"stopped by signal {stop.signal} at iteration {run.iteration}: saved {ckpt_path}; "
                  f"continue with --resume")
    print(f"done in {time.time() - started:.0f} s: test accuracy {run.history['test_acc'][-1]:.4f}; "
          f"{ckpt_path}, {ckpt_path.with_suffix('.csv')} and the learning-progress figures in {config['figures_dir']}/")


if __name__ == "__main__":
    utils.run_cli(main)
