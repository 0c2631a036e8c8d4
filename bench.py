"""How fast train.py trains, next to the report's tutorial-style pipeline, on one device.

    python bench.py --quick          # a short run: about a minute on 2 CPU cores
    python bench.py                  # the full run on the default device (cuda if available)
    python bench.py --device cuda    # the GPU figures for docs/performance.md
    python bench.py --all-rows       # also the rows that cannot be fast here (bf16 on an AVX2 CPU, ...)
    python bench.py --feature-vis    # only: plot_feature_visualization.py's optimisation at width 64

It first says what the device can do (speed.detect; fp32 and bf16 matmul GFLOP/s). On 50,000
CIFAR-shaped random images (random content: speed does not depend on it) and the same ResNet-18, it
then measures side by side

  tutorial   the report's pipeline, the PyTorch CIFAR-10 tutorial: a Dataset of PIL images,
             RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize, a DataLoader
             with 2 workers, batches copied to the device, fp32, loss.item() every step;
  fp32, fp32_cl, bf16, bf16_cl, fp16, ... (+ _graph, _compile)
             train.py's pipeline (uint8 data on the device, batches gathered, cropped, flipped and
             normalised there: train.epoch_batches + train.make_step) under each setting: precision,
             channels_last, a CUDA graph (speed.GraphedStep; CUDA only, the capture time shown apart),
             torch.compile (CUDA only, its compile time shown apart). By default only the rows that
             speed.plan leaves on this device (what can be fast here); --all-rows measures the rest;
  train_py   exactly what train.py chooses here for the full recipe at --width and --batch-size: its
             rules and its probe (speed.choose), so "train.py's choice / the fastest row" is one line.

Every row trains with the same train.train_step and Adam (train.make_optimizer): only the input
pipeline and the numeric settings differ. Training throughput is the median images/s of several
timed windows after a warm-up (CUDA is synchronised at each window's edges); evaluation throughput
is train.evaluate (for the tutorial row: the tutorial's test loop) on the test images. The projected
wall time of the full recipe is 52 epochs x 50,000 images (20,332 iterations at batch 128) at the
training throughput, plus one 10,000-image test evaluation per epoch, plus the compile or capture time
(compile_s in the JSON). Per-epoch
costs outside the two loops (checkpoint writes, DataLoader worker start-up) are not in it.

Last, scoring.top_activating (batched) is timed against the report's one-image-at-a-time loop, and
their top-k indices are compared. All figures go to a JSON file (--json; a --quick run writes
bench_<device>_quick.json, so it never overwrites the full run's bench_<device>.json).
"""
import argparse
import dataclasses
import datetime
import itertools
import json
import platform
import statistics
import time

import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms
from tqdm import tqdm

import data
import speed
import train
import utils
from visualize import cli, featurevis, scoring
from model import STAGES, ResNet

# The full recipe the throughputs are projected to: train.py's defaults on CIFAR-10.
RECIPE_EPOCHS = train.DEFAULT_EPOCHS                  # 52
RECIPE_TRAIN_IMAGES = 50_000
RECIPE_TEST_IMAGES = 10_000
RECIPE_BATCH = train.RECIPE["batch_size"]             # 128
RECIPE_ITERATIONS = RECIPE_EPOCHS * -(-RECIPE_TRAIN_IMAGES // RECIPE_BATCH)  # 20,332

TUTORIAL = "tutorial"
CHOICE = "train_py"

# Window settings: (warm-up steps, windows, steps a window, eval images, top_activating images).
# A CPU step at width 64 takes ~0.4-0.8 s on 2 Xeon cores, ~1.9 s on 2 AVX2 EPYC cores; a CUDA step a few ms.
SETTINGS = {
    ("cpu", True): (1, 3, 1, 500, 300),
    ("cpu", False): (3, 7, 4, RECIPE_TEST_IMAGES, RECIPE_TEST_IMAGES),
    ("cuda", True): (20, 3, 30, RECIPE_TEST_IMAGES, 2000),
    ("cuda", False): (30, 5, 100, RECIPE_TEST_IMAGES, RECIPE_TEST_IMAGES),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--quick", action="store_true", help="fewer and shorter windows, fewer eval/top_activating images")
    p.add_argument("--width", type=int, default=train.RECIPE["width"], help="ResNet width (default: %(default)s)")
    p.add_argument("--images", type=int, default=RECIPE_TRAIN_IMAGES, help="training images (default: %(default)s)")
    p.add_argument("--test-images", type=int, default=RECIPE_TEST_IMAGES, help="test images (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=RECIPE_BATCH, help="default: %(default)s (the recipe's)")
    p.add_argument("--workers", type=int, default=2,
                   help="tutorial DataLoader workers (default: %(default)s, the report's)")
    p.add_argument("--warmup", type=int, help="untimed steps before the windows (default: by device and --quick)")
    p.add_argument("--windows", type=int, help="timed windows per row; the median is reported (default: by device)")
    p.add_argument("--window-steps", type=int, help="training steps a window (default: by device and --quick)")
    p.add_argument("--eval-images", type=int, help="test images evaluated per row, projected to 10,000 "
                                                   "(default: all, 500 with --quick on CPU)")
    p.add_argument("--top-images", type=int, help="images for the top_activating comparison "
                                                  "(default: all, fewer with --quick)")
    p.add_argument("--layer", default="conv5_x",  # where plot_gradient_pattern.py searches
                   help=f"top_activating layer, one of {', '.join(STAGES)} (default: %(default)s)")
    p.add_argument("--channel", type=int, default=0, help="top_activating channel (default: %(default)s)")
    p.add_argument("--k", type=int, default=9, help="top_activating k (default: %(default)s)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile row on CUDA")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false", help="skip the CUDA-graph rows on CUDA")
    p.add_argument("--all-rows", action="store_true",
                   help="also measure the rows that cannot be fast on this device (by default skipped)")
    p.add_argument("--seed", type=int, default=0, help="data, weights and augmentation (default: %(default)s)")
    p.add_argument("--json", help="where the figures go (default: bench_<device type>.json, with --quick "
                                  "bench_<device type>_quick.json, so a quick check never overwrites a full run's)")
    p.add_argument("--feature-vis", action="store_true",
                   help="instead of the table: time plot_feature_visualization.py's optimisation (16 conv5_x "
                        "channels, its default steps) at --width, and print it")
    return p.parse_args(argv)


def resolve_settings(args, device):
    """Fill the window settings left unset from SETTINGS; refuse values that cannot be measured."""
    defaults = SETTINGS[("cuda" if device.type == "cuda" else "cpu", args.quick)]
    for name, default in zip(("warmup", "windows", "window_steps", "eval_images", "top_images"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, min(default, args.test_images) if name.endswith("images") else default)
    for name in ("width", "images", "test_images", "batch_size", "windows", "window_steps", "eval_images",
                 "top_images", "k"):
        if getattr(args, name) < 1:
            raise utils.UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.workers < 0:
        raise utils.UserError("--warmup and --workers must be at least 0")
    if args.images < args.batch_size:
        raise utils.UserError(f"--images ({args.images}) must be at least --batch-size ({args.batch_size})")
    for name in ("eval_images", "top_images", "k"):
        if getattr(args, name) > args.test_images:
            raise utils.UserError(f"--{name.replace('_', '-')} must be in 1..{args.test_images} "
                                  f"(--test-images), got {getattr(args, name)}")
    cli.check_layer(args.layer)
    cli.check_channel(ResNet(args.width), args.layer, args.channel)


# --------------------------------------------------------------------------- the tutorial's pipeline

class ArrayCIFAR(Dataset):
    """What torchvision.datasets.CIFAR10 does, over arrays in memory: a PIL image per item, then transforms."""

    def __init__(self, images, labels, transform):
        self.data = images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C) uint8, as CIFAR10.data
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def tutorial_transform(train_split):
    normalize = transforms.Normalize(data.CIFAR10_MEAN, data.CIFAR10_STD)
    if not train_split:
        return transforms.Compose([transforms.ToTensor(), normalize])
    return transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), normalize])


def tutorial_loader(images, labels, train_split, batch_size, workers):
    dataset = ArrayCIFAR(images.cpu(), labels.cpu(), tutorial_transform(train_split))
    return DataLoader(dataset, batch_size=batch_size, shuffle=train_split, num_workers=workers)


def tutorial_batches(loader, device):
    """The tutorial's loop: a fresh pass over the DataLoader each epoch, each batch copied to the device."""
    while True:
        for x, y in loader:
            yield x.to(device), y.to(device)


@torch.no_grad()
def tutorial_evaluate(model, loader, device):
    """The tutorial's test loop: the test DataLoader, fp32, a host sync per batch for the count."""
    model.eval()
    correct = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        correct += (model(x).argmax(1) == y).sum().item()
    model.train()
    return correct / len(loader.dataset)


# --------------------------------------------------------------------------- train.py's pipeline

def trainpy_batches(images, labels, batch_size, seed, channels_last):
    """train.py's loop, epoch after epoch: each batch gathered and augmented on the device."""
    for epoch in itertools.count():
        yield from train.epoch_batches(images, labels, epoch, seed, batch_size, channels_last)


# --------------------------------------------------------------------------- timing

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(step, batches, device, warmup, windows, window_steps, bar):
    """Images/s of each timed window of `window_steps` calls of step(x, y) on the next batches."""
    for _ in range(warmup):
        step(*next(batches))
        bar.update()
    sync(device)
    rates = []
    for _ in range(windows):
        images = 0
        start = time.perf_counter()
        for _ in range(window_steps):
            x, y = next(batches)
            step(x, y)
            images += len(y)
            bar.update()
        sync(device)
        rates.append(images / (time.perf_counter() - start))
    return rates


def time_call(fn, device):
    """(result, seconds) of fn(), with the device's queued work included."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def new_model(args, device, channels_last, cuda_graph=False):
    torch.manual_seed(args.seed)  # every row starts from the same weights
    model = ResNet(args.width).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer, _ = train.make_optimizer(model, train.RECIPE, cuda_graph)
    return model, optimizer


def row_key(settings):
    """fp32, bf16_cl, bf16_cl_graph, ...: a row's name from its speed.Settings."""
    return (settings.precision + "_cl" * settings.channels_last + "_graph" * settings.cuda_graph
            + "_compile" * settings.compile)


def table_rows(caps):
    """Every setting of train.py's pipeline the table knows for this kind of device, in its order: each
    precision (fp16 only on CUDA: on a CPU it is there for correctness, not speed), each layout, eager or
    (CUDA) graphed, and on CUDA torch.compile at the rules' precision."""
    cuda = caps.kind == "cuda"
    rows = []
    for precision in ("fp32", "bf16", "fp16") if cuda else ("fp32", "bf16"):
        for channels_last in (False, True):
            for graph in (False, True) if cuda and precision != "fp16" else (False,):
                rows.append(speed.Settings(precision, channels_last, graph))
    if cuda:
        rows.append(speed.Settings(speed.ruled_precisions(caps)[0][0], True, False, True))
    return rows


def skip_reason(settings, fast, args, cuda):
    """Why a row is not measured (None: it is): slow here, or a row turned off by a flag."""
    if settings.cuda_graph and not args.cuda_graph:
        return "skipped (--no-cuda-graph)"
    if settings.compile:
        return None if cuda and args.compile else "skipped (--no-compile)"
    if settings not in fast and not args.all_rows:
        return "skipped: cannot be fast here (speed.plan rules it out); --all-rows measures it"
    return None


def measure_row(label, pipeline, settings, args, device, splits, bar):
    """Training and evaluation throughput of one row, and its projected recipe wall time."""
    train_images, train_labels, test_images, test_labels = splits
    model, optimizer = new_model(args, device, settings.channels_last, settings.cuda_graph)

    if pipeline == TUTORIAL:
        loader = tutorial_loader(train_images, train_labels, True, args.batch_size, args.workers)
        batches = tutorial_batches(loader, device)

        def step(x, y):
            loss, _ = train.train_step(model, optimizer, x, y)
            loss.item()  # the tutorial's `running_loss += loss.item()`: a host sync every step
    else:
        batches = trainpy_batches(train_images, train_labels, args.batch_size, args.seed, settings.channels_last)
        step = train.make_step(model, optimizer, settings, speed.grad_scaler(device, settings.precision),
                               say=lambda line: bar.write(line))

    compile_s = None
    if settings.compile or settings.cuda_graph:
        # Both shapes of the recipe compile (or are captured): the full batch and each epoch's last, partial one.
        partial = len(train_images) % args.batch_size or args.batch_size
        x, y = next(batches)
        _, full_s = time_call(lambda: step(x, y), device)
        _, partial_s = time_call(lambda: step(x[:partial], y[:partial]), device)
        compile_s = full_s + partial_s
    rates = time_training(step, batches, device, args.warmup, args.windows, args.window_steps, bar)
    del batches  # stops the tutorial's DataLoader workers before the evaluation

    bar.set_postfix_str("evaluating")
    n = args.eval_images
    if pipeline == TUTORIAL:
        test_loader = tutorial_loader(test_images[:n], test_labels[:n], False, args.batch_size, args.workers)
        _, eval_s = time_call(lambda: tutorial_evaluate(model, test_loader, device), device)
    else:
        evaluate = lambda m: train.evaluate(model, test_images[:m], test_labels[:m], settings.precision,
                                            settings.channels_last)
        evaluate(min(200, n))  # warm-up
        _, eval_s = time_call(lambda: evaluate(n), device)
    bar.update()
    bar.set_postfix_str("")

    train_rate = statistics.median(rates)
    eval_rate = n / eval_s
    train_s = RECIPE_EPOCHS * RECIPE_TRAIN_IMAGES / train_rate
    eval_total_s = RECIPE_EPOCHS * RECIPE_TEST_IMAGES / eval_rate
    return dict(label=label, pipeline=pipeline, **dataclasses.asdict(settings),
                graph_dropped=getattr(step, "dropped", None),
                train_images_per_s=train_rate, window_images_per_s=rates, eval_images=n,
                eval_images_per_s=eval_rate, compile_s=compile_s, projected_train_s=train_s,
                projected_eval_s=eval_total_s, projected_s=train_s + eval_total_s + (compile_s or 0.0))


# --------------------------------------------------------------------------- top_activating

@torch.inference_mode()
def per_image_top(model, images, layer, channel, k):
    """The report's approach: one image at a time through the network, the channel's map summed."""
    scores = torch.empty(len(images))
    for i in tqdm(range(len(images)), desc="per-image loop", unit="img", leave=False, dynamic_ncols=True):
        with model.capture(layer) as acts:
            model(data.normalize(images[i:i + 1]))
        scores[i] = acts[layer][0, channel].sum().item()  # a host sync per image, as in the report
    top = scores.topk(k)
    return top.indices, top.values


def matmul_gflop_per_s(device, n=4096, repeats=5, dtype=torch.float32):
    """GFLOP/s of a large square matmul in dtype: about the most this device's arithmetic gives."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    _, seconds = time_call(lambda: [a @ b for _ in range(repeats)], device)
    return 2 * n ** 3 * repeats / seconds / 1e9


def measure_top_activating(args, device, test_images, peak_gflop_per_s):
    model, _ = new_model(args, device, channels_last=False)
    model.eval()
    images = test_images[:args.top_images]
    scoring.top_activating(model, images[:min(len(images), 100)], args.layer, args.channel)  # warm-up
    (batched_idx, batched_scores), batched_s = time_call(
        lambda: scoring.top_activating(model, images, args.layer, args.channel, k=args.k), device)
    (loop_idx, loop_scores), loop_s = time_call(
        lambda: per_image_top(model, images, args.layer, args.channel, args.k), device)
    batched_idx, batched_scores = torch.as_tensor(batched_idx).cpu(), torch.as_tensor(batched_scores).float().cpu()
    # The arithmetic the batched pass must do bounds its speed: its FLOP rate, next to the device's
    # peak, says how much faster it could still get.
    with FlopCounterMode(display=False) as flops, torch.inference_mode():
        scoring.stage_output(model, data.normalize(images[:1].to(device)), args.layer)
    gflop = flops.get_total_flops() * len(images) / 1e9
    return dict(status="measured", layer=args.layer, channel=args.channel, k=args.k, images=len(images),
                batched_s=batched_s, per_image_s=loop_s, speedup=loop_s / batched_s,
                gflop=gflop, batched_gflop_per_s=gflop / batched_s, matmul_gflop_per_s=peak_gflop_per_s,
                batched_images_per_s=len(images) / batched_s, per_image_images_per_s=len(images) / loop_s,
                same_indices=sorted(batched_idx.tolist()) == sorted(loop_idx.tolist()),
                max_score_rel_diff=((batched_scores.sort().values - loop_scores.sort().values).abs().max()
                                    / loop_scores.abs().max().clamp_min(1e-12)).item())


# --------------------------------------------------------------------------- feature visualization

def measure_feature_visualization(args, device, channels=16):
    """Seconds for plot_feature_visualization.py's optimisation with its defaults (all channels as
    one batch), on a ResNet of --width with its initial weights (speed does not depend on them) and
    unit colour statistics; a 4-step warm-up first. Python start-up, loading the checkpoint and
    drawing are not in it: time the script itself for those (see the README)."""
    model, _ = new_model(args, device, channels_last=False)
    model.eval()
    colour = (torch.full((3,), 0.5), torch.eye(3) / 16)
    run = lambda steps: featurevis.feature_visualization(model, "conv5_x", list(range(channels)), colour, steps=steps)
    run(4)
    _, seconds = time_call(lambda: run(featurevis.FV_STEPS), device)
    result = dict(device=str(device), device_name=device_name(device), threads=torch.get_num_threads(),
                  width=args.width, layer="conv5_x", channels=channels, steps=featurevis.FV_STEPS, seconds=seconds,
                  seconds_per_step=seconds / featurevis.FV_STEPS)
    print(f"feature visualization on {result['device_name']}: {channels} conv5_x channels of a width-{args.width} "
          f"ResNet-18, {featurevis.FV_STEPS} steps: {seconds:.1f} s ({1000 * seconds / featurevis.FV_STEPS:.0f} ms a step)")
    return result


# --------------------------------------------------------------------------- report

def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{speed.cpu_model()} ({torch.get_num_threads()} threads)"


def capabilities(device, caps):
    """What the device can do, for the report: speed.detect's view and the fp32 and bf16 matmul rates
    (on a CPU n = 1024 for fp32 and 512 for bf16, where an emulated bf16 matmul runs at ~1 GFLOP/s)."""
    cuda = device.type == "cuda"
    sizes = dict(fp32=4096 if cuda else 1024, bf16=4096 if cuda else 512)
    return dict(dataclasses.asdict(caps), described=caps.describe(), matmul_n=sizes,
                fp32_matmul_gflop_per_s=matmul_gflop_per_s(device, sizes["fp32"], repeats=3),
                bf16_matmul_gflop_per_s=matmul_gflop_per_s(device, sizes["bf16"], repeats=3, dtype=torch.bfloat16))


def duration(seconds):
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 3 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def print_table(result):
    print(f"\n{result['device_name']} | torch {result['torch']} | width {result['width']} | "
          f"{result['date']}")
    print(f"full recipe: {RECIPE_ITERATIONS:,} iterations at batch {RECIPE_BATCH} + {RECIPE_EPOCHS} evaluations "
          f"of {RECIPE_TEST_IMAGES:,} images\n")
    header = (f"{'pipeline':40} {'train img/s':>12} {'(min-max)':>13} {'x tutorial':>10} {'eval img/s':>11} "
              f"{'setup':>8} {'full recipe':>12}")
    print(header)
    print("-" * len(header))
    tutorial = result["rows"].get(TUTORIAL, {}).get("train_images_per_s")
    for key, row in result["rows"].items():
        label = row["label"]
        if "train_images_per_s" not in row:
            print(f"{label:40} {row['status']}")
            continue
        spread = f"({min(row['window_images_per_s']):.0f}-{max(row['window_images_per_s']):.0f})"
        ratio = f"{row['train_images_per_s'] / tutorial:.2f}" if tutorial else "-"
        compile_s = duration(row["compile_s"]) if row["compile_s"] is not None else "-"
        print(f"{label:40} {row['train_images_per_s']:12.1f} {spread:>13} {ratio:>10} "
              f"{row['eval_images_per_s']:11.1f} {compile_s:>8} {duration(row['projected_s']):>12}")
    print(f"\ntrain.py's choice here: {result['choice']['label']} ({result['choice']['reason']})")
    if result["choice_vs_fastest"] is not None:
        print(f"train.py's choice trains at {result['choice_vs_fastest']:.2f}x the fastest row measured "
              f"({result['fastest_row']})")
    top = result["top_activating"]
    print(f"\ntop_activating ({top['layer']} channel {top['channel']}, k={top['k']}, {top['images']:,} images): "
          f"batched {top['batched_s']:.2f} s, per-image loop {top['per_image_s']:.2f} s, "
          f"{top['speedup']:.1f}x; same top-{top['k']}: {top['same_indices']}; "
          f"{top['gflop']:,.0f} GFLOP, batched at {top['batched_gflop_per_s']:.0f} GFLOP/s "
          f"(an fp32 matmul here: {top['matmul_gflop_per_s']:.0f})")


def json_path(args, device):
    """Where the figures go: --json, else bench_cpu.json / bench_cuda.json, or bench_cpu_quick.json with --quick."""
    return args.json or f"bench_{device.type}{'_quick' if args.quick else ''}.json"


def main(argv=None):
    args = parse_args(argv)
    device = utils.resolve_device(args.device)
    speed.use_device(device)
    resolve_settings(args, device)
    if args.feature_vis:
        return measure_feature_visualization(args, device)
    cuda = device.type == "cuda"

    g = torch.Generator().manual_seed(args.seed)
    train_images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=g)
    train_labels = torch.randint(0, 10, (args.images,), generator=g)
    test_images = torch.randint(0, 256, (args.test_images, 3, 32, 32), dtype=torch.uint8, generator=g)
    test_labels = torch.randint(0, 10, (args.test_images,), generator=g)
    splits = tuple(t.to(device) for t in (train_images, train_labels, test_images, test_labels))

    result = dict(device=str(device), device_name=device_name(device), torch=torch.__version__,
                  torchvision=torchvision.__version__, python=platform.python_version(),
                  date=datetime.datetime.now().isoformat(timespec="seconds"), threads=torch.get_num_threads(),
                  width=args.width, settings={k: v for k, v in vars(args).items() if k != "json"},
                  recipe=dict(epochs=RECIPE_EPOCHS, iterations=RECIPE_ITERATIONS, batch_size=RECIPE_BATCH,
                              train_images=RECIPE_TRAIN_IMAGES, test_images=RECIPE_TEST_IMAGES),
                  rows={})
    print(f"benchmarking on {result['device_name']}: {args.images:,} train / {args.test_images:,} test "
          f"random images, width {args.width}, {args.windows} windows of {args.window_steps} steps")
    caps = speed.detect(device)
    result["capabilities"] = can = capabilities(device, caps)
    print(f"this device: {can['described']}; square matmul: fp32 {can['fp32_matmul_gflop_per_s']:.0f} GFLOP/s, "
          f"bf16 {can['bf16_matmul_gflop_per_s']:.1f} GFLOP/s")
    result["top_activating"] = measure_top_activating(args, device, splits[2], can["fp32_matmul_gflop_per_s"])

    # train.py's choice for the full recipe at this width and batch: its rules, then its probe
    plan = speed.plan(caps, {})
    recipe_config = dict(train.RECIPE, width=args.width, batch_size=args.batch_size)
    started = time.perf_counter()
    choice, probe, reason = speed.choose(plan, RECIPE_EPOCHS * -(-RECIPE_TRAIN_IMAGES // args.batch_size),
                                         train.probe_measure(recipe_config, device, 10))
    result["choice"] = dict(dataclasses.asdict(choice), label=choice.label(), reason=reason, probe=probe,
                            probe_s=time.perf_counter() - started)

    rows = [(TUTORIAL, "tutorial pipeline (the report's)", TUTORIAL, speed.Settings())]
    rows += [(row_key(s), f"train.py pipeline, {s.label()}", "train.py", s) for s in table_rows(caps)]
    rows.append((CHOICE, f"train.py's choice: {choice.label()}", "train.py", choice))
    steps = args.warmup + args.windows * args.window_steps + 1  # + 1 for the evaluation
    for key, label, pipeline, settings in rows:
        why = None if pipeline == TUTORIAL or key == CHOICE else skip_reason(settings, set(plan.candidates), args, cuda)
        if why is not None:
            result["rows"][key] = dict(label=label, status=why)
            continue
        with tqdm(total=steps, desc=key, unit="step", leave=False, dynamic_ncols=True) as bar:
            result["rows"][key] = dict(measure_row(label, pipeline, settings, args, device, splits, bar),
                                       status="measured")
    rates = {key: row["train_images_per_s"] for key, row in result["rows"].items() if row["status"] == "measured"}
    chosen = rates.pop(CHOICE)
    result["fastest_row"] = fastest = max(rates, key=rates.get)
    result["choice_vs_fastest"] = chosen / rates[fastest]
    result["choice_vs_tutorial"] = chosen / rates[TUTORIAL]

    print_table(result)
    path = json_path(args, device)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, allow_nan=False)
    print(f"train.py's choice trains {result['choice_vs_tutorial']:.2f}x as fast as the tutorial pipeline")
    print(f"figures written to {path}")


if __name__ == "__main__":
    utils.run_cli(main)
