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
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

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
    offsets, flips = utils.draw_augmentation(num_images, g)
    return order, offsets, flips


def prepare_batch(images, index, offsets, flips, channels_last=False):
    """Gather uint8 images on their device, crop + flip, normalise: the network's input batch."""
    x = utils.normalize(utils.random_crop_flip(images[index], offsets, flips))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


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
def evaluate(model, images, labels, bf16=False, channels_last=False, batch_size=1000):
    """(accuracy as a fraction, mean cross-entropy) on a whole uint8 split."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    for start in range(0, len(images), batch_size):
        x = utils.normalize(images[start:start + batch_size])
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


def save_progress_figures(history, figures_dir, title):
    """The report's four learning-progress figures, against iterations."""
    from matplotlib.figure import Figure
    its = range(1, len(history["train_acc"]) + 1)
    curves = {
        "train_accuracy": (its, history["train_acc"], "train accuracy (per mini-batch)"),
        "train_loss": (*loss_per_100(history["train_loss"]), "train loss (mean of each 100 iterations)"),
        "test_accuracy": (history["test_iteration"], history["test_acc"], "test accuracy (whole test set)"),
        "test_loss": (history["test_iteration"], history["test_loss"], "test loss (whole test set)"),
    }
    Path(figures_dir).mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (x, y, ylabel) in curves.items():
        fig = Figure(figsize=(6, 4), dpi=100)
        ax = fig.add_subplot()
        ax.plot(list(x), list(y), lw=0.6 if name == "train_accuracy" else 1.5,
                marker="o" if name.startswith("test") else None, ms=3)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
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

    root = utils.dataset_root(config["data_dir"], config["synthetic"])
    train_images, train_labels, classes = utils.load_cifar10(root, train=True)
    test_images, test_labels, _ = utils.load_cifar10(root, train=False)
    config["classes"] = classes
    data_name = "synthetic gratings (NOT CIFAR-10)" if config["synthetic"] else f"CIFAR-10 from {root}"
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

    def save():
        utils.save_atomic(checkpoint_state(model, optimizer, scheduler, iteration, epoch, config, history), ckpt_path)
        write_history_csv(history, ckpt_path.with_suffix(".csv"))
        return f"checkpoint {ckpt_path} (iteration {iteration})"

    def evaluate_and_plot():
        acc, loss = evaluate(model, test_images, test_labels, bf16, channels_last)
        for key, value in zip(("test_iteration", "test_epoch", "test_acc", "test_loss"), (iteration, epoch, acc, loss)):
            history[key].append(value)
        save_progress_figures(history, config["figures_dir"], f"width-{config['width']} ResNet-18, {data_name}")
        return acc, loss

    stop = StopRequest()  # before the line below, which tells a watching process the loop is armed
    print(f"training a width-{config['width']} ResNet-18 on {data_name}: {len(train_images)} train / "
          f"{len(test_images)} test images, {total} iterations on {device}"
          f"{' (bf16, channels_last)' if bf16 and channels_last else ''}")
    bar = tqdm(total=total, initial=iteration, unit="it", dynamic_ncols=True, leave=False)
    started = time.time()
    try:
        while iteration < total and stop.signal is None:
            order, offsets, flips = (t.to(device) for t in epoch_plan(len(train_images), epoch, config["seed"]))
            first = iteration - epoch * steps_per_epoch
            last = min(steps_per_epoch, first + total - iteration)
            losses = torch.zeros(last - first, device=device)
            accs = torch.zeros(last - first, device=device)
            done = 0  # steps of this stretch whose loss/accuracy are already in history
            model.train()
            for step in range(first, last):
                batch = slice(step * config["batch_size"], (step + 1) * config["batch_size"])
                index = order[batch]
                x = prepare_batch(train_images, index, offsets[batch], flips[batch], channels_last)
                loss, correct = train_step(train_model, optimizer, x, train_labels[index], bf16)
                losses[step - first], accs[step - first] = loss, correct / len(index)
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
                acc, loss = evaluate_and_plot()
                bar.write(f"epoch {epoch} iteration {iteration}: test accuracy {acc:.4f}, test loss {loss:.4f}")
                save()
    finally:
        bar.close()
        stop.restore()
    if stop.signal is not None:
        print(f"stopped by signal {stop.signal}: saved {save()}; continue with --resume", file=sys.stderr)
        sys.exit(130)
    print(f"done in {time.time() - started:.0f} s: test accuracy {history['test_acc'][-1]:.4f}; "
          f"{ckpt_path}, {ckpt_path.with_suffix('.csv')} and the learning-progress figures in {config['figures_dir']}/")


if __name__ == "__main__":
    utils.run_cli(main)
