"""The device's speed settings: what the device is and can do, the rules, and the probe.

    device = speed.resolve_device("auto")           # the device a --device names, if this machine has it
    caps = speed.detect(device)                      # what the device can do (a Capabilities)
    settings, record = speed.decide(asked, previous_config, caps, iterations, measure)

decide is the one call a run makes: the rules (plan) leave the candidates that can be fast on the device,
a resumed run keeps what its run chose (plan_for), and a short probe keeps the fastest (choose); it
returns the settings and what the run's config records of them.

The rules only rule out what cannot be fast on the device:

- CUDA, compute capability >= 8.0: bf16 autocast (cuDNN has bf16 convolutions from Ampere on);
- CUDA 7.x: fp16 autocast with a GradScaler (bf16 is emulated there: torch.cuda.is_bf16_supported()
  says True, but every convolution falls to slow native kernels). GradScaler's step reads found-inf
  on the host, which a CUDA graph cannot hold, so these run eagerly;
- CUDA below 7.0: fp32;
- Apple GPU (mps): fp32, and fp16 autocast as a candidate where this torch autocasts on mps (no bf16:
  not every Mac's GPU has it, and torch's mps autocast is fp16 first); no CUDA graph, no compile trial;
- CPU: fp32, and bf16 as a candidate only where the CPU computes bf16 natively (AMX or AVX512-BF16 on
  x86, the BF16 extension on ARM), as torch.cpu.get_capabilities() reports: elsewhere oneDNN emulates
  bf16, ~25x slower than fp32 (measured on an AVX2 AMD EPYC, 2026-12-01).

What the rules leave (fp32 or native bf16 on such a CPU, NCHW or channels_last, a CUDA graph or eager)
is timed by the probe on the user's own device at the run's width and batch, a few steps each, and the
fastest kept. The probe takes at most PROBE_SHARE of the run's steps, so a short (smoke) run skips it
and takes the first candidate, the rules' default. A flag the user gives always wins. The decision is a
pure function of a Capabilities, so tests give it a table of devices; CI has no GPU.

use_device makes the run's device torch's current one (and sets cuDNN's benchmark mode) before anything
runs there.
"""
import dataclasses
import itertools
import os
import platform
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from utils import UserError

PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# The probe: a candidate is timed over PROBE_WARMUP untimed steps (a graph's capture, cuDNN's choices)
# and two windows, the faster window kept (the cores may be shared). It may take PROBE_SHARE of the
# run's steps, and runs only if each candidate gets PROBE_MIN_STEPS; on a CPU (~0.5 s a step at width
# 64) a candidate gets no more than PROBE_MIN_STEPS, on a GPU up to PROBE_MAX_STEPS_CUDA.
PROBE_SHARE = 0.005
PROBE_WARMUP = 2
PROBE_MIN_STEPS = 6
PROBE_MAX_STEPS_CUDA = 42


@dataclass(frozen=True)
class Capabilities:
    """What the decision needs to know about a device; tests build one for each device of a table."""
    kind: str                          # "cuda", "cpu", or another torch device type
    name: str                          # the GPU's name, the CPU's model
    compute_capability: tuple = None   # CUDA: (major, minor)
    native_bf16: bool = False          # CPU: bf16 arithmetic in hardware
    native_fp16: bool = False          # Apple GPU: torch autocasts fp16 there
    detail: str = ""                   # how native_bf16 was found, for the reason

    def describe(self):
        if self.kind == "cuda":
            return f"{self.name} (CUDA compute capability {self.compute_capability[0]}.{self.compute_capability[1]})"
        if self.kind in ("cpu", "mps"):
            return f"{'CPU ' * (self.kind == 'cpu')}{self.name} ({self.detail})"
        return self.name


@dataclass(frozen=True)
class Settings:
    precision: str = "fp32"
    channels_last: bool = False
    cuda_graph: bool = False
    compile: bool = False

    def label(self):
        """e.g. 'bf16 channels_last graph': the probe's key, the start-up line's words."""
        return " ".join([self.precision, "channels_last" if self.channels_last else "NCHW",
                         *(["graph"] if self.cuda_graph else []), *(["compile"] if self.compile else [])])


SETTING_FIELDS = tuple(f.name for f in dataclasses.fields(Settings))  # the keys a run's config records


@dataclass(frozen=True)
class Plan:
    """What the rules leave on a device: the candidates (the first is kept when no probe runs) and why;
    compile_trial: whether the probe may weigh torch.compile for the fastest (weigh_compile)."""
    caps: Capabilities
    candidates: tuple
    reasons: tuple
    compile_trial: bool = False


# --------------------------------------------------------------------------- the device and what it can do

def mps_available():
    """Whether torch can use an Apple GPU here (torch built with mps, on a Mac that has one)."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def auto_device():
    """(the device --device auto picks, why): a CUDA GPU, else an Apple GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda"), "auto: a CUDA GPU"
    if mps_available():
        return torch.device("mps"), "auto: no CUDA GPU, an Apple GPU (mps)"
    return torch.device("cpu"), "auto: no CUDA or Apple GPU"


def device_choice(name="auto"):
    """(the torch device --device `name` names, why it is that one); UserError as resolve_device."""
    if name == "auto":
        return auto_device()
    return resolve_device(name), f"--device {name}"


def resolve_device(name="auto"):
    """The torch device `name` names, if this machine has it; UserError otherwise."""
    if name == "auto":
        return auto_device()[0]
    try:
        with warnings.catch_warnings():  # torch warns about some legacy names ("mkldnn")
            warnings.simplefilter("ignore")
            device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"--device {name!r} is not a device name; use auto, cpu, cuda or "
                        f"mps (cuda:1 for a second GPU)") from None
    fix = ("use --device cpu" + (" or cuda" if torch.cuda.is_available() else "") + (" or mps" if mps_available() else "")
           + ", or leave out --device")
    if device.type == "cpu":
        return device
    if device.type == "meta":
        raise UserError(f"--device meta holds shapes but no numbers, so nothing can be computed on it; {fix}")
    if device.type == "mps":
        count = int(mps_available())
    else:  # cuda, xpu, mtia: torch's backend module says how many this machine has
        backend = getattr(torch, device.type, None)
        available = getattr(backend, "is_available", None)
        count = backend.device_count() if callable(available) and available() else 0
    if count == 0:
        raise UserError(f"--device {name}: torch knows the name, but this machine has no {device.type} "
                        f"device that torch can use; {fix}")
    if device.index is not None and device.index >= count:
        raise UserError(f"--device {name}: this machine has {count} {device.type} device{'s' * (count > 1)}, "
                        f"{device.type}:0..{device.type}:{count - 1}")
    return device


def available_memory(device):
    """Bytes that `device` has free now (CPU: MemAvailable of /proc/meminfo on Linux, the free pages
    elsewhere; Apple GPU: what Metal recommends less what torch holds); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        recommended = getattr(torch.mps, "recommended_max_memory", None)
        held = getattr(torch.mps, "driver_allocated_memory", None)
        return recommended() - held() if recommended and held else None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def cpu_bf16_support():
    """(whether this CPU computes bf16 natively, how that was found). torch 2.14 has
    torch.cpu.get_capabilities() (cpuinfo's flags); older torch has torch.cpu._is_amx_tile_supported and
    _is_avx512_bf16_supported. torch.backends.cpu.get_cpu_capability() ("AVX2", "AVX512") is only the
    vector width ATen dispatches to: AVX512 does not imply bf16 units, so it is named but not used."""
    dispatch = torch.backends.cpu.get_cpu_capability()
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        flags = get_capabilities()
        found = [k for k in ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16") if flags.get(k)]
        how = "torch.cpu.get_capabilities()"
    else:
        checks = {"amx_tile": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
        found = [k for k, f in checks.items() if getattr(torch.cpu, f, lambda: False)()]
        how = "torch.cpu._is_amx_tile_supported/_is_avx512_bf16_supported"
    said = ", ".join(found) if found else "no AMX or AVX512-BF16"
    return bool(found), f"{how}: {said}; ATen dispatch {dispatch}"


def detect(device):
    """The Capabilities of a torch device of this machine."""
    if device.type == "cuda":
        return Capabilities("cuda", torch.cuda.get_device_name(device),
                            compute_capability=tuple(torch.cuda.get_device_capability(device)))
    if device.type == "cpu":
        native, how = cpu_bf16_support()
        return Capabilities("cpu", cpu_model(), native_bf16=native, detail=how)
    if device.type == "mps":
        fp16 = mps_fp16_autocast()
        return Capabilities("mps", f"Apple GPU on {cpu_model()}", native_fp16=fp16,
                            detail=f"torch {'autocasts' if fp16 else 'does not autocast'} fp16 on mps")
    return Capabilities(device.type, str(device))


def mps_fp16_autocast():
    """Whether this torch can train in fp16 on mps: autocast there (torch.amp.is_autocast_available, from
    torch 2.3) and a GradScaler that stays enabled there (one that warns and disables itself would let
    fp16 gradients underflow unseen)."""
    available = getattr(torch.amp, "is_autocast_available", None)
    try:
        if not (available and available("mps")):
            return False
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a scaler that cannot run on mps says so by a warning
            return torch.amp.GradScaler("mps").is_enabled()
    except (RuntimeError, ValueError, UserWarning):
        return False


def cpu_model():
    """The CPU's model name: /proc/cpuinfo's on Linux, the platform module's elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# --------------------------------------------------------------------------- the rules

def ruled_precisions(caps):
    """(precisions that can be fast on the device, the first its default; why)."""
    if caps.kind == "cuda":
        major = caps.compute_capability[0]
        if major >= 8:
            return ["bf16"], "bf16 autocast (cuDNN has bf16 convolutions from compute capability 8.0)"
        if major == 7:
            return ["fp16"], ("fp16 autocast + GradScaler (bf16 is emulated below compute capability 8.0; "
                              "GradScaler syncs with the host, so eager)")
        return ["fp32"], "fp32 (no tensor cores below compute capability 7.0)"
    if caps.kind == "mps":
        if caps.native_fp16:
            return ["fp32", "fp16"], "fp32 or fp16 autocast + GradScaler (an Apple GPU; the probe chooses)"
        return ["fp32"], "fp32 (an Apple GPU; this torch has no fp16 autocast on it)"
    if caps.kind == "cpu" and caps.native_bf16:
        return ["fp32", "bf16"], "fp32 or bf16 (this CPU computes bf16 natively)"
    if caps.kind == "cpu":
        return ["fp32"], "fp32 (bf16 is emulated on this CPU, ~25x slower)"
    return ["fp32"], "fp32"


def plan(caps, asked):
    """The candidates the rules leave for `caps`, each setting the user gave (asked: SETTING_FIELDS -> value,
    None where not given) fixed as given. UserError for a combination that cannot run."""
    cuda = caps.kind == "cuda"
    if asked.get("cuda_graph") and not cuda:
        raise UserError(f"--cuda-graph needs a CUDA device, and this run is on {caps.kind}; drop --cuda-graph")
    if asked.get("cuda_graph") and asked.get("compile"):
        raise UserError("--cuda-graph and --compile are two ways to cut the launch cost; pick one")
    reasons = [caps.describe()]
    if asked.get("precision") is not None:
        precisions = [asked["precision"]]
        reasons.append(f"{asked['precision']} (asked)")
    else:
        precisions, why = ruled_precisions(caps)
        reasons.append(why)
    # channels_last feeds tensor cores and oneDNN's blocked kernels; on old GPUs NCHW is cuDNN's native
    tensor_cores = cuda and caps.compute_capability[0] >= 7
    layouts = [asked["channels_last"]] if asked.get("channels_last") is not None else [tensor_cores, not tensor_cores]
    compile_ = bool(asked.get("compile"))
    if asked.get("cuda_graph") is not None:
        graphs = [asked["cuda_graph"]]
    elif cuda and not compile_:
        graphs = [True, False]
    else:
        graphs = [False]
    candidates = []
    for precision, channels_last, graph in itertools.product(precisions, layouts, graphs):
        if graph and precision == "fp16":  # GradScaler's step reads found-inf on the host: not capturable
            continue
        candidates.append(Settings(precision, channels_last, graph, compile_))
    if not candidates:
        raise UserError("--cuda-graph cannot run with fp16 (GradScaler's step syncs with the host); "
                        "add --precision fp32, or drop --cuda-graph")
    given = [k for k in SETTING_FIELDS if asked.get(k) is not None]
    if given:
        reasons.append("given: " + ", ".join(f"{k}={asked[k]}" for k in given))
    # torch.compile is weighed only on a CPU: on CUDA a graph cuts the same launch cost without compiling
    return Plan(caps, tuple(candidates), tuple(reasons), compile_trial=caps.kind == "cpu" and asked.get("compile") is None)


def probe_steps(plan, iterations):
    """Steps each candidate gets in the probe of a run of `iterations`: 0 when it would not fit."""
    if len(plan.candidates) < 2:
        return 0
    cap = PROBE_MAX_STEPS_CUDA if plan.caps.kind == "cuda" else PROBE_MIN_STEPS
    steps = min(cap, int(PROBE_SHARE * iterations / len(plan.candidates)))
    return steps if steps >= PROBE_MIN_STEPS else 0


def choose(plan, iterations, measure, clock=time.perf_counter):
    """(settings, {label: images/s}, reason): the fastest candidate by measure(settings, steps) -> images/s,
    or the first where the probe is skipped; where the plan allows it, that candidate compiled instead if
    compiling pays for itself over the run (weigh_compile). clock times the probe."""
    steps = probe_steps(plan, iterations)
    reasons = list(plan.reasons)
    if len(plan.candidates) == 1:
        return plan.candidates[0], {}, "; ".join(reasons)
    if not steps:
        need = int(-(-PROBE_MIN_STEPS * len(plan.candidates) // PROBE_SHARE))
        reasons.append(f"probe skipped: {iterations} iterations are too short for {len(plan.candidates)} candidates "
                       f"(needs {need}); the rules' default")
        return plan.candidates[0], {}, "; ".join(reasons)
    rates, seconds = {}, {}
    for c in plan.candidates:
        started = clock()
        rates[c] = measure(c, steps)
        seconds[c] = clock() - started
    best = max(rates, key=rates.get)
    reasons.append(f"probe ({steps} steps each): {best.label()} fastest, {rates[best]:.0f} images/s")
    probe = {c.label(): rates[c] for c in plan.candidates}
    if plan.compile_trial:
        best, why = weigh_compile(best, rates[best], seconds[best], iterations, steps, measure, clock, probe)
        reasons.append(why)
    return best, probe, "; ".join(reasons)


# torch.compile on a CPU: the AVX2 EPYC (width 64, batch 128, channels_last, 2026-12-04) trained 80.6 images/s
# compiled against 70.0 eager after 58 s of compiling. It is tried where the run would take at least
# COMPILE_MIN_RUN_S eagerly (the trial's compile, a minute or more, is then a few % of it at most), and kept
# if the time it saves over the run beats COMPILE_SHAPES compiles: the run compiles the full batch and
# again the epoch's last, partial one (width 4 on one busy core: 169 s, then 129 s for batch 8).
COMPILE_MIN_RUN_S = 3600
COMPILE_SHAPES = 2


def weigh_compile(best, rate, probe_s, iterations, steps, measure, clock, probe):
    """(settings, reason): `best`, the probe's fastest (eager, `rate` images/s, its `steps` probe steps
    taking probe_s), or the same compiled, for a run of `iterations` steps. The compiled one is measured
    as the probe's candidates are (and added to `probe`); its compile time is what its probe took beyond
    the eager one's, its steps counted at its own rate."""
    run_s = probe_s * iterations / steps  # the run's eager time (a little over: the probe builds a model)
    if run_s < COMPILE_MIN_RUN_S:
        return best, f"compile not tried (a run of ~{run_s / 60:.0f} min eagerly; tried from {COMPILE_MIN_RUN_S // 60})"
    compiled = dataclasses.replace(best, compile=True)
    started = clock()
    try:
        compiled_rate = measure(compiled, steps)
    except Exception as err:  # noqa: BLE001 - no C++ compiler, an inductor error: the eager run is as good
        return best, f"compile failed ({type(err).__name__}: {' '.join(str(err).split())[:120]}), so eager"
    probe[compiled.label()] = compiled_rate
    if compiled_rate <= 0:
        return best, "compiled: measured 0 images/s, so eager"
    compile_s = max(0.0, clock() - started - probe_s * rate / compiled_rate)
    if compiled_rate <= rate:
        return best, f"compiled {compiled_rate:.0f} images/s after ~{compile_s:.0f} s compiling, no faster, so eager"
    saved_s = run_s * (1 - rate / compiled_rate)
    kept = saved_s > COMPILE_SHAPES * compile_s
    return (compiled if kept else best), (
        f"compiled {compiled_rate:.0f} images/s after ~{compile_s:.0f} s compiling: saves ~{saved_s / 60:.0f} min "
        f"of a ~{run_s / 60:.0f} min run, {'kept' if kept else f'less than {COMPILE_SHAPES} compiles cost, so eager'}")


def plan_for(asked, previous, caps):
    """plan(caps, asked) for a run that may be resumed: one resumed on the same kind of device keeps the
    settings its run chose (previous: that run's config; a new probe could choose others, and the resumed
    run would then not equal one run). Flags still win."""
    previous = previous or {}
    if previous.get("device_name") != caps.name or not all(k in previous for k in SETTING_FIELDS):
        return plan(caps, asked)
    kept = plan(caps, {k: previous[k] if asked[k] is None else asked[k] for k in SETTING_FIELDS})
    given = [f"{k}={asked[k]}" for k in SETTING_FIELDS if asked[k] is not None]
    return Plan(caps, kept.candidates, (kept.reasons[0], "resumed: as the checkpoint's run chose on this device",
                                        *(["given: " + ", ".join(given)] if given else [])))


def decide(asked, previous, caps, iterations, measure, device_reason=None):
    """(settings, record) of a run of `iterations` more steps on the device `caps` describes: plan_for's
    candidates, the fastest by the probe (choose), and what the run's config records of them: the
    settings, why (speed_reason), the probe's images/s (speed_probe) and the device (device_name).

    asked: SETTING_FIELDS -> the value a flag gave, None where none did; previous: the config of the run
    resumed, None for a new one; measure(settings, steps) -> images/s, the probe's; device_reason: why the
    device is this one (device_choice), put first in the reason."""
    settings, probe, reason = choose(plan_for(asked, previous, caps), iterations, measure)
    reason = f"{device_reason}; {reason}" if device_reason else reason
    return settings, dict(dataclasses.asdict(settings), speed_reason=reason, speed_probe=probe, device_name=caps.name)


def time_steps(step, windows, window_steps, warmup, device):
    """Images/s of each of `windows` timed windows of `window_steps` calls of step() (one training step,
    returning the images it trained on), after `warmup` untimed calls; the device's queue is drained at
    each window's edges."""
    for _ in range(warmup):
        step()
    rates = []
    for _ in range(windows):
        sync(device)
        start = time.perf_counter()
        images = sum(step() for _ in range(window_steps))
        sync(device)
        rates.append(images / (time.perf_counter() - start))
    return rates


def probe_rate(step, steps, device):
    """The probe's images/s of step() over `steps` calls: PROBE_WARMUP untimed, then the faster of two
    windows (the cores may be shared)."""
    return max(time_steps(step, 2, max(1, (steps - PROBE_WARMUP) // 2), PROBE_WARMUP, device))


def sync(device):
    """Wait for the work queued on a GPU (CUDA or Apple's), so a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_call(fn, device):
    """(result, seconds) of fn(), with the device's queued work included (bench.py, bench_figures.py)."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def matmul_gflop_per_s(device, n=4096, repeats=5, dtype=torch.float32):
    """GFLOP/s of a large square matmul in dtype: about the most this device's arithmetic gives."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    _, seconds = time_call(lambda: [a @ b for _ in range(repeats)], device)
    return 2 * n ** 3 * repeats / seconds / 1e9


# --------------------------------------------------------------------------- running the settings

def autocast(device, precision):
    # No cast cache: each weight is cast once a step anyway, and a CUDA graph must not keep casts alive.
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision], cache_enabled=False)


def grad_scaler(device, precision):
    """fp16's GradScaler (torch.amp.GradScaler runs on a CPU too), None for the other precisions."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def match_memory_format(optimizer):
    """Give each state tensor of the optimizer its parameter's strides. A checkpoint resumed in another
    memory format keeps Adam's moments in the old strides, which sends capturable foreach Adam down its
    per-tensor path (and makes the fused kernels refuse)."""
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def use_device(device):
    """Make `device` the one torch works on, before anything runs there. On CUDA: the current device
    (torch.autocast's bf16 check, torch.cuda.graph's synchronize and the default streams use it, so
    `--device cuda:1` would otherwise make a context on cuda:0 too), and cuDNN's benchmark mode: every
    step has the same shapes (two batch sizes a run), its best case, so cuDNN times its algorithms for
    each shape once and keeps the fastest. The algorithm it keeps can differ from process to process,
    which is why a resumed GPU run matches one unbroken run to rounding, not bit for bit
    (docs/performance.md). A CPU needs nothing."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
