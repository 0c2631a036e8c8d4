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
"""
import argparse
import csv
import math
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import utils
from model import ResNet

# Settings a checkpoint fixes: on --resume they come from the checkpoint (an explicit, different
# value is an error). The others (--epochs, --iterations, --device, ...) may change on resume.
RECIPE = dict(data_dir="data", synthetic=False, batch_size=128, lr=1e-3, weight_decay=5e-4,
              lr_step_epochs=10, lr_gamma=0.5, width=64, seed=0)
DEFAULT_EPOCHS = 52
LOG_EVERY = 50  # iterations between host syncs (progress bar, NaN check): fewer syncs, faster GPU


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--figures-dir", default="figures", help="where the learning-progress PNGs go (default: %(default)s/)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false",
                   help="on CUDA, train in fp32 instead of bf16 autocast")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="on CUDA, keep the NCHW memory layout instead of channels_last")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA; costs compile time)")
    return p.parse_args(argv)


def resolve_config(args, ckpt):
    """Merge the command line with the recipe defaults, or with the checkpoint being resumed."""
    config = dict(ckpt["config"]) if ckpt else {}
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
    for key in ("checkpoint", "figures_dir", "device", "bf16", "channels_last", "compile"):
        config[key] = getattr(args, key)
    config["data_dir"] = str(config["data_dir"])
    for key in ("epochs", "batch_size", "width", "lr_step_epochs"):
        if config[key] < 1:
            raise utils.UserError(f"--{key.replace('_', '-')} must be at least 1, got {config[key]}")
    if config["iterations"] is not None and config["iterations"] < 1:
        raise utils.UserError(f"--iterations must be at least 1, got {config['iterations']}")
    return config


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
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


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


def make_optimizer(model, config):
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=config["weight_decay"])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config["lr_step_epochs"],
                                                gamma=config["lr_gamma"])
    return optimizer, scheduler


# --------------------------------------------------------------------------- history: CSV and figures

def new_history():
    # Per-iteration train loss and accuracy (index i = iteration i + 1); one entry per evaluation.
    return dict(train_loss=[], train_acc=[], test_iteration=[], test_epoch=[], test_acc=[], test_loss=[])


def loss_per_100(train_loss):
    """(iterations, mean train loss) over each complete window of 100 iterations, as in the report."""
    loss = torch.tensor(train_loss, dtype=torch.float64)
    windows = len(loss) // 100
    means = loss[:windows * 100].view(windows, 100).mean(1).tolist() if windows else []
    return [100 * (i + 1) for i in range(windows)], means


def write_history_csv(history, path):
    """One row per iteration; the 100-iteration loss mean and test columns are filled where they exist."""
    loss100 = dict(zip(*loss_per_100(history["train_loss"])))
    tests = {it: (e, a, l) for it, e, a, l in zip(history["test_iteration"], history["test_epoch"],
                                                   history["test_acc"], history["test_loss"])}
    tmp = Path(path).with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iteration", "train_acc", "train_loss", "train_loss_mean100", "epoch", "test_acc", "test_loss"])
        for i, (loss, acc) in enumerate(zip(history["train_loss"], history["train_acc"]), start=1):
            epoch, tacc, tloss = tests.get(i, ("", "", ""))
            w.writerow([i, f"{acc:.6f}", f"{loss:.6f}", f"{loss100[i]:.6f}" if i in loss100 else "", epoch,
                        f"{tacc:.6f}" if tacc != "" else "", f"{tloss:.6f}" if tloss != "" else ""])
    tmp.replace(path)


def band(values, columns=600):
    """(x, low, high, mean) of `values` in `columns` buckets: a long noisy curve as a plot shows it.

    Drawing 20k per-batch points costs ~0.4 s a figure; their min..max per pixel column looks the same.
    """
    v = torch.tensor(values, dtype=torch.float64)
    size = max(1, -(-len(v) // columns))
    chunks = v.split(size)
    x = [i * size + (len(c) + 1) / 2 for i, c in enumerate(chunks)]
    return x, [c.min().item() for c in chunks], [c.max().item() for c in chunks], [c.mean().item() for c in chunks]


def save_progress_figures(history, figures_dir, title):
    """The report's four learning-progress figures, against iterations."""
    from matplotlib.figure import Figure
    curves = {
        "train_accuracy": ("train accuracy (per mini-batch)", None, None),
        "train_loss": ("train loss (mean of each 100 iterations)", *loss_per_100(history["train_loss"])),
        "test_accuracy": ("test accuracy (whole test set)", history["test_iteration"], history["test_acc"]),
        "test_loss": ("test loss (whole test set)", history["test_iteration"], history["test_loss"]),
    }
    Path(figures_dir).mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (ylabel, x, y) in curves.items():
        fig = Figure(figsize=(6, 4), dpi=100)
        ax = fig.add_subplot()
        if name == "train_accuracy":
            x, low, high, mean = band(history["train_acc"])
            ax.fill_between(x, low, high, color="C0", alpha=0.3, lw=0, label="min..max per pixel column")
            ax.plot(x, mean, color="C0", lw=1, label="mean")
            ax.legend(loc="lower right", fontsize=8)
        else:
            ax.plot(x, y, lw=1.5, marker="o" if name.startswith("test") else None, ms=3)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        fig.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.92)
        paths.append(Path(figures_dir) / f"{name}.png")
        fig.savefig(paths[-1])
    return paths


# --------------------------------------------------------------------------- the run

class StopRequest:
    """Turns the first Ctrl-C / SIGTERM into a flag, so the loop can save a checkpoint and exit."""

    def __init__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        self.signal = signum
        signal.signal(signum, self.previous[signum])  # a second one stops at once

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def checkpoint_state(model, optimizer, scheduler, iteration, epoch, config, history):
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
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
    wait() re-raises a job's error in the training thread."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending = None

    def submit(self, job, *args):
        self.wait()
        self.pending = self.pool.submit(job, *args)

    def wait(self):
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()


def describe_data(config):
    """How titles and messages name the run's data."""
    return "synthetic gratings (NOT CIFAR-10)" if config["synthetic"] else f"CIFAR-10 from {Path(config['data_dir'])}"


def progress_title(config):
    """The title of the learning-progress figures (also when plot_learning_progress.py redraws them)."""
    return f"width-{config['width']} ResNet-18, {describe_data(config)}"


def write_outputs(state, ckpt_path, figures_dir, title, figures=True):
    utils.save_atomic(state, ckpt_path)
    write_history_csv(state["history"], ckpt_path.with_suffix(".csv"))
    if figures:
        save_progress_figures(state["history"], figures_dir, title)


def main(argv=None):
    args = parse_args(argv)
    ckpt_path = Path(args.checkpoint)
    ckpt = None
    if args.resume:
        if not ckpt_path.is_file():
            raise utils.UserError(f"--resume given, but there is no checkpoint at {ckpt_path}; "
                                  f"drop --resume to start a new run, or pass --checkpoint PATH")
        ckpt = utils.read_checkpoint(ckpt_path)
    elif ckpt_path.exists() and not args.overwrite:
        raise utils.UserError(f"{ckpt_path} already exists; pass --resume to continue it, --overwrite "
                              f"to start over, or --checkpoint NEW_PATH")
    config = resolve_config(args, ckpt)
    device = utils.resolve_device(config["device"])
    cuda = device.type == "cuda"
    bf16, channels_last = config["bf16"] and cuda, config["channels_last"] and cuda

    root = data.dataset_root(config["data_dir"], config["synthetic"])
    train_images, train_labels, classes = data.load_cifar10(root, train=True)
    test_images, test_labels, _ = data.load_cifar10(root, train=False)
    config["classes"] = classes
    data_name = describe_data(config)
    train_images, train_labels = train_images.to(device), train_labels.to(device)
    test_images, test_labels = test_images.to(device), test_labels.to(device)

    torch.manual_seed(config["seed"])
    model = utils.build_model(ckpt, ckpt_path) if ckpt else ResNet(config["width"], num_classes=len(classes))
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer, scheduler = make_optimizer(model, config)
    history, iteration, epoch = new_history(), 0, 0
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        history, iteration, epoch = ckpt["history"], ckpt["iteration"], ckpt["epoch"]
        torch.set_rng_state(ckpt["rng"]["torch"])
    train_model = torch.compile(model) if config["compile"] else model

    steps_per_epoch = -(-len(train_images) // config["batch_size"])
    total = config["epochs"] * steps_per_epoch
    if config["iterations"] is not None:
        total = min(total, config["iterations"])
    if iteration >= total:
        raise utils.UserError(f"{ckpt_path} has already finished {iteration} iterations ({epoch} epochs); "
                              f"pass a larger --epochs or --iterations to train further")

    writer = BackgroundWriter()
    title = progress_title(config)

    def save(figures=True):
        state = snapshot(checkpoint_state(model, optimizer, scheduler, iteration, epoch, config, history))
        writer.submit(write_outputs, state, ckpt_path, config["figures_dir"], title, figures)

    stop = StopRequest()  # before the line below, which tells a watching process the loop is armed
    print(f"training a width-{config['width']} ResNet-18 on {data_name}: {len(train_images)} train / "
          f"{len(test_images)} test images, {total} iterations on {device}"
          f"{' (bf16, channels_last)' if bf16 and channels_last else ''}")
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
                loss, correct = train_step(train_model, optimizer, x, y, bf16)
                losses[step - first], accs[step - first] = loss, correct / len(y)
                iteration += 1
                if step + 1 == last or (step + 1 - first) % LOG_EVERY == 0 or stop.signal is not None:
                    new_losses = losses[done:step + 1 - first].tolist()
                    if not all(map(math.isfinite, new_losses)):
                        raise utils.UserError(
                            f"the loss became {new_losses[-1]} by iteration {iteration}; stopped without saving, "
                            f"so {ckpt_path} keeps the last good state; lower --lr and train again")
                    history["train_loss"] += new_losses
                    history["train_acc"] += accs[done:step + 1 - first].tolist()
                    bar.update(step + 1 - first - done)
                    bar.set_postfix(loss=f"{new_losses[-1]:.3f}", acc=f"{history['train_acc'][-1]:.3f}",
                                    lr=f"{optimizer.param_groups[0]['lr']:.2e}")
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
        stop.restore()
        writer.wait()  # whatever happened, the last good state is on disk before we exit
    if stop.signal is not None:
        print(f"stopped by signal {stop.signal} at iteration {iteration}: saved {ckpt_path}; "
              f"continue with --resume", file=sys.stderr)
        sys.exit(130)
    print(f"done in {time.time() - started:.0f} s: test accuracy {history['test_acc'][-1]:.4f}; "
          f"{ckpt_path}, {ckpt_path.with_suffix('.csv')} and the learning-progress figures in {config['figures_dir']}/")


if __name__ == "__main__":
    utils.run_cli(main)
