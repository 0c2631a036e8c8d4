"""The CUDA path on a real GPU: CUDA-graph steps against eager ones, bf16 autocast and fp16 with a
GradScaler against fp32, the fallback when a capture fails (forced by a host sync inside it), a second
GPU, and a run resumed CPU -> GPU -> CPU. Skipped, and counted as skipped, where torch sees no GPU (CI);
benchmarks/gpu_check.sh runs them on one. test_speed.py checks on a CPU what can be checked there.

GPU steps are not bit-exact (cuDNN's choices, atomics in some kernels, bf16), and two runs that differ
by rounding drift apart over steps, so a graph run is checked in lockstep: each of its steps against an
eager step from the same state on the same batch, within tolerances that a graph which skipped,
repeated or misread a step (a stale input or lr) misses by the size of a step."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import cifar10

import cuda_graph
import data
import speed
import steps
from conftest import ROOT, run_in_process, script_env
from model import ResNet
from cuda_graph import GraphedStep

GPU = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (torch.cuda.is_available() is False); "
                                                "benchmarks/gpu_check.sh runs these on one")
CUDA = torch.device("cuda", 0)
AMPERE = GPU and torch.cuda.get_device_capability(CUDA)[0] >= 8
needs_bf16 = pytest.mark.skipif(not AMPERE, reason="needs a GPU of compute capability 8.0 or more (bf16 convolutions)")
two_gpus = pytest.mark.skipif(not GPU or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")

BATCH, IMAGES, EPOCHS = 32, 200, 3   # 7 steps an epoch (6 of 32, the last of 8): 21 steps in all
STEPS_PER_EPOCH = -(-IMAGES // BATCH)


def batches_on(device, channels_last):
    """The steps' (input, labels) batches of EPOCHS epochs of learnable synthetic images on `device`."""
    x, y = (t.to(device) for t in cifar10.make_synthetic_images(IMAGES, seed=5))
    return [batch for epoch in range(EPOCHS)
            for batch in data.epoch_batches(x, y, epoch, seed=5, batch_size=BATCH, channels_last=channels_last)]


def train_steps(device, settings, batches):
    """Train a fresh seeded width-8 model eagerly with train.py's optimizer and step under `settings` (a
    speed.Settings), decaying the lr after every epoch. (losses, model, optimizer, scaler)."""
    torch.manual_seed(0)
    model = ResNet(8).to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer, scheduler = steps.make_optimizer(model, dict(steps.RECIPE, lr_step_epochs=1))
    scaler = speed.grad_scaler(device, settings.precision)
    step = steps.make_step(model, optimizer, settings, scaler)
    losses = []
    for i, (x, y) in enumerate(batches):
        losses.append(step(x, y)[0].item())
        if i % STEPS_PER_EPOCH == STEPS_PER_EPOCH - 1:
            scheduler.step()
    return losses, model, optimizer, scaler


def copy_training_state(source, source_opt, target, target_opt):
    """target and its capturable Adam take source's weights, BatchNorm buffers, Adam state and lr."""
    target.load_state_dict(source.state_dict())
    for p, q in zip(source.parameters(), target.parameters()):
        target_opt.state[q] = {k: v.detach().to(q.device, copy=True) for k, v in source_opt.state.get(p, {}).items()}
    target_opt.param_groups[0]["lr"].fill_(float(source_opt.param_groups[0]["lr"]))


LOCKSTEP = {"fp32": (1e-3, 1e-2), "bf16": (2e-2, GraphedStep.TOLERANCE)}  # (loss rtol, relative update gap)


def lockstep(device, precision, wrap=None, say=None):
    """21 steps of a GraphedStep run (wrap(step) -> step replaces the step it captures), each checked
    against an eager step of the same capturable Adam from the very state the graph stepped from, on
    the same batch: the two losses and updates must agree to rounding. Run apart, two runs would not:
    the rounding of a GPU (atomics, cuDNN's choices, bf16) grows over steps like any perturbation (on a
    CPU, 1e-7 relative on the initial weights moved the 21st loss by 0.07). (the GraphedStep, its
    optimizer, its losses)."""
    batches = batches_on(device, channels_last=True)
    torch.manual_seed(0)
    models = [ResNet(8).to(device).to(memory_format=torch.channels_last) for _ in range(2)]
    (graphed, optimizer, scheduler), (eager, eager_opt, _) = (
        (m, *steps.make_optimizer(m, dict(steps.RECIPE, lr_step_epochs=1), cuda_graph=True)) for m in models)
    inner = lambda x, y: steps.train_step(graphed, optimizer, x, y, precision)
    step = cuda_graph.GraphedStep(wrap(inner) if wrap else inner, graphed, optimizer, say)
    loss_rtol, update_gap = LOCKSTEP[precision]
    losses = []
    for i, (x, y) in enumerate(batches):
        copy_training_state(graphed, optimizer, eager, eager_opt)
        before = [p.detach().clone() for p in graphed.parameters()]
        loss = step(x, y)[0].item()
        eager_loss = steps.train_step(eager, eager_opt, x, y, precision)[0].item()
        update = torch.cat([(p.detach() - b).flatten() for p, b in zip(graphed.parameters(), before)])
        eager_update = torch.cat([(q.detach() - b).flatten() for q, b in zip(eager.parameters(), before)])
        assert loss == pytest.approx(eager_loss, rel=loss_rtol), i
        assert ((update - eager_update).norm() / eager_update.norm()).item() < update_gap, i
        losses.append(loss)
        if i % STEPS_PER_EPOCH == STEPS_PER_EPOCH - 1:
            scheduler.step()
    assert all(state["step"] == len(batches) for state in optimizer.state.values())
    return step, optimizer, losses


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=needs_bf16)])
def test_graph_steps_agree_with_eager_steps_over_21_steps(precision):
    """Both batch sizes captured (full and partial) and replayed, two lr decays read through the held lr tensor."""
    step, optimizer, _ = lockstep(CUDA, precision)
    assert step.dropped is None and step.eager == {} and sorted(step.graphs) == [8, BATCH]
    assert optimizer.param_groups[0]["lr"].item() == pytest.approx(1e-3 / 8)


@pytest.mark.parametrize("precision", [pytest.param("bf16", marks=needs_bf16), "fp16"])
def test_autocast_steps_compute_in_their_precision_and_learn_as_fp32_does(precision):
    """bf16 autocast, and fp16 autocast with a GradScaler (eager, as the rules run it), memorising one
    batch for 21 steps: the convolutions really run in the half precision, and the losses follow fp32's
    to its rounding (on a CPU within 0.01) while they fall by a factor of ten. fp16 skips no step."""
    batches = batches_on(CUDA, channels_last=True)[:1] * 21
    fp32 = train_steps(CUDA, speed.Settings("fp32", True, False), batches)
    dtypes = set()
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, out: dtypes.add(out.dtype) if isinstance(m, torch.nn.Conv2d) else None)
    try:
        losses, _, optimizer, scaler = train_steps(CUDA, speed.Settings(precision, True, False), batches)
    finally:
        hook.remove()
    assert dtypes == {speed.AUTOCAST_DTYPES[precision]}
    assert fp32[0][-1] < 0.3 * fp32[0][0] and losses[-1] < 0.3 * losses[0]
    assert all(abs(a - b) < 0.05 for a, b in zip(losses, fp32[0])), (losses, fp32[0])
    assert all(state["step"] == 21 for state in optimizer.state.values())
    if scaler is not None:
        assert scaler.get_scale() == 2.0 ** 16  # never backed off: no step was skipped


def host_sync_in_capture(sizes, raised):
    """wrap(step) for lockstep: while a batch of one of `sizes` is being captured, the step reads a
    number on the host, which no CUDA graph can hold; the error it raises is kept in `raised`."""
    def wrap(step):
        def synced(x, y):
            if len(y) in sizes and torch.cuda.is_current_stream_capturing():
                try:
                    y.sum().item()
                except Exception as err:
                    raised.append(" ".join(str(err).split()))
                    raise
            return step(x, y)
        return synced
    return wrap


def test_a_failed_partial_batch_capture_drops_only_its_graph_and_tells_the_first_error():
    raised, said = [], []
    step, optimizer, _ = lockstep(CUDA, "fp32", wrap=host_sync_in_capture({8}, raised), say=said.append)
    assert len(raised) == 1 and len(said) == 1
    assert raised[0][:150] in said[0] and "previous error during capture" not in said[0]
    assert sorted(step.graphs) == [BATCH] and list(step.eager) == [8] and step.dropped is None
    assert optimizer.param_groups[0]["capturable"] and isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
    assert torch.cuda.current_stream(CUDA) == torch.cuda.default_stream(CUDA)  # the capture stream is not left current
    assert not torch.cuda.is_current_stream_capturing()


def test_with_every_capture_failing_the_run_goes_on_eagerly_with_plain_adam():
    raised, said = [], []
    step, optimizer, _ = lockstep(CUDA, "fp32", wrap=host_sync_in_capture({8, BATCH}, raised), say=said.append)
    assert len(raised) == len(said) == 1 and step.dropped == said[0] and raised[0][:150] in said[0]
    assert step.graphs == {} and torch.cuda.current_stream(CUDA) == torch.cuda.default_stream(CUDA)
    group = optimizer.param_groups[0]
    assert group["capturable"] is False and type(group["lr"]) is float and group["lr"] == pytest.approx(1e-3 / 8)
    assert all(state["step"].device.type == "cpu" for state in optimizer.state.values())


@two_gpus
def test_a_graph_on_the_second_gpu_captures_its_steps_while_the_first_is_current():
    torch.cuda.set_device(CUDA)
    step, _, _ = lockstep(torch.device("cuda", 1), "fp32")
    assert step.dropped is None and sorted(step.graphs) == [8, BATCH]


@two_gpus
def test_train_py_on_the_second_gpu_makes_no_context_on_the_first(tmp_path):
    """--device cuda:1 with the probe (bf16 autocast where the GPU has it, graphs): the process never
    touches cuda:0 (autocast's bf16 check asks the current device, which use_device made cuda:1)."""
    code = ("import sys, torch, train; train.main(sys.argv[1:]); "
            "print('context on cuda:0:', torch._C._cuda_hasPrimaryContext(0), torch.cuda.current_device())")
    proc = subprocess.run([sys.executable, "-c", code, "--synthetic", "--data-dir", str(tmp_path), "--width", "4",
                           "--epochs", "100", "--iterations", "4800", "--device", "cuda:1", "--show-settings"],
                          cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert '"probe": {' in proc.stdout and '"probe": {}' not in proc.stdout, proc.stdout  # the probe ran
    assert "context on cuda:0: False 1" in proc.stdout, proc.stdout


def test_a_run_resumed_cpu_gpu_cpu_continues_where_each_part_stopped(small_data_dir, tmp_path):
    """Width 4, batch 48 on 1,024 images (22 steps an epoch, the last of 16), the lr halved every epoch:
    30 steps on the CPU, to 60 on the GPU (train.py's default there, a graph for each batch size), to 80
    on the CPU. Each part starts from the weights, Adam state, schedule and batch where the last one
    stopped: its first loss is the loss the last part's weights give on that batch."""
    ckpt = tmp_path / "c.pt"

    def part(device, iterations, *resume):
        proc = run_in_process("train.py", [str(a) for a in (
            "--data-dir", small_data_dir, "--width", 4, "--batch-size", 48, "--lr-step-epochs", 1,
            "--iterations", iterations, "--device", device, "--checkpoint", ckpt, "--figures-dir", tmp_path,
            *resume)])
        assert proc.returncode == 0, proc.stderr
        return torch.load(ckpt, map_location="cpu", weights_only=True)

    images, labels, _ = cifar10.load_cifar10(cifar10.dataset_root(small_data_dir, False), train=True)

    def first_loss_of(saved, iteration, precision, device):
        """The training loss of `saved`'s weights on the batch of `iteration` (1-based), as train_step logs it."""
        model = ResNet(4).to(device)
        model.load_state_dict(saved["model"])
        channels_last = saved["config"]["channels_last"]
        if channels_last:
            model.to(memory_format=torch.channels_last)
        epoch, index = divmod(iteration - 1, 22)
        x, y = next(data.epoch_batches(images.to(device), labels.to(device), epoch, saved["config"]["seed"], 48,
                                        channels_last, index, index + 1))
        with torch.no_grad(), speed.autocast(device, precision):
            return F.cross_entropy(model.train()(x).float(), y).item()

    cpu = part("cpu", 30)
    gpu = part("cuda:0", 60, "--resume")
    config = gpu["config"]
    assert config["device"] == "cuda:0" and config["precision"] == speed.ruled_precisions(speed.detect(CUDA))[0][0]
    assert config["cuda_graph"] == (config["precision"] != "fp16"), config["speed_reason"]  # not dropped
    assert gpu["history"]["train_loss"][:30] == cpu["history"]["train_loss"]
    assert gpu["history"]["train_loss"][30] == pytest.approx(first_loss_of(cpu, 31, config["precision"], CUDA),
                                                             rel=2e-2)
    back = part("cpu", 80, "--resume")
    assert back["config"]["device"] == "cpu" and back["config"]["precision"] == "fp32"
    assert not back["config"]["cuda_graph"]
    assert back["history"]["train_loss"][:60] == gpu["history"]["train_loss"]
    assert back["history"]["train_loss"][60] == pytest.approx(first_loss_of(gpu, 61, "fp32", torch.device("cpu")),
                                                              rel=1e-5)
    for saved, iterations in ((cpu, 30), (gpu, 60), (back, 80)):
        assert saved["iteration"] == iterations and len(saved["history"]["train_loss"]) == iterations
        assert all(state["step"] == iterations for state in saved["optimizer"]["state"].values())
        assert saved["optimizer"]["param_groups"][0]["capturable"] is False
        epochs = iterations // 22
        assert saved["epoch"] == saved["scheduler"]["last_epoch"] == epochs
        assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.5 ** epochs)
    assert back["history"]["test_iteration"] == [22, 30, 44, 60, 66, 80]


def test_class_maps_and_road_on_the_gpu_equal_the_cpus():
    """attribute's maps and ROAD's imputation (solved all at once on a GPU, in blocks on a CPU) agree
    across devices, within float32 rounding."""
    from visualize import faithfulness
    from visualize.attribution import attribute
    torch.manual_seed(0)
    model = ResNet(8).eval()
    images, labels = cifar10.make_synthetic_images(12, seed=2)
    on_gpu = ResNet(8).to(CUDA).eval()
    on_gpu.load_state_dict(model.state_dict())
    for method in ("gradcam", "saliency", "smoothgrad", "integrated_gradients", "occlusion"):
        options = {"n": 4} if method == "smoothgrad" else {"m": 4} if method == "integrated_gradients" else {}
        cpu = attribute(model, images, labels, method, **options)
        gpu = attribute(on_gpu, images.to(CUDA), labels.to(CUDA), method, **options).cpu()
        assert torch.allclose(gpu, cpu, rtol=1e-3, atol=1e-4 * cpu.abs().max().item()), method
    maps = attribute(on_gpu, images.to(CUDA), labels.to(CUDA), "saliency")  # on the GPU, as a caller may pass them
    curve, curve_gpu = (faithfulness.deletion(m, images, labels, maps, step=25) for m in (model, on_gpu))
    assert torch.allclose(curve_gpu.probabilities, curve.probabilities, atol=1e-4)
    road, road_gpu = (faithfulness.road(m, images, labels, maps, "MoRF") for m in (model, on_gpu))
    assert (road_gpu.correct == road.correct).double().mean().item() >= 0.95  # a near-tie may flip by rounding
    pixels = images.float() / 255
    removed = torch.rand(12, 32, 32, generator=torch.Generator().manual_seed(3)) < 0.7
    cpu = faithfulness.road_impute(pixels, removed, noise=0)
    gpu = faithfulness.road_impute(pixels.to(CUDA), removed.to(CUDA), noise=0).cpu()
    assert (gpu - cpu).abs().max().item() < 1e-4


def resume_rng(saved):
    """checkpoint.resume of a checkpoint whose RNG states are `saved`, into a fresh tiny run's Adam and StepLR."""
    import checkpoint
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    checkpoint.resume({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": saved},
                      optimizer, scheduler, None)


def test_resume_restores_every_gpus_random_state():
    saved = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}
    expected = [torch.rand(4, device=torch.device("cuda", i)).cpu() for i in range(torch.cuda.device_count())]
    resume_rng(saved)  # the draws after the save are drawn again
    assert all(torch.equal(torch.rand(4, device=torch.device("cuda", i)).cpu(), e) for i, e in enumerate(expected))
    more = dict(saved, cuda=[*saved["cuda"], saved["cuda"][0]])  # saved on more GPUs than this machine has
    resume_rng(more)
    assert torch.equal(torch.rand(4, device=CUDA).cpu(), expected[0])
