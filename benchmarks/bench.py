"""How fast train.py trains, next to the report's tutorial-style pipeline, on one device.

    python benchmarks/bench.py --quick          # a short run: about a minute on 2 CPU cores
    python benchmarks/bench.py                  # the full run on the default device (cuda if available)
    python benchmarks/bench.py --device cuda    # the GPU figures for docs/performance.md
    python benchmarks/bench.py --all-rows       # also the rows that cannot be fast here (bf16 on an AVX2 CPU, ...)

It first says what the device can do (speed.detect; fp32 and bf16 matmul GFLOP/s). On 50,000
CIFAR-shaped random images (random content: speed does not depend on it) and the same ResNet-18, it
then measures side by side

  tutorial   the report's pipeline, the PyTorch CIFAR-10 tutorial: a Dataset of PIL images,
             RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize, a DataLoader
             with 2 workers, batches copied to the device, fp32, loss.item() every step;
  fp32, fp32_cl, bf16, bf16_cl, fp16, ... (+ _graph, _compile)
             train.py's pipeline (uint8 data on the device, batches gathered, cropped, flipped and
             normalised there: data.epoch_batches + steps.make_step) under each setting: precision,
             channels_last, a CUDA graph (cuda_graph.GraphedStep; CUDA only, the capture time shown apart),
             torch.compile (CUDA only, its compile time shown apart). By default only the rows that
             speed.plan leaves on this device (what can be fast here); --all-rows measures the rest;
  train_py   exactly what train.py chooses here for the full recipe at --width and --batch-size: its
             rules and its probe (speed.choose), so "train.py's choice / the fastest row" is one line.

Every row trains with the same steps.train_step and Adam (steps.make_optimizer): only the input
pipeline and the numeric settings differ. Training throughput is the median images/s of several
timed windows after a warm-up (speed.time_steps: CUDA is synchronised at each window's edges);
evaluation throughput is steps.evaluate (for the tutorial row: the tutorial's test loop) on the test
images. The projected
wall time of the full recipe is 52 epochs x 50,000 images (20,332 iterations at batch 128) at the
training throughput, plus one 10,000-image test evaluation per epoch, plus the compile or capture time
(compile_s in the JSON). Per-epoch
costs outside the two loops (checkpoint writes, DataLoader worker start-up) are not in it.

All figures go to a JSON file (--json; a --quick run writes bench_<device>_quick.json, so it never
overwrites the full run's bench_<device>.json). What the figure scripts cost is timed by bench_figures.py.
"""
import argparse
import dataclasses
import datetime
import itertools
import json
import platform
import statistics
import time
from dataclasses import dataclass

import sys
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset

HERE = Path(__file__).resolve().parent  # benchmarks/: its JSON files lie here
sys.path.insert(0, str(HERE.parent))  # the repo's modules, from wherever this is run
from torchvision import transforms
from tqdm import tqdm

import cifar10  # noqa: E402

import data  # noqa: E402
import speed  # noqa: E402
import steps  # noqa: E402
import utils  # noqa: E402
from model import ResNet  # noqa: E402

# The full recipe the throughputs are projected to: train.py's defaults on CIFAR-10.
RECIPE_EPOCHS = steps.RECIPE_EPOCHS                   # 52
RECIPE_TRAIN_IMAGES = cifar10.CIFAR10_TRAIN_IMAGES      # 50,000
RECIPE_TEST_IMAGES = 10_000
RECIPE_BATCH = steps.RECIPE["batch_size"]             # 128
RECIPE_ITERATIONS = RECIPE_EPOCHS * data.batches_per_epoch(RECIPE_TRAIN_IMAGES, RECIPE_BATCH)  # 20,332

TUTORIAL = "tutorial"
CHOICE = "train_py"


@dataclass(frozen=True)
class Windows:
    """How each row is timed: untimed warm-up steps, timed windows (their median is the row's rate),
    training steps a window, and the test images its evaluation runs on."""
    warmup: int
    windows: int
    window_steps: int
    eval_images: int


# A CPU step at width 64 takes ~0.4-0.8 s on 2 Xeon cores, ~1.9 s on 2 AVX2 EPYC cores; a CUDA step a few ms.
WINDOWS = {  # (device type, --quick) -> the defaults
    ("cpu", True): Windows(1, 3, 1, 500),
    ("cpu", False): Windows(3, 7, 4, RECIPE_TEST_IMAGES),
    ("cuda", True): Windows(20, 3, 30, RECIPE_TEST_IMAGES),
    ("cuda", False): Windows(30, 5, 100, RECIPE_TEST_IMAGES),
}


def parse_args(argv=None):
    p = utils.OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto",
                   help="auto (cuda if available, else mps, else cpu), cpu, cuda, cuda:1, mps, ... (default: auto)")
    p.add_argument("--quick", action="store_true",
                   help="fewer and shorter windows, fewer evaluation images, and no compile trial in train.py's "
                        "choice (its row then says so)")
    p.add_argument("--width", type=int, default=steps.RECIPE["width"], help="ResNet width (default: %(default)s)")
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
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile row on CUDA")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false", help="skip the CUDA-graph rows on CUDA")
    p.add_argument("--all-rows", action="store_true",
                   help="also measure the rows that cannot be fast on this device (by default skipped)")
    p.add_argument("--seed", type=int, default=0, help="data, weights and augmentation (default: %(default)s)")
    p.add_argument("--json", help="where the figures go (default: bench_<device type>.json, with --quick "
                                  "bench_<device type>_quick.json, so a quick check never overwrites a full run's)")
    return p.parse_args(argv)


def resolve_windows(args, device):
    """The Windows of this run: each flag given, else the device's default; values that cannot be measured
    are refused."""
    default = WINDOWS[("cuda" if device.type == "cuda" else "cpu", args.quick)]
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Windows)}
    windows = Windows(**{name: value if value is not None else getattr(default, name) for name, value in given.items()})
    if args.eval_images is None:
        windows = dataclasses.replace(windows, eval_images=min(windows.eval_images, args.test_images))
    utils.check_at_least(1, width=args.width, images=args.images, test_images=args.test_images,
                         batch_size=args.batch_size, windows=windows.windows, window_steps=windows.window_steps,
                         eval_images=windows.eval_images)
    utils.check_at_least(0, warmup=windows.warmup, workers=args.workers)
    if args.images < args.batch_size:
        raise utils.UserError(f"--images ({args.images}) must be at least --batch-size ({args.batch_size})")
    if windows.eval_images > args.test_images:
        raise utils.UserError(f"--eval-images must be in 1..{args.test_images} (--test-images), "
                              f"got {windows.eval_images}")
    return windows


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
        yield from data.epoch_batches(images, labels, epoch, seed, batch_size, channels_last)


def new_model(args, device, channels_last, cuda_graph=False):
    torch.manual_seed(args.seed)  # every row starts from the same weights
    model = ResNet(args.width).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer, _ = steps.make_optimizer(model, steps.RECIPE, cuda_graph)
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


def measure_row(label, pipeline, settings, args, windows, device, splits, bar):
    """Training and evaluation throughput of one row, and its projected recipe wall time."""
    train_images, train_labels, test_images, test_labels = splits
    model, optimizer = new_model(args, device, settings.channels_last, settings.cuda_graph)

    if pipeline == TUTORIAL:
        loader = tutorial_loader(train_images, train_labels, True, args.batch_size, args.workers)
        batches = tutorial_batches(loader, device)

        def step(x, y):
            loss, _ = steps.train_step(model, optimizer, x, y)
            loss.item()  # the tutorial's `running_loss += loss.item()`: a host sync every step
    else:
        batches = trainpy_batches(train_images, train_labels, args.batch_size, args.seed, settings.channels_last)
        step = steps.make_step(model, optimizer, settings, speed.grad_scaler(device, settings.precision),
                               say=lambda line: bar.write(line))

    compile_s = None
    if settings.compile or settings.cuda_graph:
        # Both shapes of the recipe compile (or are captured): the full batch and each epoch's last, partial one.
        partial = len(train_images) % args.batch_size or args.batch_size
        x, y = next(batches)
        _, full_s = speed.time_call(lambda: step(x, y), device)
        _, partial_s = speed.time_call(lambda: step(x[:partial], y[:partial]), device)
        compile_s = full_s + partial_s

    def next_step():
        x, y = next(batches)
        step(x, y)
        bar.update()
        return len(y)
    rates = speed.time_steps(next_step, windows.windows, windows.window_steps, windows.warmup, device)
    batches = None  # drops the tutorial's DataLoader iterator, which stops its workers, before the evaluation

    bar.set_postfix_str("evaluating")
    n = windows.eval_images
    if pipeline == TUTORIAL:
        test_loader = tutorial_loader(test_images[:n], test_labels[:n], False, args.batch_size, args.workers)
        _, eval_s = speed.time_call(lambda: tutorial_evaluate(model, test_loader, device), device)
    else:
        evaluate = lambda m: steps.evaluate(model, test_images[:m], test_labels[:m], settings.precision,
                                            settings.channels_last)
        evaluate(min(200, n))  # warm-up
        _, eval_s = speed.time_call(lambda: evaluate(n), device)
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


def trainpy_choice(args, device, caps):
    """What train.py chooses here for the full recipe at --width and --batch-size (speed.decide: its
    rules, then its probe), with the probe's wall time. A --quick run skips the probe's compile trial
    (on a CPU a minute or more of compiling, most of a quick run), as --no-compile would, and says so."""
    config = dict(steps.RECIPE, width=args.width, batch_size=args.batch_size)
    asked = dict.fromkeys(speed.SETTING_FIELDS)
    skipped = args.quick and speed.plan(caps, asked).compile_trial
    if skipped:
        asked["compile"] = False
    started = time.perf_counter()
    choice, record = speed.decide(asked, None, caps,
                                  RECIPE_EPOCHS * data.batches_per_epoch(RECIPE_TRAIN_IMAGES, args.batch_size),
                                  steps.probe_measure(config, device, 10))
    reason = record["speed_reason"] + ("; compile trial skipped (--quick): train.py may compile here" if skipped else "")
    return choice, dict(dataclasses.asdict(choice), label=choice.label(), reason=reason, compile_trial=not skipped,
                        probe=record["speed_probe"], probe_s=time.perf_counter() - started)


# --------------------------------------------------------------------------- report

def capabilities(device, caps):
    """What the device can do, for the report: speed.detect's view and the fp32 and bf16 matmul rates
    (on a CPU n = 1024 for fp32 and 512 for bf16, where an emulated bf16 matmul runs at ~1 GFLOP/s)."""
    cuda = device.type == "cuda"
    sizes = dict(fp32=4096 if cuda else 1024, bf16=4096 if cuda else 512)
    return dict(dataclasses.asdict(caps), described=caps.describe(), matmul_n=sizes,
                fp32_matmul_gflop_per_s=speed.matmul_gflop_per_s(device, sizes["fp32"], repeats=3),
                bf16_matmul_gflop_per_s=speed.matmul_gflop_per_s(device, sizes["bf16"], repeats=3, dtype=torch.bfloat16))


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


def json_path(args, device):
    """Where the figures go: --json, else benchmarks/bench_cpu.json / bench_cuda.json, or bench_cpu_quick.json
    with --quick."""
    return args.json or str(HERE / f"bench_{device.type}{'_quick' if args.quick else ''}.json")


def main(argv=None):
    args = parse_args(argv)
    device = speed.resolve_device(args.device)
    utils.check_writable(json_path(args, device), "--json")  # before minutes of measuring, not after
    speed.use_device(device)
    windows = resolve_windows(args, device)
    caps = speed.detect(device)
    g = torch.Generator().manual_seed(args.seed)
    splits = tuple(t.to(device) for t in (
        torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, 10, (args.images,), generator=g),
        torch.randint(0, 256, (args.test_images, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, 10, (args.test_images,), generator=g)))
    name = caps.name if device.type == "cuda" else f"{caps.name} ({torch.get_num_threads()} threads)"
    result = dict(device=str(device), device_name=name, torch=torch.__version__,
                  torchvision=torchvision.__version__, python=platform.python_version(),
                  date=datetime.datetime.now().isoformat(timespec="seconds"), threads=torch.get_num_threads(),
                  width=args.width, settings=dict({k: v for k, v in vars(args).items() if k != "json"},
                                                  **dataclasses.asdict(windows)),
                  recipe=dict(epochs=RECIPE_EPOCHS, iterations=RECIPE_ITERATIONS, batch_size=RECIPE_BATCH,
                              train_images=RECIPE_TRAIN_IMAGES, test_images=RECIPE_TEST_IMAGES),
                  rows={})
    print(f"benchmarking on {name}: {args.images:,} train / {args.test_images:,} test random images, "
          f"width {args.width}, {windows.windows} windows of {windows.window_steps} steps")
    result["capabilities"] = can = capabilities(device, caps)
    print(f"this device: {can['described']}; square matmul: fp32 {can['fp32_matmul_gflop_per_s']:.0f} GFLOP/s, "
          f"bf16 {can['bf16_matmul_gflop_per_s']:.1f} GFLOP/s")
    choice, result["choice"] = trainpy_choice(args, device, caps)

    fast = set(speed.plan(caps, {}).candidates)
    rows = [(TUTORIAL, "tutorial pipeline (the report's)", TUTORIAL, speed.Settings())]
    rows += [(row_key(s), f"train.py pipeline, {s.label()}", "train.py", s) for s in table_rows(caps)]
    rows.append((CHOICE, f"train.py's choice: {choice.label()}", "train.py", choice))
    for key, label, pipeline, settings in rows:
        why = None if pipeline == TUTORIAL or key == CHOICE else skip_reason(settings, fast, args, device.type == "cuda")
        if why is not None:
            result["rows"][key] = dict(label=label, status=why)
            continue
        with tqdm(total=windows.warmup + windows.windows * windows.window_steps + 1,  # + 1: the evaluation
                  desc=key, unit="step", leave=False, dynamic_ncols=True) as bar:
            result["rows"][key] = dict(measure_row(label, pipeline, settings, args, windows, device, splits, bar),
                                       status="measured")
    rates = {key: row["train_images_per_s"] for key, row in result["rows"].items() if row["status"] == "measured"}
    chosen = rates.pop(CHOICE)
    result["fastest_row"] = fastest = max(rates, key=rates.get)
    result["choice_vs_fastest"] = chosen / rates[fastest]
    result["choice_vs_tutorial"] = chosen / rates[TUTORIAL]

    print_table(result)
    path = json_path(args, device)
    utils.write_text_atomic(path, json.dumps(result, indent=2, allow_nan=False) + "\n")
    print(f"train.py's choice trains {result['choice_vs_tutorial']:.2f}x as fast as the tutorial pipeline")
    print(f"figures written to {path}")


if __name__ == "__main__":
    utils.run_cli(main)
