"""How long the figures take, as a multiple of one forward pass of the test split measured in the same run.

    python benchmarks/bench_figures.py                    # plot_all.py at width 64 on --synthetic data (10,000 test images)
    python benchmarks/bench_figures.py --quick            # plot_all.py --quick, the first look, likewise
    python benchmarks/bench_figures.py --checkpoint checkpoints/resnet18_cifar10.pt   # on your own checkpoint and its data
    python benchmarks/bench_figures.py --top-activating   # only: scoring.top_activating against the report's per-image loop
    python benchmarks/bench_figures.py --feature-vis      # only: plot_feature_visualization.py's optimisation at --width

By default it makes a checkpoint (train.py, --iterations steps of a width---width ResNet-18 on the
synthetic gratings, in --work-dir; speed does not depend on what the weights learned), times one
forward pass of the network over the test split (the logits of every image, batches of 100 under
inference mode, as the figures' shared pass runs them; the unit everything is given in), runs
plot_all.py on it in a fresh Python process, whatever scripts it holds, and times the forward pass
once more. Each script's time, as plot_all.py prints it, the trust table's parts (as plot_trust.py
prints them), and the whole (plot_all.py's own total, and the process's wall time with Python's
start-up and imports) are reported in seconds and as a
multiple of the mean of the two forward passes; their difference says how much the machine's load
moved meanwhile. Threads: torch's default, or OMP_NUM_THREADS, the same in both processes.

--top-activating times scoring.top_activating (batched, to --layer) against the report's approach,
one image at a time through the whole network, on random images and a freshly built network, and
compares their top-k. --feature-vis times plot_feature_visualization.py's optimisation with its
defaults. --json writes the figures to a file.
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]  # the repo: its scripts run from here
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import speed  # noqa: E402
import utils  # noqa: E402
from model import STAGES, ResNet  # noqa: E402
from visualize import featurevis, scoring, trust  # noqa: E402
from visualize.context import load_run  # noqa: E402

# what plot_all.py prints: a line a script ("plot_x.py: 2 files in 1.2 s"; a step that is no script, as
# "index.html: in 0.02 s", counts as one), then its total
SCRIPT_LINE = re.compile(r"^([\w.]+?)(?:\.py)?: (?:(\d+) files )?in ([\d.]+) s$", flags=re.M)
TOTAL_LINE = re.compile(r"^plot_all\.py: \d+ files in .* in ([\d.]+) s$", flags=re.M)
TRUST_PART_LINE = re.compile(trust.PART_LINE, flags=re.M)  # plot_trust.py's time of each part of its table


def parse_args(argv=None):
    p = utils.OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="time the figures of this checkpoint (default: make one, see --width)")
    p.add_argument("--width", type=int, default=64,
                   help="width of the checkpoint made (and of the network --top-activating and --feature-vis "
                        "build) (default: %(default)s)")
    p.add_argument("--iterations", type=int, default=10,
                   help="training iterations of the checkpoint made, at least 1 (default: %(default)s)")
    p.add_argument("--data-dir", help="data for plot_all.py (default: the checkpoint's; for the checkpoint made, "
                                      "the synthetic gratings in --work-dir)")
    p.add_argument("--synthetic", action=argparse.BooleanOptionalAction, default=None,
                   help="passed to plot_all.py (default: what the checkpoint was trained on)")
    p.add_argument("--work-dir", help="where the checkpoint made, its data and the figures go (default: a "
                                      "temporary folder, removed at the end)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... or auto (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="time plot_all.py --quick, its first look (default: the full run)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--top-activating", action="store_true",
                   help="instead: time scoring.top_activating against the per-image loop (see --layer ...)")
    p.add_argument("--layer", default="conv5_x",  # where plot_gradient_pattern.py searches
                   help=f"--top-activating's layer, one of {', '.join(STAGES)} (default: %(default)s)")
    p.add_argument("--channel", type=int, default=0, help="--top-activating's channel (default: %(default)s)")
    p.add_argument("--k", type=int, default=9, help="--top-activating's k (default: %(default)s)")
    p.add_argument("--top-images", type=int, default=10_000,
                   help="--top-activating's random images (default: %(default)s)")
    p.add_argument("--feature-vis", action="store_true",
                   help="instead: time plot_feature_visualization.py's optimisation (16 conv5_x channels, its "
                        "default steps) at --width")
    args = p.parse_args(argv)
    for name in ("width", "iterations", "k", "top_images"):
        if getattr(args, name) < 1:
            raise utils.UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.k > args.top_images:
        raise utils.UserError(f"--k {args.k} must be at most --top-images ({args.top_images})")
    if args.layer not in STAGES:
        raise utils.UserError(f"--layer {args.layer}: choose one of {', '.join(STAGES)}")
    channels = ResNet(1).channels(args.layer) * args.width  # every stage's channels are a multiple of the width
    if not 0 <= args.channel < channels:
        raise utils.UserError(f"--channel {args.channel}: {args.layer} of a width-{args.width} network has "
                              f"{channels} channels; choose 0..{channels - 1}")
    if args.top_activating and args.feature_vis:
        raise utils.UserError("--top-activating and --feature-vis: choose one")
    if args.json:
        utils.check_writable(args.json, "--json")  # before minutes of measuring, not after
    args.device = speed.resolve_device(args.device)
    return args


def machine(device):
    """What the figures were measured on: the device, torch's threads and CPU kernels, the load."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else speed.cpu_model()
    return dict(device=str(device), device_name=name, threads=torch.get_num_threads(),
                cpu_capability=torch.backends.cpu.get_cpu_capability(), torch=torch.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                load_average=load_average())


def load_average():
    """The 1, 5 and 15 minute load averages, or None where the system keeps none (Windows)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


# --------------------------------------------------------------------------- plot_all.py

def forward_pass_seconds(model, images, batch_size=100):
    """(wall, CPU) seconds of one forward pass of `model` over the uint8 images: every image's logits,
    in batches of batch_size under inference mode (scoring.classify: the stages in the layouts the
    figures use), after a one-batch warm-up."""
    device = next(model.parameters()).device

    def run(part):
        with torch.inference_mode():
            for start in tqdm(range(0, len(part), batch_size), desc="forward pass of the test split", unit="batch",
                              leave=False, dynamic_ncols=True):
                scoring.classify(model, data.normalize(part[start:start + batch_size].to(device)))

    run(images[:batch_size])
    cpu = time.process_time()
    wall = speed.time_call(lambda: run(images), device)[1]
    return wall, time.process_time() - cpu


def make_checkpoint(work_dir, width, iterations):
    """(checkpoint, data dir): train.py's run of `iterations` steps at `width` on the synthetic data."""
    checkpoint, data_dir = work_dir / f"w{width}.pt", work_dir / "data"
    command = [sys.executable, str(ROOT / "train.py"), "--synthetic", "--width", str(width), "--iterations",
               str(iterations), "--data-dir", str(data_dir), "--checkpoint", str(checkpoint),
               "--figures-dir", str(work_dir / "progress"), "--overwrite"]
    print("making a checkpoint:", " ".join(command[1:]), flush=True)
    proc = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise utils.UserError(f"train.py could not make the checkpoint: {proc.stderr.strip().splitlines()[-1]}")
    return checkpoint, data_dir


def run_plot_all(checkpoint, figures_dir, data_dir, synthetic, device, quick=False):
    """(plot_all.py's stdout, its wall time, its CPU time): plot_all.py on the checkpoint in a fresh
    Python process. The CPU time is None where the system does not count a child's (Windows)."""
    command = [sys.executable, str(ROOT / "plot_all.py"), "--checkpoint", str(checkpoint), "--figures-dir",
               str(figures_dir), "--device", str(device)] + (["--quick"] if quick else [])
    if data_dir is not None:
        command += ["--data-dir", str(data_dir)]
    if synthetic is not None:
        command += ["--synthetic" if synthetic else "--no-synthetic"]
    print("timing:", " ".join(command[1:]), flush=True)
    start, children = time.perf_counter(), children_cpu_seconds()
    proc = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          encoding="utf-8")
    wall, done = time.perf_counter() - start, children_cpu_seconds()
    if proc.returncode != 0:
        raise utils.UserError(f"plot_all.py failed: {proc.stderr.strip().splitlines()[-1]}")
    return proc.stdout, wall, None if done is None else done - children


def children_cpu_seconds():
    """CPU seconds of the waited-for child processes (os.times), None on Windows, which does not count them."""
    if os.name == "nt":
        return None
    times = os.times()
    return times.children_user + times.children_system


def figure_times(stdout):
    """({script: {"files", "seconds"}} of every script line plot_all.py printed, its total in seconds)."""
    scripts = {name: dict(files=int(files or 1), seconds=float(seconds))
               for name, files, seconds in SCRIPT_LINE.findall(stdout)}
    total = TOTAL_LINE.findall(stdout)
    if not scripts or len(total) != 1:
        raise utils.UserError("plot_all.py's output has no time per script and total (lines 'NAME.py: N files "
                              "in S s' and 'plot_all.py: N files in DIR in S s'); was it changed?")
    return scripts, float(total[0])


def trust_parts(stdout):
    """{part: seconds} of the trust table, as plot_trust.py printed them ({} where it did not run)."""
    return {name: float(seconds) for name, seconds in TRUST_PART_LINE.findall(stdout)}


def figures_ratio(scripts, total, wall, forward_s, cpu=None, forward_cpu_s=None):
    """The report: every time in seconds and as a multiple of one forward pass (the mean of forward_s).
    With cpu (plot_all.py's process) and forward_cpu_s (the passes'), also the ratio of CPU times: on a
    machine others load, a process's CPU time counts only its own work (with one thread it is its wall
    time on an idle machine), so that ratio moves less with the load than the wall times' do."""
    unit = sum(forward_s) / len(forward_s)
    rows = {name: dict(row, ratio=row["seconds"] / unit) for name, row in scripts.items()}
    between = total - sum(row["seconds"] for row in scripts.values())  # what plot_all.py does between scripts
    report = dict(forward_pass_s=list(forward_s), forward_pass_mean_s=unit, scripts=rows, plot_all_s=total,
                  between_scripts_s=between, plot_all_wall_s=wall, ratio=total / unit, wall_ratio=wall / unit)
    if cpu is not None:
        cpu_unit = sum(forward_cpu_s) / len(forward_cpu_s)
        report.update(forward_pass_cpu_s=list(forward_cpu_s), plot_all_cpu_s=cpu, cpu_ratio=cpu / cpu_unit)
    return report


def measure_figures(args):
    with tempfile.TemporaryDirectory(prefix="bench_figures_") as temporary:
        work_dir = Path(args.work_dir or temporary)
        work_dir.mkdir(parents=True, exist_ok=True)
        checkpoint, data_dir = Path(args.checkpoint) if args.checkpoint else None, args.data_dir
        if checkpoint is None:
            checkpoint, made_data = make_checkpoint(work_dir, args.width, args.iterations)
            data_dir = data_dir or made_data
        run = load_run(str(checkpoint), args.device, data_dir, args.synthetic)
        load_before = load_average()
        (before, before_cpu) = forward_pass_seconds(run.model, run.images)
        stdout, wall, cpu = run_plot_all(checkpoint, work_dir / "figures", data_dir, args.synthetic, args.device,
                                         args.quick)
        (after, after_cpu) = forward_pass_seconds(run.model, run.images)
        scripts, total = figure_times(stdout)
    result = dict(machine(args.device), load_average_before=load_before, checkpoint=str(checkpoint),
                  width=run.model.width, test_images=len(run.images), quick=args.quick,
                  **figures_ratio(scripts, total, wall, (before, after), cpu, (before_cpu, after_cpu)))
    unit = result["forward_pass_mean_s"]
    result["trust_parts"] = {name: dict(seconds=seconds, ratio=seconds / unit)
                             for name, seconds in trust_parts(stdout).items()}
    load = lambda values: ", ".join(f"{v:.1f}" for v in values) if values else "n/a"
    print(f"\n{result['device_name']} ({result['cpu_capability']}, {result['threads']} threads) | torch "
          f"{result['torch']} | {result['date']} | load average {load(load_before)} before, "
          f"{load(result['load_average'])} after")
    print(f"plot_all.py{' --quick' if args.quick else ''}; one forward pass of the {len(run.images):,} test images "
          f"(width {run.model.width}): {before:.1f} s "
          f"before, {after:.1f} s after plot_all.py\n")
    print(f"{'script':44} {'files':>5} {'seconds':>8} {'x forward':>10}")
    for name, row in result["scripts"].items():
        print(f"{name + ('.py' if name.startswith('plot_') else ''):44} {row['files']:5} {row['seconds']:8.1f} "
              f"{row['ratio']:10.2f}")
    print(f"{'plot_all.py (its total)':44} {sum(r['files'] for r in scripts.values()):5} {total:8.1f} "
          f"{result['ratio']:10.2f}")
    print(f"{'plot_all.py (process wall time)':44} {'':5} {wall:8.1f} {result['wall_ratio']:10.2f}")
    if cpu is not None:
        print(f"{'plot_all.py (process CPU time)':44} {'':5} {cpu:8.1f} {result['cpu_ratio']:10.2f}  "
              f"(forward pass: {before_cpu:.1f} s and {after_cpu:.1f} s of CPU time)")
    if result["trust_parts"]:
        print("\nplot_trust.py's table, part by part (parts plot_all.py's other scripts computed already cost ~0):")
        for name, row in result["trust_parts"].items():
            print(f"{'  ' + name:44} {'':5} {row['seconds']:8.1f} {row['ratio']:10.2f}")
    return result


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


def new_model(width, device, seed=0):
    torch.manual_seed(seed)
    return ResNet(width).to(device).eval()


def measure_top_activating(args):
    device = args.device
    model = new_model(args.width, device)
    images = torch.randint(0, 256, (args.top_images, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(device)
    scoring.top_activating(model, images[:min(len(images), 100)], args.layer, args.channel)  # warm-up
    (batched_idx, batched_scores), batched_s = speed.time_call(
        lambda: scoring.top_activating(model, images, args.layer, args.channel, k=args.k), device)
    (loop_idx, loop_scores), loop_s = speed.time_call(
        lambda: per_image_top(model, images, args.layer, args.channel, args.k), device)
    batched_idx, batched_scores = torch.as_tensor(batched_idx).cpu(), torch.as_tensor(batched_scores).float().cpu()
    # The arithmetic the batched pass must do bounds its speed: its FLOP rate, next to the device's
    # peak, says how much faster it could still get.
    with FlopCounterMode(display=False) as flops, torch.inference_mode():
        scoring.stage_output(model, data.normalize(images[:1]), args.layer)
    gflop = flops.get_total_flops() * len(images) / 1e9
    peak = speed.matmul_gflop_per_s(device, 4096 if device.type == "cuda" else 1024, repeats=3)
    result = dict(machine(device), status="measured", width=args.width, layer=args.layer, channel=args.channel,
                  k=args.k, images=len(images), batched_s=batched_s, per_image_s=loop_s, speedup=loop_s / batched_s,
                  gflop=gflop, batched_gflop_per_s=gflop / batched_s, matmul_gflop_per_s=peak,
                  batched_images_per_s=len(images) / batched_s, per_image_images_per_s=len(images) / loop_s,
                  same_indices=sorted(batched_idx.tolist()) == sorted(loop_idx.tolist()),
                  max_score_rel_diff=((batched_scores.sort().values - loop_scores.sort().values).abs().max()
                                      / loop_scores.abs().max().clamp_min(1e-12)).item())
    print(f"top_activating ({args.layer} channel {args.channel}, k={args.k}, {len(images):,} images, width "
          f"{args.width}) on {result['device_name']}: batched {batched_s:.2f} s, per-image loop {loop_s:.2f} s, "
          f"{result['speedup']:.1f}x; same top-{args.k}: {result['same_indices']}; {gflop:,.0f} GFLOP, batched at "
          f"{result['batched_gflop_per_s']:.0f} GFLOP/s (an fp32 matmul here: {peak:.0f})")
    return result


# --------------------------------------------------------------------------- feature visualization

def measure_feature_visualization(args, channels=16):
    """Seconds for plot_feature_visualization.py's optimisation with its defaults (all channels as
    one batch), on a ResNet of --width with its initial weights (speed does not depend on them) and
    unit colour statistics; a 4-step warm-up first. Python start-up, loading the checkpoint and
    drawing are not in it: the default run times the script itself."""
    model = new_model(args.width, args.device)
    colour = (torch.full((3,), 0.5), torch.eye(3) / 16)
    run = lambda steps: featurevis.feature_visualization(model, "conv5_x", list(range(channels)), colour, steps=steps)
    run(4)
    _, seconds = speed.time_call(lambda: run(featurevis.FV_STEPS), args.device)
    result = dict(machine(args.device), width=args.width, layer="conv5_x", channels=channels,
                  steps=featurevis.FV_STEPS, seconds=seconds, seconds_per_step=seconds / featurevis.FV_STEPS)
    print(f"feature visualization on {result['device_name']}: {channels} conv5_x channels of a width-{args.width} "
          f"ResNet-18, {featurevis.FV_STEPS} steps: {seconds:.1f} s ({1000 * seconds / featurevis.FV_STEPS:.0f} ms a step)")
    return result


def main(argv=None):
    args = parse_args(argv)
    if args.top_activating:
        result = measure_top_activating(args)
    elif args.feature_vis:
        result = measure_feature_visualization(args)
    else:
        result = measure_figures(args)
    if args.json:
        utils.write_text_atomic(args.json, json.dumps(result, indent=2, allow_nan=False) + "\n")
        print(f"figures written to {args.json}")
    return result


if __name__ == "__main__":
    utils.run_cli(main)
