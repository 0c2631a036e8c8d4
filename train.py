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
import dataclasses
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoint
import cifar10
import data
import snapshots
import speed
import steps
import utils
from model import ResNet
from visualize.progress import PROGRESS_FIGURES, progress_title, save_progress_figures

LOG_EVERY = 50  # iterations between host syncs (progress bar, NaN check): fewer syncs, faster GPU
# The learning-progress figures are redrawn at most this often (and at the end): drawing four figures
# holds the GIL for ~1 s, which a GPU run of a few seconds an epoch would feel every epoch.
FIGURES_EVERY_S = 10


# --------------------------------------------------------------------------- arguments and config

def parse_args(argv=None):
    p = utils.OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Recipe flags default to None so that --resume can tell "not given" from "given".
    p.add_argument("--data-dir", help=f"folder holding cifar-10-batches-py/ (default: {steps.RECIPE['data_dir']}/)")
    p.add_argument("--synthetic", action="store_true", default=None,
                   help="train on synthetic gratings in the CIFAR-10 format (offline demo; NOT CIFAR-10)")
    p.add_argument("--epochs", type=int, help=f"epochs to train in all (default: {steps.RECIPE_EPOCHS})")
    p.add_argument("--iterations", type=int, help="stop after this many iterations in all (smoke runs)")
    p.add_argument("--batch-size", type=int, help=f"default: {steps.RECIPE['batch_size']}")
    p.add_argument("--lr", type=float, help=f"Adam learning rate (default: {steps.RECIPE['lr']})")
    p.add_argument("--weight-decay", type=float, help=f"Adam weight decay (default: {steps.RECIPE['weight_decay']})")
    p.add_argument("--lr-step-epochs", type=int, help=f"multiply the lr by --lr-gamma every this many "
                                                      f"epochs (default: {steps.RECIPE['lr_step_epochs']})")
    p.add_argument("--lr-gamma", type=float, help=f"default: {steps.RECIPE['lr_gamma']}")
    p.add_argument("--width", type=int, help=f"channels of conv1; later stages have 2x, 4x, 8x "
                                             f"(default: {steps.RECIPE['width']})")
    p.add_argument("--seed", type=int, help=f"default: {steps.RECIPE['seed']}")
    p.add_argument("--checkpoint", default="checkpoints/resnet18_cifar10.pt",
                   help="checkpoint to write, or to continue with --resume (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run in --checkpoint")
    p.add_argument("--snapshots", help=snapshots.HELP)
    p.add_argument("--overwrite", action="store_true", help="start a new run over an existing --checkpoint")
    p.add_argument("--figures-dir", help="where the learning-progress PNGs go (default: figures/; with --resume, "
                                         "the resumed run's)")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU, else an Apple GPU (mps), else the CPU), cpu, cuda, cuda:1, mps "
                                                      "(default: auto)")
    # Speed settings: None = decided by speed.py from what the device can do (and its probe).
    on = argparse.BooleanOptionalAction
    p.add_argument("--precision", choices=speed.PRECISIONS,
                   help="fp32, bf16 autocast, or fp16 autocast with a GradScaler (default: the device's)")
    p.add_argument("--bf16", action=on, help="--bf16 is --precision bf16, --no-bf16 is --precision fp32")
    p.add_argument("--channels-last", action=on, help="channels_last memory layout, else NCHW (default: the device's)")
    p.add_argument("--compile", action=on, help="torch.compile the model (default: off, but on a CPU the probe "
                                                "compiles a run of an hour or more where that saves more than it costs)")
    p.add_argument("--cuda-graph", action=on,
                   help="replay each training step (forward, backward, Adam) from a CUDA graph "
                        "(default: the device's; CUDA only)")
    p.add_argument("--show-settings", action="store_true",
                   help="print the speed settings this run would use here (after its probe) as one JSON line, "
                        "and exit without training. It reads no data: the run's length is counted in CIFAR-10's "
                        f"{cifar10.CIFAR10_TRAIN_IMAGES:,} training images (--synthetic: {cifar10.SYNTHETIC_TRAIN_IMAGES:,})")
    return p.parse_args(argv)


def asked_speed(args):
    """speed.SETTING_FIELDS -> what the command line gave, None where it gave nothing (--bf16 is a --precision)."""
    precision = args.precision
    if args.bf16 is not None:
        implied = "bf16" if args.bf16 else "fp32"
        if precision not in (None, implied):
            raise utils.UserError(f"--precision {precision} and --{'' if args.bf16 else 'no-'}bf16 disagree; "
                                  f"pass one of them")
        precision = implied
    return dict(precision=precision, channels_last=args.channels_last, cuda_graph=args.cuda_graph,
                compile=args.compile)


def open_checkpoint(args, ckpt_path):
    """The checkpoint --resume continues (None for a new run), after checking the path may be used."""
    if args.resume:
        if not ckpt_path.is_file():
            raise utils.UserError(f"--resume given, but there is no checkpoint at {ckpt_path}; "
                                  f"drop --resume to start a new run, or pass --checkpoint PATH")
        return checkpoint.read_checkpoint(ckpt_path, config_keys=(*steps.RECIPE, "epochs"), snapshot=False)
    if ckpt_path.exists() and not args.overwrite and not args.show_settings:
        raise utils.UserError(f"{ckpt_path} already exists; pass --resume to continue it, --overwrite "
                              f"to start over, or --checkpoint NEW_PATH")
    return None


def resolve_config(args, ckpt):
    """The run's config: the command line merged with the recipe defaults, or with the checkpoint being
    resumed. Paths are kept absolute, so plot scripts and resumed runs may start from elsewhere."""
    config = dict(ckpt["config"]) if ckpt else {}
    given = {key: getattr(args, key) for key in steps.RECIPE}
    if given["data_dir"] is not None:  # stored absolute, so compared absolute on --resume
        given["data_dir"] = str(Path(given["data_dir"]).resolve())
    for key, default in steps.RECIPE.items():
        if ckpt and given[key] is not None and given[key] != config[key]:
            flag = "--" + key.replace("_", "-")
            raise utils.UserError(f"{args.checkpoint} was made with {flag} {config[key]}, not {given[key]}; "
                                  f"drop {flag} to resume it, or train anew with another --checkpoint")
        if not ckpt:
            config[key] = default if given[key] is None else given[key]
    config["epochs"] = args.epochs if args.epochs is not None else config.get("epochs", steps.RECIPE_EPOCHS)
    config["iterations"] = args.iterations if args.iterations is not None else config.get("iterations")
    config["snapshots"] = snapshots.parse(args.snapshots or config.get("snapshots", snapshots.DEFAULT))
    for key in ("checkpoint", "device"):
        config[key] = getattr(args, key)
    # a resumed run keeps its own figures folder unless given another
    figures_dir = args.figures_dir if args.figures_dir is not None else config.get("figures_dir", "figures")
    config["figures_dir"] = str(Path(figures_dir).absolute())
    config["data_dir"] = str(Path(config["data_dir"]).resolve())
    utils.check_at_least(1, **{key: config[key] for key in ("epochs", "batch_size", "width", "lr_step_epochs")},
                         **({} if config["iterations"] is None else dict(iterations=config["iterations"])))
    if not (math.isfinite(config["lr"]) and config["lr"] > 0):
        raise utils.UserError(f"--lr must be a finite number above 0, got {config['lr']}; the recipe's is 1e-3")
    if not (math.isfinite(config["weight_decay"]) and config["weight_decay"] >= 0):
        raise utils.UserError(f"--weight-decay must be a finite number, 0 or above (0 turns it off), "
                              f"got {config['weight_decay']}; the recipe's is 5e-4")
    if not 0 < config["lr_gamma"] <= 1:
        raise utils.UserError(f"--lr-gamma must lie in (0, 1] (1 keeps the lr constant), got {config['lr_gamma']}; "
                              f"the recipe's is 0.5")
    return config


def run_length(config, steps_per_epoch):
    """The iterations the run trains in all: its epochs, cut at --iterations."""
    total = config["epochs"] * steps_per_epoch
    return total if config["iterations"] is None else min(total, config["iterations"])


# --------------------------------------------------------------------------- before any work: the outputs

def check_outputs(ckpt_path, figures_dir, keeps_snapshots=False):
    """UserError, before any work, unless the checkpoint, its history CSV, the figures and (where the run
    keeps snapshots) the snapshots' folder can all be written."""
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
    if keeps_snapshots:
        utils.check_writable(snapshots.folder(ckpt_path), "the snapshots' folder (--snapshots)", folder=True)
    for name in PROGRESS_FIGURES:
        utils.check_writable(figures_dir / f"{name}.png", "the figure")


# --------------------------------------------------------------------------- the run's parts

class StepLog:
    """Each step's loss and accuracy, kept on the device and read LOG_EVERY steps at a time (one host sync)."""

    def __init__(self, device):
        self.losses = torch.zeros(LOG_EVERY, device=device)
        self.accs = torch.zeros(LOG_EVERY, device=device)
        self.count = 0

    def add(self, loss, correct, batch):
        self.losses[self.count], self.accs[self.count] = loss, correct / batch
        self.count += 1

    @property
    def full(self):
        return self.count == LOG_EVERY

    def take(self):
        """(losses, accuracies) logged since the last take, as floats."""
        count, self.count = self.count, 0
        return self.losses[:count].tolist(), self.accs[:count].tolist()


# What asks a run to stop: Ctrl-C everywhere, a scheduler's SIGTERM (Linux, macOS), Ctrl-Break (Windows).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGBREAK") if hasattr(signal, name))


class StopRequest:
    """Turns the first stop signal (STOP_SIGNALS: Ctrl-C, SIGTERM, Ctrl-Break) into a flag, so the loop
    can save a checkpoint and exit.

    A second one exits at once with os._exit, after saying what is on disk (`on_disk()`) and releasing
    the checkpoint's claim (`release()`): no exception unwinds and no interpreter shutdown runs, so the
    exit cannot hang wherever the signal lands (an exception raised while the writer's thread starts
    can leave a job that never runs, waited for forever). A save in progress is abandoned: save_atomic
    leaves the previous checkpoint whole.
    """

    def __init__(self, on_disk, release):
        self.signal = None
        self.on_disk, self.release = on_disk, release  # release: the checkpoint's claim, before os._exit
        self.previous = {s: signal.signal(s, self.handle) for s in STOP_SIGNALS}

    def handle(self, signum, frame):
        if self.signal is None:
            self.signal = signum
            return
        try:
            sys.stdout.flush()
            print(f"\nstopped at once by a second signal ({signum}): {self.on_disk()}", file=sys.stderr, flush=True)
        finally:
            self.release()  # os._exit skips every finally
            os._exit(130)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def exit(self, message):
        """The last words of a stopped run, then exit status 130 at once. Stop signals are ignored first, so
        a second one arriving now neither adds a line nor lands in the interpreter's shutdown."""
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        sys.stdout.flush()
        print(message, file=sys.stderr, flush=True)
        self.release()  # os._exit skips every finally
        os._exit(130)


def write_outputs(state, ready, ckpt_path, figures_dir, title, figures, saved):
    """On the writer's thread: once the snapshot is whole (ready), the checkpoint, then saved(iteration),
    the history CSV and (with figures) the figures."""
    ready()
    state = checkpoint.portable(state)
    checkpoint.save_atomic(state, ckpt_path)
    saved(state["iteration"])
    checkpoint.write_history_csv(state["history"], ckpt_path.with_suffix(".csv"))
    if figures:
        save_progress_figures(state["history"], figures_dir, title)


# --------------------------------------------------------------------------- the recipe

def main(argv=None):
    args = parse_args(argv)
    ckpt_path = Path(args.checkpoint)
    if args.resume and args.overwrite:
        raise utils.UserError("--resume continues the run in --checkpoint, --overwrite starts a new one over it; "
                              "pass one of them")
    if ckpt_path.is_dir():
        utils.check_writable(ckpt_path, "--checkpoint")  # says: a folder where the file must go
    with nullcontext() if args.show_settings else checkpoint.Claim(ckpt_path) as claim:  # one run a checkpoint
        ckpt = open_checkpoint(args, ckpt_path)
        config = resolve_config(args, ckpt)
        if not args.show_settings:  # it writes nothing
            check_outputs(ckpt_path, config["figures_dir"], config["snapshots"] != snapshots.NONE)
        device, device_reason = speed.device_choice(config["device"])
        speed.use_device(device)
        caps = speed.detect(device)
        asked = asked_speed(args)
        # before any data: settings that cannot run here are refused, and memory is counted for the candidates
        candidates = speed.plan_for(asked, ckpt and ckpt["config"], caps).candidates
        steps.check_memory(config, device, cuda_graph=any(c.cuda_graph for c in candidates))
        done = ckpt["iteration"] if ckpt else 0
        if args.show_settings:  # before any data is read or downloaded: counted in the data it would train on
            images = cifar10.SYNTHETIC_TRAIN_IMAGES if config["synthetic"] else cifar10.CIFAR10_TRAIN_IMAGES
            classes = len(ckpt["config"]["classes"]) if ckpt else len(cifar10.CIFAR10_CLASSES)
            left = max(0, run_length(config, data.batches_per_epoch(images, config["batch_size"])) - done)
            settings, record = speed.decide(asked, ckpt and ckpt["config"], caps, left,
                                            steps.probe_measure(config, device, classes), device_reason)
            print(json.dumps(dict(device=str(device), **dataclasses.asdict(settings), reason=record["speed_reason"],
                                  probe=record["speed_probe"])))
            return

        # the data
        root = cifar10.dataset_root(config["data_dir"], config["synthetic"])
        train_images, train_labels, classes = cifar10.load_cifar10(root, train=True)
        test_images, test_labels, _ = cifar10.load_cifar10(root, train=False)
        steps_per_epoch = data.batches_per_epoch(len(train_images), config["batch_size"])
        total = run_length(config, steps_per_epoch)
        snapshot_epochs = snapshots.chosen_epochs(config["snapshots"], snapshots.run_epochs(total, steps_per_epoch))
        if done >= total:
            raise utils.UserError(f"{ckpt_path} has already finished {done} iterations ({ckpt['epoch']} epochs); "
                                  f"pass a larger --epochs or --iterations to train further")

        # the speed settings: before the run seeds torch, as the probe's models draw their weights from it
        settings, record = speed.decide(asked, ckpt and ckpt["config"], caps, total - done,
                                        steps.probe_measure(config, device, len(classes)), device_reason)
        config = dict(config, device=str(device), classes=classes,  # "auto" as resolved
                      data_name=cifar10.describe_dataset(root, config["synthetic"]), **record)
        train_images, train_labels, test_images, test_labels = (
            t.to(device) for t in (train_images, train_labels, test_images, test_labels))

        # the model and its optimizer, new or resumed
        torch.manual_seed(config["seed"])
        model = (checkpoint.build_model(ckpt, ckpt_path) if ckpt else ResNet(config["width"], len(classes))).to(device)
        if settings.channels_last:
            model.to(memory_format=torch.channels_last)
        optimizer, scheduler = steps.make_optimizer(model, config, settings.cuda_graph)
        scaler = speed.grad_scaler(device, settings.precision)
        history, iteration, epoch = checkpoint.new_history(), 0, 0
        last_save = checkpoint.LastSave(ckpt_path)
        if ckpt:
            checkpoint.resume(ckpt, optimizer, scheduler, scaler)
            history, iteration, epoch = ckpt["history"], ckpt["iteration"], ckpt["epoch"]
            last_save.saved(iteration)
        step = steps.make_step(model, optimizer, settings, scaler, say=tqdm.write)
        keep = snapshots.Keeper(ckpt_path, snapshot_epochs, steps_per_epoch, total, fresh=not ckpt)
        def evaluate():  # the whole test split, as every epoch's end and the snapshots take it
            return steps.evaluate(model, test_images, test_labels, settings.precision, settings.channels_last)
        writer, title, drawn = checkpoint.BackgroundWriter(), progress_title(config), None

        def save(figures=True):
            """Hand a snapshot to the writer's thread; the figures at most every FIGURES_EVERY_S, and at the end."""
            nonlocal drawn
            figures = figures and (iteration == total or drawn is None or time.monotonic() - drawn >= FIGURES_EVERY_S)
            if figures:
                drawn = time.monotonic()
            # a graph dropped: that batch size (or, with none left, the run) went on eagerly, and says so
            dropped = getattr(step, "dropped", None)
            why = dropped or "; ".join(getattr(step, "eager", {}).values())
            run_config = dict(config, cuda_graph=not dropped, speed_reason=f"{config['speed_reason']}; {why}") \
                if why else config
            state, ready = checkpoint.snapshot(checkpoint.state_of(model, optimizer, scheduler, scaler, iteration,
                                                                   epoch, run_config, history))
            writer.submit(write_outputs, state, ready, ckpt_path, config["figures_dir"], title, figures,
                          last_save.saved)

        def log(steps_logged):
            """Move the steps logged into the history and the bar; UserError if the loss went NaN or inf."""
            losses, accs = steps_logged.take()
            if not losses:  # the stretch's last step filled the log, which was read then
                return
            if not all(map(math.isfinite, losses)):
                writer.wait()  # a save in flight lands first, so the message says what is on disk
                raise utils.UserError(f"the loss became {losses[-1]} by iteration {iteration}; stopped without "
                                      f"saving it: {last_save.describe()}; lower --lr and train again")
            history["train_loss"] += losses
            history["train_acc"] += accs
            bar.update(len(losses))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{accs[-1]:.3f}",
                            lr=f"{float(optimizer.param_groups[0]['lr']):.2e}")

        # installed before the line below, which tells a watching process the loop is armed
        stop = StopRequest(lambda: last_save.describe() + ("; continue with --resume"
                                                           if last_save.iteration is not None else ""), claim.release)
        print(f"training a width-{config['width']} ResNet-18 on {config['data_name']}: {len(train_images)} train / "
              f"{len(test_images)} test images, {total} iterations on {device}: {settings.label()} "
              f"({config['speed_reason']})")
        bar = tqdm(total=total, initial=iteration, unit="it", dynamic_ncols=True, leave=False)
        started = time.time()
        steps_logged, stopping = StepLog(device), False
        try:
            if iteration == 0:
                keep.start(model, config, history, evaluate)  # epoch 0: the initial weights, written with the first save
            # the loop: the rest of the current epoch, then whole epochs, the last one cut at `total`
            while iteration < total and not stopping:
                first = iteration - epoch * steps_per_epoch
                last = min(steps_per_epoch, first + total - iteration)
                model.train()
                for x, y in data.epoch_batches(train_images, train_labels, epoch, config["seed"],
                                               config["batch_size"], settings.channels_last, first, last):
                    steps_logged.add(*step(x, y), len(y))
                    iteration += 1
                    stopping = stop.signal is not None  # the one place a stop is noticed
                    if steps_logged.full or stopping:
                        log(steps_logged)
                    if stopping:
                        break
                else:  # the epoch, or the run, is finished
                    log(steps_logged)
                    if last == steps_per_epoch:  # a whole epoch: the lr decays on its schedule
                        epoch += 1
                        scheduler.step()
                    if last == steps_per_epoch or iteration == total:
                        acc, loss = evaluate()
                        for key, value in zip(("test_iteration", "test_epoch", "test_acc", "test_loss"),
                                              (iteration, epoch, acc, loss)):
                            history[key].append(value)
                        bar.write(f"epoch {epoch} iteration {iteration}: test accuracy {acc:.4f}, test loss {loss:.4f}")
                        save()
                        keep(model, iteration, config, history, evaluate)
            if stopping:
                save(figures=False)
                keep.flush()
        finally:
            bar.close()
            try:
                writer.wait()  # whatever happened, the last good state is on disk before we exit
            finally:
                if stop.signal is None:
                    stop.restore()  # a stopped run keeps its handler to its end: a second signal exits at once
        if stopping:
            stop.exit(f"stopped by signal {stop.signal} at iteration {iteration}: saved {ckpt_path}; "
                      f"continue with --resume")
    print(f"done in {time.time() - started:.0f} s: test accuracy {history['test_acc'][-1]:.4f}; "
          f"{ckpt_path}, {ckpt_path.with_suffix('.csv')} and the learning-progress figures in {config['figures_dir']}/")


if __name__ == "__main__":
    utils.run_cli(main)
