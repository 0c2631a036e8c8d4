"""The device's speed settings (speed.py): the decision for a table of devices given by their
capabilities (CI has no GPU), the probe that keeps the fastest candidate, --show-settings, fp16 with a
GradScaler on a CPU, and the CUDA-graph step, whose parts (capturable Adam, a tensor lr under StepLR, the
warm-up that must leave no trace, one graph per batch size, the fallback to eager steps) are checked on a
CPU against the plain step. The capture itself needs a GPU and is not tested here."""
import importlib
import json

import pytest
import torch

import cifar10

import cuda_graph
import data
import checkpoint
import speed
import steps
import train
import utils
from conftest import assert_one_line_error, run_in_process, run_script
from model import ResNet
from speed import Capabilities, Settings


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_train_py_learns_on_a_cpu_with_the_cuda_default_settings(small_data_dir, tmp_path, monkeypatch):
    """CI has no GPU: this runs, end to end on a CPU, the numerics an Ampere-or-later GPU gets by default
    (bf16 autocast, channels_last), all but the CUDA graph, and checks the task is learned. Small enough
    for a CPU that emulates bf16 (~25x slower than fp32 on an AVX2 EPYC): width 8, 64 steps of 64
    images. (--compile is not run here: on 2 busy CPU cores a 17-iteration width-8 run took 257 s with
    it against 14 s without.)"""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # bf16 on 2 threads crawls when the cores are shared
    ckpt = tmp_path / "cuda_defaults.pt"
    proc = run_script("train.py", "--data-dir", small_data_dir, "--width", 8, "--batch-size", 64, "--lr", 3e-3,
                      "--iterations", 64, "--bf16", "--channels-last", "--device", "cpu",
                      "--checkpoint", ckpt, "--figures-dir", tmp_path / "figures")
    assert proc.returncode == 0, proc.stderr
    assert "on cpu: bf16 channels_last" in proc.stdout.splitlines()[0]
    saved = load(ckpt)
    # the config records what the run really used, and why
    assert {k: saved["config"][k] for k in speed.SETTING_FIELDS} == dict(
        precision="bf16", channels_last=True, cuda_graph=False, compile=False)
    assert "given: precision=bf16, channels_last=True" in saved["config"]["speed_reason"]
    # the synthetic gratings are learned (chance is 0.1; 0.96 seen), in fp32 and bf16 alike (0.94 seen)
    assert saved["history"]["test_acc"][-1] >= 0.85, saved["history"]["test_acc"]
    # and the checkpoint is an ordinary one: fp32 weights the plot scripts load
    assert all(v.dtype in (torch.float32, torch.int64) for v in saved["model"].values())


# --------------------------------------------------------------------------- the decision, device by device

T4 = Capabilities("cuda", "Tesla T4", compute_capability=(7, 5))
V100 = Capabilities("cuda", "Tesla V100-SXM2-16GB", compute_capability=(7, 0))
A100 = Capabilities("cuda", "NVIDIA A100-SXM4-80GB", compute_capability=(8, 0))
H100 = Capabilities("cuda", "NVIDIA H100 80GB HBM3", compute_capability=(9, 0))
RTX4090 = Capabilities("cuda", "NVIDIA GeForce RTX 4090", compute_capability=(8, 9))
P100 = Capabilities("cuda", "Tesla P100-PCIE-16GB", compute_capability=(6, 0))
AVX2_CPU = Capabilities("cpu", "AMD EPYC", native_bf16=False, detail="no AMX or AVX512-BF16; ATen dispatch AVX2")
AMX_CPU = Capabilities("cpu", "Intel Xeon", native_bf16=True, detail="amx_bf16, avx512_bf16; ATen dispatch AVX512")
APPLE_GPU = Capabilities("mps", "Apple GPU on arm", native_fp16=True, detail="torch autocasts fp16 on mps")
APPLE_GPU_OLD_TORCH = Capabilities("mps", "Apple GPU on arm", native_fp16=False, detail="torch does not autocast")

S = Settings
# device -> the candidates the rules leave, the rules' default (kept without a probe) first
DECISIONS = {
    "T4": (T4, [S("fp16", True), S("fp16", False)]),  # eager: GradScaler syncs with the host
    "V100": (V100, [S("fp16", True), S("fp16", False)]),
    "A100": (A100, [S("bf16", True, True), S("bf16", True, False), S("bf16", False, True), S("bf16", False, False)]),
    "H100": (H100, [S("bf16", True, True), S("bf16", True, False), S("bf16", False, True), S("bf16", False, False)]),
    "RTX 4090": (RTX4090, [S("bf16", True, True), S("bf16", True, False), S("bf16", False, True),
                           S("bf16", False, False)]),
    "P100": (P100, [S("fp32", False, True), S("fp32", False, False), S("fp32", True, True), S("fp32", True, False)]),
    "AVX2 CPU": (AVX2_CPU, [S("fp32", False), S("fp32", True)]),
    "AMX CPU": (AMX_CPU, [S("fp32", False), S("fp32", True), S("bf16", False), S("bf16", True)]),
    "Apple GPU": (APPLE_GPU, [S("fp32", False), S("fp32", True), S("fp16", False), S("fp16", True)]),
    "Apple GPU, no fp16 autocast": (APPLE_GPU_OLD_TORCH, [S("fp32", False), S("fp32", True)]),
}
UNSET = dict.fromkeys(speed.SETTING_FIELDS)


@pytest.mark.parametrize("name", DECISIONS)
def test_the_rules_leave_only_what_can_be_fast_on_each_device(name):
    caps, expected = DECISIONS[name]
    plan = speed.plan(caps, UNSET)
    assert list(plan.candidates) == expected
    # never a slow precision: bf16 only from compute capability 8.0 or on a CPU with bf16 units, fp16 only
    # on 7.x, and fp16 never in a graph (GradScaler's host sync)
    for c in plan.candidates:
        if c.precision == "bf16":
            assert (caps.kind == "cuda" and caps.compute_capability >= (8, 0)) or caps.native_bf16
        assert c.precision != "fp16" or caps.native_fp16 or (caps.compute_capability[0] == 7 and not c.cuda_graph)
        assert caps.kind == "cuda" or not c.cuda_graph
        assert not c.compile
    assert plan.reasons[0] == caps.describe() and name.split()[0] in caps.describe() + name
    assert plan.compile_trial == (caps.kind == "cpu")  # compile is weighed on a CPU only


def test_auto_is_a_cuda_gpu_else_an_apple_gpu_else_the_cpu(monkeypatch):
    """--device auto with cuda absent and mps present (mocked) picks mps, says why, and gets mps's rules."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    device, why = speed.device_choice("auto")
    assert device.type == "mps" and "Apple GPU" in why
    assert speed.resolve_device("auto") == device and speed.resolve_device("mps").type == "mps"
    monkeypatch.setattr(speed, "mps_fp16_autocast", lambda: True)
    caps = speed.detect(device)
    assert caps.kind == "mps" and caps.native_fp16
    plan = speed.plan(caps, UNSET)
    assert list(plan.candidates) == DECISIONS["Apple GPU"][1] and not plan.compile_trial
    assert "fp16 autocast" in plan.reasons[1]
    # the reason names the device's choice first, as the start-up line and --show-settings print it
    settings, record = speed.decide(UNSET, None, caps, 10, lambda c, n: 1.0, why)
    assert settings == S("fp32", False) and record["speed_reason"].startswith("auto: no CUDA GPU, an Apple GPU")
    with pytest.raises(utils.UserError, match="--cuda-graph needs a CUDA device"):
        speed.plan(caps, dict(UNSET, cuda_graph=True))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert speed.device_choice("auto") == (torch.device("cpu"), "auto: no CUDA or Apple GPU")
    with pytest.raises(utils.UserError, match="no mps device"):
        speed.resolve_device("mps")


@pytest.mark.parametrize("name", DECISIONS)
def test_the_probe_keeps_the_fastest_candidate_and_is_skipped_for_short_runs(name):
    caps, expected = DECISIONS[name]
    plan = speed.plan(caps, UNSET)
    g = torch.Generator().manual_seed(len(name))
    rates = {c: float(r) for c, r in zip(plan.candidates, torch.rand(len(expected), generator=g) * 1000)}
    asked = []

    def measure(settings, steps):
        asked.append(steps)
        return rates[settings]

    chosen, probe, reason = speed.choose(plan, 20_332, measure)
    if len(expected) > 1:
        assert chosen == max(rates, key=rates.get)
        assert probe == {c.label(): r for c, r in rates.items()} and chosen.label() in reason
        # well under 1 % of the run: the probe's steps, all candidates together, within PROBE_SHARE of it
        assert sum(asked) <= speed.PROBE_SHARE * 20_332 and min(asked) >= speed.PROBE_MIN_STEPS
    asked.clear()
    short, probe, reason = speed.choose(plan, 300, measure)  # a smoke run: no probe, the rules' default
    assert short == expected[0] and probe == {} and asked == []
    assert len(expected) == 1 or "probe skipped" in reason


def test_a_flag_given_always_wins_and_conflicts_are_one_line():
    # even a setting the rules would not pick: bf16 on a CPU that emulates it, fp32 on an A100
    assert speed.plan(AVX2_CPU, dict(UNSET, precision="bf16")).candidates == (S("bf16", False), S("bf16", True))
    assert speed.plan(A100, dict(UNSET, precision="fp32", channels_last=False, cuda_graph=False)).candidates == (
        S("fp32", False, False),)
    # torch.compile replaces the graph; on CUDA it is never probed
    assert speed.plan(H100, dict(UNSET, compile=True)).candidates == (S("bf16", True, False, True),
                                                                      S("bf16", False, False, True))
    for caps, asked, words in [(AMX_CPU, dict(cuda_graph=True), "needs a CUDA device"),
                               (A100, dict(cuda_graph=True, compile=True), "pick one"),
                               (T4, dict(cuda_graph=True), "cannot run with fp16")]:
        with pytest.raises(utils.UserError, match=words):
            speed.plan(caps, dict(UNSET, **asked))


def fake_probe(eager_rates, compiled_rate, compile_s, batch=128, fails=False):
    """(measure, clock, measured) for speed.choose: a measure that takes, on the fake clock, the probe's
    steps at each setting's images/s (eager_rates: channels_last -> images/s), plus compile_s to compile
    a compiled one (or raises, `fails`), as a CPU's probe takes them."""
    now, measured = [0.0], []

    def measure(settings, steps):
        measured.append(settings)
        if settings.compile and fails:
            raise RuntimeError("InductorError: no working C++ compiler found")
        now[0] += steps * batch / (compiled_rate if settings.compile else eager_rates[settings.channels_last])
        now[0] += compile_s if settings.compile else 0.0
        return compiled_rate if settings.compile else eager_rates[settings.channels_last]
    return measure, lambda: now[0], measured


RECIPE_ITERATIONS = 20_332  # 52 epochs of 50,000 images at batch 128


def test_a_long_cpu_run_is_compiled_where_the_probe_finds_that_it_repays_its_compile_time():
    """The AVX2 EPYC's figures (2026-12-04: channels_last 70.0 images/s eager, 80.6 compiled after 58 s of
    compiling; NCHW 67.7): the full recipe, ~10 h eagerly, saves over an hour compiled, so the probe
    keeps fp32 channels_last compiled, and its figures and reason say so."""
    measure, clock, measured = fake_probe({False: 67.7, True: 70.0}, 80.6, 58)
    chosen, probe, reason = speed.choose(speed.plan(AVX2_CPU, UNSET), RECIPE_ITERATIONS, measure, clock)
    assert chosen == S("fp32", True, False, True)
    assert measured == [S("fp32", False), S("fp32", True), S("fp32", True, False, True)]  # one compile: the fastest's
    assert probe == {"fp32 NCHW": 67.7, "fp32 channels_last": 70.0, "fp32 channels_last compile": 80.6}
    saved_min = RECIPE_ITERATIONS * 128 * (1 / 70.0 - 1 / 80.6) / 60
    assert f"after ~58 s compiling: saves ~{saved_min:.0f} min" in reason and "kept" in reason


@pytest.mark.parametrize("compiled_rate, compile_s, words", [
    (68.0, 58, "no faster, so eager"),                   # compiled slower than eager
    (71.0, 1500, "less than 2 compiles cost, so eager"),  # 1.4 % faster saves ~20 min: not 2 x 25 min of compiling
])
def test_a_compile_that_does_not_repay_itself_is_not_kept(compiled_rate, compile_s, words):
    measure, clock, _ = fake_probe({False: 67.7, True: 70.0}, compiled_rate, compile_s)
    chosen, probe, reason = speed.choose(speed.plan(AVX2_CPU, UNSET), RECIPE_ITERATIONS, measure, clock)
    assert chosen == S("fp32", True) and probe["fp32 channels_last compile"] == compiled_rate and words in reason


def test_compile_is_not_tried_for_a_short_run_a_flag_on_cuda_or_where_it_fails():
    # the AMX Xeon at ~320 images/s: 4,800 iterations (the least that the probe runs for 4 candidates)
    # take ~32 min eagerly, under the hour from which compiling is tried
    measure, clock, measured = fake_probe({False: 300.0, True: 320.0}, 400.0, 30)
    chosen, probe, reason = speed.choose(speed.plan(AMX_CPU, UNSET), 4_800, measure, clock)
    assert not chosen.compile and not any(s.compile for s in measured) and "compile not tried" in reason
    assert len(probe) == 4
    for caps, asked in [(AVX2_CPU, dict(UNSET, compile=False)), (H100, UNSET)]:  # --no-compile; CUDA has graphs
        measure, clock, measured = fake_probe({False: 67.7, True: 70.0}, 80.6, 58)
        chosen, probe, reason = speed.choose(speed.plan(caps, asked), RECIPE_ITERATIONS, measure, clock)
        assert not any(s.compile for s in measured) and "compile not tried" not in reason and "compiled" not in reason
    measure, clock, _ = fake_probe({False: 67.7, True: 70.0}, 80.6, 58, fails=True)
    chosen, probe, reason = speed.choose(speed.plan(AVX2_CPU, UNSET), RECIPE_ITERATIONS, measure, clock)
    assert chosen == S("fp32", True) and "compile failed (RuntimeError: InductorError" in reason


def test_this_cpus_bf16_units_are_found_as_its_flags_say():
    """speed.detect through torch against the kernel's own list of the CPU's flags (an independent source)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith(("flags", "Features"))).split(":", 1)[1].split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags to compare with")
    caps = speed.detect(torch.device("cpu"))
    assert caps.native_bf16 == bool({"amx_bf16", "avx512_bf16", "bf16"} & set(flags)), (caps, flags)
    assert torch.backends.cpu.get_cpu_capability() in caps.detail


def test_show_settings_prints_the_probed_choice_as_one_json_line_and_trains_nothing(small_data_dir, tmp_path):
    ckpt = tmp_path / "c.pt"
    # 1,000 epochs of 32 iterations: long enough for the probe (tiny at width 4); --no-compile, since on a
    # slow enough CPU the run would be long enough to weigh compiling (minutes; tested apart, with a fake probe)
    proc = run_script("train.py", "--data-dir", small_data_dir, "--width", 4, "--batch-size", 32, "--epochs", 1000,
                      "--device", "cpu", "--checkpoint", ckpt, "--figures-dir", tmp_path / "figures",
                      "--show-settings", "--no-compile", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    shown = json.loads(lines[0])
    assert set(shown) == {"device", "precision", "channels_last", "cuda_graph", "compile", "reason", "probe"}
    plan = speed.plan(speed.detect(torch.device("cpu")), UNSET)
    assert set(shown["probe"]) == {c.label() for c in plan.candidates}
    chosen = Settings(**{k: shown[k] for k in speed.SETTING_FIELDS})
    assert chosen in plan.candidates and shown["probe"][chosen.label()] == max(shown["probe"].values()) > 0
    assert not ckpt.exists() and not (tmp_path / "figures").exists()


def test_show_settings_reads_no_data(tmp_path, monkeypatch):
    """--show-settings decides and prints the settings before any data is read or downloaded:
    with a --data-dir that holds nothing, and a download that could only fail, it prints them and leaves
    the folder empty. The run's length is counted in the data it would train on: CIFAR-10's 50,000
    training images (4 epochs of 1,563 batches of 32: long enough for the probe), the --synthetic data's
    10,000 (4 epochs of 313: too short for it)."""
    empty = tmp_path / "no_data"
    empty.mkdir()
    monkeypatch.setenv(cifar10.URL_FOR_TESTS, "http://127.0.0.1:9/cifar-10-python.tar.gz")  # the discard port
    plan = speed.plan(speed.detect(torch.device("cpu")), UNSET)
    for synthetic in (False, True):
        proc = run_in_process("train.py", ["--data-dir", str(empty), "--width", "4", "--batch-size", "32", "--epochs", "4",
                                           "--device", "cpu", "--checkpoint", str(tmp_path / "c.pt"), "--show-settings",
                                           *(["--synthetic"] if synthetic else [])])
        assert proc.returncode == 0, proc.stderr
        shown = json.loads(proc.stdout)
        assert Settings(**{k: shown[k] for k in speed.SETTING_FIELDS}) in plan.candidates
        if synthetic:
            assert shown["probe"] == {} and f"probe skipped: {4 * 313} iterations" in shown["reason"]
        else:
            assert set(shown["probe"]) == {c.label() for c in plan.candidates}
    assert list(empty.iterdir()) == [] and list(tmp_path.iterdir()) == [empty]


def test_settings_that_cannot_run_are_refused_before_any_data_is_read(tmp_path, monkeypatch):
    """The rules' refusals come before the data: a user without CIFAR-10 is not made to download it first."""
    empty = tmp_path / "no_data"
    empty.mkdir()
    monkeypatch.setenv(cifar10.URL_FOR_TESTS, "http://127.0.0.1:9/cifar-10-python.tar.gz")  # the discard port
    proc = run_in_process("train.py", ["--data-dir", str(empty), "--device", "cpu", "--cuda-graph",
                                       "--checkpoint", str(tmp_path / "c.pt"), "--figures-dir", str(tmp_path / "f")])
    assert_one_line_error(proc, "--cuda-graph needs a CUDA device")
    assert list(empty.iterdir()) == []


def test_a_resumed_run_keeps_the_settings_its_run_chose_on_this_device():
    caps = AMX_CPU
    ckpt = {"config": dict(device_name=caps.name, precision="bf16", channels_last=True, cuda_graph=False,
                           compile=False)}
    assert speed.plan_for(UNSET, ckpt["config"], caps).candidates == (S("bf16", True),)
    assert speed.plan_for(dict(UNSET, channels_last=False), ckpt["config"], caps).candidates == (S("bf16", False),)
    # made on another machine: decided anew
    assert speed.plan_for(UNSET, ckpt["config"], AVX2_CPU).candidates == speed.plan(AVX2_CPU, UNSET).candidates


# --------------------------------------------------------------------------- fp16 with a GradScaler, on a CPU

def test_an_fp16_step_with_inf_gradients_is_skipped_and_the_scale_backs_off():
    model, batches = small_model_and_batches()
    optimizer, _ = steps.make_optimizer(model, steps.RECIPE)
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    # a scale of 2^100: the loss's gradient overflows fp16 in the autocast region's backward
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)
    steps.train_step(model, optimizer, *batches[0], precision="fp16", scaler=scaler)
    for name, weight in model.named_parameters():
        assert torch.equal(weight, before[name]), name  # not stepped
    assert not optimizer.state  # Adam never ran
    assert scaler.get_scale() == 2.0 ** 99


def test_a_gradscaler_step_with_a_power_of_two_scale_equals_the_plain_step():
    """Scaling the loss by 2^k and the gradients back by 2^-k is exact in floating point: the same weights."""
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)):
        model, batches = small_model_and_batches()
        optimizer, _ = steps.make_optimizer(model, steps.RECIPE)
        for x, y in batches[:3]:
            steps.train_step(model, optimizer, x, y, scaler=scaler)
        results.append(model.state_dict())
    for name, tensor in results[0].items():
        assert torch.equal(results[1][name], tensor), name


def test_an_fp16_run_resumes_its_gradscaler_state(small_data_dir, tmp_path):
    """fp16 + GradScaler end to end on a CPU: stopped after 4 steps and resumed, the run ends where one run
    does, its scaler included (the growth tracker counts every step since the last skip). In-process and
    short: fp16's backward on a CPU is ~8x slower than fp32's even at width 4."""
    def run(ckpt, *args):
        train.main(["--data-dir", str(small_data_dir), "--width", "4", "--batch-size", "16", "--precision", "fp16",
                    "--device", "cpu", "--checkpoint", str(ckpt), "--figures-dir", str(tmp_path / "figures"), *args])
        return load(ckpt)  # weights_only=True: the scaler's state is plain numbers
    straight = run(tmp_path / "straight.pt", "--iterations", "8")
    run(tmp_path / "split.pt", "--iterations", "4")
    resumed = run(tmp_path / "split.pt", "--iterations", "8", "--resume")
    assert straight["config"]["precision"] == resumed["config"]["precision"] == "fp16"
    assert straight["scaler"] == resumed["scaler"] and straight["scaler"]["_growth_tracker"] >= 1
    assert straight["history"]["train_loss"] == resumed["history"]["train_loss"]
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


# --------------------------------------------------------------------------- the CUDA-graph step

def portable_optimizer(optimizer, scheduler):
    """(Adam's, StepLR's) state dicts as a checkpoint keeps them (checkpoint.portable)."""
    saved = checkpoint.portable(dict(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict()))
    return saved["optimizer"], saved["scheduler"]


def plain_step(model, optimizer, precision="fp32"):
    return lambda x, y: steps.train_step(model, optimizer, x, y, precision)


def small_model_and_batches(channels_last=False):
    """A width-4 model and 40 augmented images in batches of 16, 16 and 8: two epochs' worth."""
    images, labels = cifar10.make_synthetic_images(40, seed=5)
    torch.manual_seed(5)
    model = ResNet(4)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    batches = [batch for epoch in range(2)
               for batch in data.epoch_batches(images, labels, epoch, seed=5, batch_size=16,
                                                channels_last=channels_last)]
    assert [len(y) for _, y in batches] == [16, 16, 8, 16, 16, 8]
    return model, batches


def run_steps(model, batches, step_fn, scheduler):
    """Train on the batches, decaying the lr after each epoch (every 3 batches); the losses."""
    losses = []
    for i, (x, y) in enumerate(batches):
        loss, correct = step_fn(x, y)
        losses.append((loss.item(), correct.item()))
        if i % 3 == 2:
            scheduler.step()
    return losses


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_step_equals_the_plain_step_over_partial_batches_and_an_lr_decay(precision):
    """GraphedStep on a CPU runs its step eagerly where CUDA replays the graph: the same weights,
    BatchNorm statistics, Adam state and losses, bit for bit, as plain train_step. So its 3 warm-up steps
    per batch size leave no trace, and the full and the partial batch each get their own buffers."""
    config = dict(steps.RECIPE, lr_step_epochs=1)
    results = []
    for graphed in (False, True):
        model, batches = small_model_and_batches(channels_last=precision == "bf16")
        optimizer, scheduler = steps.make_optimizer(model, config)
        step_fn = plain_step(model, optimizer, precision)
        if graphed:
            step_fn = cuda_graph.GraphedStep(step_fn, model, optimizer)
        losses = run_steps(model, batches, step_fn, scheduler)
        results.append((losses, model.state_dict(), optimizer.state_dict()))
    (plain_losses, plain_weights, plain_adam), (graph_losses, graph_weights, graph_adam) = results
    assert graph_losses == plain_losses
    assert plain_weights.keys() == graph_weights.keys()
    for name, tensor in plain_weights.items():  # weights and BatchNorm buffers, num_batches_tracked too
        assert torch.equal(graph_weights[name], tensor), name
    for i, state in plain_adam["state"].items():
        assert state.keys() == graph_adam["state"][i].keys()
        for k, v in state.items():
            assert torch.equal(graph_adam["state"][i][k], v), (i, k)
    assert graph_adam["param_groups"][0]["lr"] == plain_adam["param_groups"][0]["lr"] == 1e-3 / 4
    assert sorted(step_fn.graphs) == [8, 16]



def graph_fails(how):
    """A GraphedStep._record that fails as a capture can on a GPU: raising, or giving an empty graph (on
    cuda:1 a capture on device 0's stream recorded nothing) whose replay returns stale outputs."""
    def record(self, step, device):
        if how == "raise":
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        outputs = step()  # the outputs the empty graph would hand back
        restore = cuda_graph.training_state(self.model, self.optimizer)
        return lambda: (cuda_graph.restore_training_state(self.model, self.optimizer, restore), outputs)[1]
    return record


@pytest.mark.parametrize("how", ["raise", "empty graph"])
def test_a_failed_capture_is_dropped_and_training_goes_on_eagerly_losing_nothing(monkeypatch, how):
    monkeypatch.setattr(cuda_graph.GraphedStep, "_record", graph_fails(how))
    config = dict(steps.RECIPE, lr_step_epochs=1)
    results, said = [], []
    for graphed in (False, True):
        model, batches = small_model_and_batches()
        optimizer, scheduler = steps.make_optimizer(model, config)
        step_fn = plain_step(model, optimizer)
        if graphed:
            step_fn = cuda_graph.GraphedStep(step_fn, model, optimizer, say=said.append)
        losses = run_steps(model, batches, step_fn, scheduler)
        results.append((losses, model.state_dict(), optimizer.state_dict()))
    (plain_losses, plain_weights, plain_adam), (losses, weights, adam) = results
    assert losses == plain_losses
    for name, tensor in plain_weights.items():
        assert torch.equal(weights[name], tensor), name
    for i, state in plain_adam["state"].items():
        for k, v in state.items():
            assert torch.equal(adam["state"][i][k], v), (i, k)
    assert len(said) == 1 and "dropped" in said[0] and "eagerly" in said[0]
    assert step_fn.dropped == said[0] and step_fn.graphs == {}
    if how == "empty graph":
        assert "first replay" in said[0]


def second_capture_fails(self, step, device):
    """A GraphedStep._record whose second capture (here the partial batch's, 8) raises; the first works."""
    self.records = getattr(self, "records", 0) + 1
    if self.records == 2:
        raise RuntimeError("CUDA error: out of memory")
    return step


def assert_same_training(a, b):
    """Two runs' (losses, weights, Adam state dict) are equal bit for bit."""
    (losses_a, weights_a, adam_a), (losses_b, weights_b, adam_b) = a, b
    assert losses_a == losses_b
    for name, tensor in weights_a.items():
        assert torch.equal(weights_b[name], tensor), name
    assert adam_a["state"].keys() == adam_b["state"].keys()
    for i, state in adam_a["state"].items():
        for k, v in state.items():
            assert torch.equal(adam_b["state"][i][k], v) and adam_b["state"][i][k].device == v.device, (i, k)


def test_a_failed_capture_drops_only_its_batch_sizes_graph(monkeypatch, capturable_on_cpu):
    """The partial batch's capture fails: its steps run eagerly, the full batch keeps its graph, and Adam
    stays capturable with the lr tensor that graph reads. The run equals a plain one with the same
    capturable Adam bit for bit, and the line says which size went and which stayed."""
    monkeypatch.setattr(cuda_graph.GraphedStep, "_record", second_capture_fails)
    config = dict(steps.RECIPE, lr_step_epochs=1)
    results, said = [], []
    for graphed in (False, True):
        model, batches = small_model_and_batches()
        optimizer, scheduler = steps.make_optimizer(model, config, cuda_graph=True)
        step_fn = plain_step(model, optimizer)
        if graphed:
            step_fn = cuda_graph.GraphedStep(step_fn, model, optimizer, say=said.append)
            held = optimizer.param_groups[0]["lr"]
        losses = run_steps(model, batches, step_fn, scheduler)
        results.append((losses, model.state_dict(), optimizer.state_dict()))
    assert_same_training(*results)
    assert sorted(step_fn.graphs) == [16] and list(step_fn.eager) == [8] and step_fn.dropped is None
    assert said == [step_fn.eager[8]] and "batch size 8 was dropped (RuntimeError: CUDA error: out of memory)" in said[0]
    assert "batch size 16 keeps its graph" in said[0]
    group = optimizer.param_groups[0]
    assert group["capturable"] and group["lr"] is held


def test_with_no_graph_left_adam_is_made_plain_and_the_run_equals_an_eager_one(monkeypatch, capturable_on_cpu):
    """Every capture fails: the run goes on eagerly with Adam as an eager run builds it (capturable off,
    a float lr, the step count on the CPU), and trains bit for bit as a plain eager run whose lr is the
    float32 lr tensor's value, the schedule's decays included."""
    monkeypatch.setattr(cuda_graph.GraphedStep, "_record", graph_fails("raise"))
    config = dict(steps.RECIPE, lr_step_epochs=1)
    results, said = [], []
    for graphed in (False, True):
        model, batches = small_model_and_batches()
        lr = torch.tensor(config["lr"]).item()  # what the graph's float32 lr tensor holds
        optimizer, scheduler = steps.make_optimizer(model, dict(config, lr=lr), cuda_graph=graphed)
        step_fn = plain_step(model, optimizer)
        if graphed:
            assert optimizer.param_groups[0]["capturable"]
            step_fn = cuda_graph.GraphedStep(step_fn, model, optimizer, say=said.append)
        losses = run_steps(model, batches, step_fn, scheduler)
        results.append((losses, model.state_dict(), optimizer.state_dict()))
    assert_same_training(*results)
    assert len(said) == 1 and step_fn.dropped == said[0] and step_fn.graphs == {} and step_fn.eager == {}
    group = optimizer.param_groups[0]
    assert group["capturable"] is False and type(group["lr"]) is float and group["lr"] == lr / 4
    assert all(state["step"].device.type == "cpu" and state["step"].item() == 6 for state in optimizer.state.values())


class FakeStreams:
    """The current CUDA stream, as torch.cuda.stream's context sets and restores it."""
    def __init__(self):
        self.current = "default stream"

    def stream(self, stream):
        streams = self

        class Context:
            def __enter__(self):
                self.before, streams.current = streams.current, stream

            def __exit__(self, *exc):
                streams.current = self.before
        return Context()


class FakeGraph:
    """A CUDAGraph whose capture a failed step invalidates: capture_end then raises, as CUDA does."""
    def __init__(self):
        self.state = "new"

    def capture_begin(self):
        self.state = "capturing"

    def capture_end(self):
        if self.state == "invalidated":
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        self.state = "captured"


class TorchGraphContext:
    """torch.cuda.graph as torch 2.14 writes it (torch/cuda/graphs.py), its CUDA calls left out: __enter__
    enters the stream context and begins the capture; __exit__ ends the capture, then leaves the context."""
    def __init__(self, cuda_graph, pool=None, stream=None):
        self.cuda_graph, self.stream_ctx = cuda_graph, torch.cuda.stream(stream)

    def __enter__(self):
        self.stream_ctx.__enter__()
        self.cuda_graph.capture_begin()

    def __exit__(self, *exc):
        self.cuda_graph.capture_end()
        self.stream_ctx.__exit__(*exc)


@pytest.fixture
def fake_capture(monkeypatch):
    streams = FakeStreams()
    monkeypatch.setattr(torch.cuda, "stream", streams.stream)
    monkeypatch.setattr(torch.cuda, "graph", TorchGraphContext)
    return streams


def failing_step(graph):
    def step():
        graph.state = "invalidated"  # as a host sync inside a capture invalidates it
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
    return step


def test_a_failed_capture_raises_its_first_error_and_puts_the_stream_back(fake_capture):
    graph = FakeGraph()
    with pytest.raises(RuntimeError) as bare:  # what torch.cuda.graph alone does, which capture_graph mends
        with torch.cuda.graph(graph, stream="capture stream"):
            failing_step(graph)()
    assert "previous error during capture" in str(bare.value) and fake_capture.current == "capture stream"

    fake_capture.current = "default stream"
    graph = FakeGraph()
    with pytest.raises(RuntimeError, match="not permitted when stream is capturing"):
        cuda_graph.capture_graph(graph, failing_step(graph), "capture stream", pool=None)
    assert fake_capture.current == "default stream"
    graph = FakeGraph()
    assert cuda_graph.capture_graph(graph, lambda: "outputs", "capture stream", pool=None) == "outputs"
    assert graph.state == "captured" and fake_capture.current == "default stream"


def test_use_device_makes_a_gpu_current_and_sets_cudnn_benchmark(monkeypatch):
    """`--device cuda:1` must be torch's current device before autocast's bf16 check runs (it asks the
    current device); a CPU run changes nothing."""
    made_current = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    speed.use_device(torch.device("cpu"))
    assert made_current == [] and torch.backends.cudnn.benchmark is False
    speed.use_device(torch.device("cuda", 1))
    assert made_current == [torch.device("cuda", 1)] and torch.backends.cudnn.benchmark is True


def test_the_graph_reads_the_live_lr_even_when_a_scheduler_replaces_it(capturable_on_cpu):
    """A graph reads the lr tensor it captured: one that turns up in its place (a float here) is copied
    into the held tensor, which goes back into the param group, so the step uses the new lr."""
    config = dict(steps.RECIPE)
    results = []
    for graphed in (False, True):
        model, batches = small_model_and_batches()
        optimizer, _ = steps.make_optimizer(model, config, cuda_graph=graphed)
        step_fn = plain_step(model, optimizer)
        if graphed:
            step_fn = cuda_graph.GraphedStep(step_fn, model, optimizer)
            held = optimizer.param_groups[0]["lr"]
        step_fn(*batches[0])
        optimizer.param_groups[0]["lr"] = 2.5e-4  # replaced, not updated in place
        step_fn(*batches[1])
        results.append(model.state_dict())
    assert optimizer.param_groups[0]["lr"] is held and held.item() == pytest.approx(2.5e-4, rel=1e-6)
    for name, tensor in results[0].items():
        torch.testing.assert_close(results[1][name], tensor, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("saved_channels_last", [True, False])
def test_adam_moments_take_the_resumed_models_memory_format(saved_channels_last):
    """A checkpoint resumed in the other memory format: Adam's moments get the parameters' strides (capturable
    foreach Adam otherwise falls to its per-tensor path), with the same values."""
    model, batches = small_model_and_batches(channels_last=saved_channels_last)
    optimizer, scheduler = steps.make_optimizer(model, steps.RECIPE)
    steps.train_step(model, optimizer, *batches[0])
    saved = portable_optimizer(optimizer, scheduler)[0]
    other = ResNet(4)
    other.load_state_dict(model.state_dict())
    if not saved_channels_last:
        other.to(memory_format=torch.channels_last)
    resumed, _ = steps.make_optimizer(other, steps.RECIPE)
    checkpoint.load_optimizer_state(resumed, saved)
    convs = 0
    for (p, state), q in zip(optimizer.state.items(), other.parameters()):
        for k in ("exp_avg", "exp_avg_sq"):
            moment = resumed.state[q][k]
            assert moment.stride() == q.stride() and torch.equal(moment, state[k]), k
        convs += p.dim() == 4 and p.stride() != q.stride()
    assert convs > 0  # the formats did differ


def test_normalize_builds_its_mean_and_std_once_per_device():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # first made in inference mode (evaluate), then used with autograd
        first = data.normalize(images)
    assert data.mean_std(images.device) is data.mean_std(images.device)
    mean, std = torch.tensor(data.CIFAR10_MEAN).view(3, 1, 1), torch.tensor(data.CIFAR10_STD).view(3, 1, 1)
    assert torch.equal(first, (images.float() / 255 - mean) / std)
    x = torch.zeros(1, 3, 2, 2, requires_grad=True)
    data.denormalize(x).sum().backward()  # std is saved for the backward: not an inference tensor
    torch.testing.assert_close(x.grad, std.expand(1, 3, 2, 2))


def test_figures_are_redrawn_at_most_every_few_seconds_and_at_the_end(small_data_dir, tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(train, "save_progress_figures", lambda history, *args: drawn.append(len(history["train_loss"])))
    monkeypatch.setattr(train, "FIGURES_EVERY_S", 3600)
    monkeypatch.setattr(train, "LOG_EVERY", 16)  # each epoch's last step also fills the step log
    train.main(["--data-dir", str(small_data_dir), "--width", "4", "--batch-size", "64", "--epochs", "3",
                "--device", "cpu", "--checkpoint", str(tmp_path / "c.pt"), "--figures-dir", str(tmp_path)])
    assert drawn == [16, 48]  # the first epoch's, then none for an hour, and the run's end
    saved = load(tmp_path / "c.pt")
    assert saved["iteration"] == 48 and len(saved["history"]["train_loss"]) == 48


def test_a_snapshot_is_a_copy_that_training_cannot_change():
    model, batches = small_model_and_batches(channels_last=True)
    optimizer, scheduler = steps.make_optimizer(model, steps.RECIPE)
    steps.train_step(model, optimizer, *batches[0])
    state, ready = checkpoint.snapshot(dict(model=model.state_dict(), optimizer=optimizer.state_dict()))
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    steps.train_step(model, optimizer, *batches[1])  # mutates the weights in place
    ready()
    for name, tensor in expected.items():
        assert torch.equal(state["model"][name], tensor) and state["model"][name].stride() == tensor.stride(), name
    assert not torch.equal(state["model"]["conv1.conv.weight"], model.state_dict()["conv1.conv.weight"])


@pytest.fixture
def capturable_on_cpu(monkeypatch):
    """torch only lets capturable Adam step on accelerators; its arithmetic is plain tensor ops, so
    allowing the CPU here runs exactly the update a CUDA graph records."""
    adam_module = importlib.import_module("torch.optim.adam")  # torch.optim.Adam's module
    monkeypatch.setattr(adam_module, "_get_capturable_supported_devices",
                        lambda supports_xla=True: ["cpu"])


@pytest.mark.parametrize("foreach", [False, True])  # on CUDA Adam takes the foreach path
def test_capturable_adam_with_a_tensor_lr_follows_the_recipe_and_its_schedule(capturable_on_cpu, foreach):
    config = dict(steps.RECIPE, lr_step_epochs=2)
    torch.manual_seed(0)
    reference = ResNet(4)
    graphed = ResNet(4)
    graphed.load_state_dict(reference.state_dict())
    opt_ref, sched_ref = steps.make_optimizer(reference, config)
    opt_graph, sched_graph = steps.make_optimizer(graphed, config, cuda_graph=True)
    group = opt_graph.param_groups[0]
    group["foreach"] = foreach
    lr = group["lr"]
    assert isinstance(lr, torch.Tensor) and group["capturable"]
    g = torch.Generator().manual_seed(1)
    for epoch in range(7):
        for p, q in zip(reference.parameters(), graphed.parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt_ref.step()
        opt_graph.step()
        sched_ref.step()
        sched_graph.step()
        # StepLR changes the lr in place: the very tensor a graph captured sees every decay
        assert opt_graph.param_groups[0]["lr"] is lr
        assert lr.item() == pytest.approx(opt_ref.param_groups[0]["lr"], rel=1e-6)
    assert opt_ref.param_groups[0]["lr"] == 1e-3 / 8
    for (name, p), q in zip(reference.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7, msg=name)  # the lr is float32 on the graph path

    # A checkpoint holds plain floats whichever way the run stepped, and each kind of run loads the
    # other's: graphed -> plain and plain -> graphed, and the next steps agree.
    saved_graph, saved_sched = portable_optimizer(opt_graph, sched_graph)
    assert saved_graph["param_groups"][0]["lr"] == pytest.approx(1e-3 / 8)
    assert saved_graph["param_groups"][0]["capturable"] is False
    assert all(not isinstance(v, torch.Tensor) for v in saved_sched["base_lrs"] + saved_sched["_last_lr"])
    saved_ref, _ = portable_optimizer(opt_ref, sched_ref)
    model_a, model_b = ResNet(4), ResNet(4)
    model_a.load_state_dict(graphed.state_dict())
    model_b.load_state_dict(graphed.state_dict())
    plain, _ = steps.make_optimizer(model_a, config)
    checkpoint.load_optimizer_state(plain, saved_graph)
    regraphed, _ = steps.make_optimizer(model_b, config, cuda_graph=True)
    new_lr = regraphed.param_groups[0]["lr"]
    checkpoint.load_optimizer_state(regraphed, saved_ref)
    assert regraphed.param_groups[0]["lr"] is new_lr and new_lr.item() == pytest.approx(1e-3 / 8)
    assert regraphed.param_groups[0]["capturable"] and not plain.param_groups[0]["capturable"]
    assert plain.param_groups[0]["lr"] == pytest.approx(1e-3 / 8)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        p.grad = torch.randn(p.shape, generator=g)
        q.grad = p.grad.clone()
    plain.step()
    regraphed.step()
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7, msg=name)
