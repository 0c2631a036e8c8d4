"""The speed settings keep the recipe's maths: train.py learns on a CPU with exactly the CUDA defaults,
and what the CUDA-graph step is built from (capturable Adam, a tensor lr under StepLR, the warm-up
that must leave no trace, one graph per batch size) is checked on a CPU against the plain step.
The capture itself needs a GPU and is not tested here."""
import importlib

import pytest
import torch

import data
import train
import utils
from conftest import assert_one_line_error, run_script
from model import ResNet


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_train_py_learns_on_a_cpu_with_the_cuda_default_settings(synthetic_data_dir, tmp_path, monkeypatch):
    """CI has no GPU: this runs, end to end on a CPU, the settings a CUDA user gets by default (bf16
    autocast, channels_last), all but the CUDA graph. (--compile is not run here: on 2 busy CPU cores a
    17-iteration width-8 run took 257 s with it against 14 s without.)"""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # bf16 on 2 threads crawls when the cores are shared
    ckpt = tmp_path / "cuda_defaults.pt"
    proc = run_script("train.py", "--synthetic", "--data-dir", synthetic_data_dir, "--width", 8,
                      "--iterations", 100, "--bf16", "--channels-last", "--device", "cpu",
                      "--checkpoint", ckpt, "--figures-dir", tmp_path / "figures")
    assert proc.returncode == 0, proc.stderr
    assert "on cpu (bf16 autocast, channels_last)" in proc.stdout.splitlines()[0]
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    # the config records what the run really used
    assert {k: saved["config"][k] for k in train.SPEED_DEFAULTS} == dict(
        bf16=True, channels_last=True, compile=False, cuda_graph=False)
    # the synthetic gratings are learned (the untrained network is near chance, test_train checks)
    assert saved["history"]["test_acc"][-1] >= 0.9, saved["history"]["test_acc"]
    # and the checkpoint is an ordinary one: fp32 weights the plot scripts load
    assert all(v.dtype in (torch.float32, torch.int64) for v in saved["model"].values())


def test_unasked_speed_settings_take_the_device_defaults_and_conflicts_are_refused(small_data_dir, tmp_path):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    unset = dict.fromkeys(train.SPEED_DEFAULTS)
    assert train.resolve_speed(dict(unset), cpu) == dict(bf16=False, channels_last=False, compile=False,
                                                         cuda_graph=False)
    assert train.resolve_speed(dict(unset), cuda) == dict(bf16=True, channels_last=True, compile=False,
                                                          cuda_graph=True)
    # asking for torch.compile on CUDA replaces the CUDA graph; --no-bf16 is kept
    assert train.resolve_speed(dict(unset, compile=True, bf16=False), cuda) == dict(
        bf16=False, channels_last=True, compile=True, cuda_graph=False)
    with pytest.raises(utils.UserError, match="pick one"):
        train.resolve_speed(dict(unset, compile=True, cuda_graph=True), cuda)
    proc = run_script("train.py", "--data-dir", small_data_dir, "--device", "cpu", "--cuda-graph",
                      "--checkpoint", tmp_path / "c.pt")
    assert_one_line_error(proc, "--cuda-graph needs a CUDA device", "drop --cuda-graph")


def small_model_and_batches(channels_last=False):
    """A width-4 model and 40 augmented images in batches of 16, 16 and 8: two epochs' worth."""
    images, labels = data.make_synthetic_images(40, seed=5)
    torch.manual_seed(5)
    model = ResNet(4)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    batches = [batch for epoch in range(2)
               for batch in train.epoch_batches(images, labels, epoch, seed=5, batch_size=16,
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


@pytest.mark.parametrize("bf16", [False, True])
def test_graphed_step_equals_the_plain_step_over_partial_batches_and_an_lr_decay(bf16):
    """GraphedStep on a CPU runs its step eagerly where CUDA replays the graph: the same weights,
    BatchNorm statistics, Adam state and losses, bit for bit, as plain train_step. So its 3 warm-up steps
    per batch size leave no trace, and the full and the partial batch each get their own buffers."""
    config = dict(train.RECIPE, lr_step_epochs=1)
    results = []
    for graphed in (False, True):
        model, batches = small_model_and_batches(channels_last=bf16)
        optimizer, scheduler = train.make_optimizer(model, config)
        if graphed:
            step_fn = train.GraphedStep(model, optimizer, bf16)
        else:
            def step_fn(x, y):
                return train.train_step(model, optimizer, x, y, bf16)
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


def test_graphed_step_stops_when_the_replay_differs_from_the_eager_step(monkeypatch):
    """The first replay is checked against an eager step: a warm-up that leaked into the state
    (here: the restore skipped) is caught."""
    model, batches = small_model_and_batches()
    optimizer, _ = train.make_optimizer(model, train.RECIPE)
    monkeypatch.setattr(train, "restore_training_state", lambda *args: None)
    with pytest.raises(utils.UserError, match="--no-cuda-graph"):
        train.GraphedStep(model, optimizer)(*batches[0])


@pytest.fixture
def capturable_on_cpu(monkeypatch):
    """torch only lets capturable Adam step on accelerators; its arithmetic is plain tensor ops, so
    allowing the CPU here runs exactly the update a CUDA graph records."""
    adam_module = importlib.import_module("torch.optim.adam")  # torch.optim.Adam's module
    monkeypatch.setattr(adam_module, "_get_capturable_supported_devices",
                        lambda supports_xla=True: ["cpu"])


@pytest.mark.parametrize("foreach", [False, True])  # on CUDA Adam takes the foreach path
def test_capturable_adam_with_a_tensor_lr_follows_the_recipe_and_its_schedule(capturable_on_cpu, foreach):
    config = dict(train.RECIPE, lr_step_epochs=2)
    torch.manual_seed(0)
    reference = ResNet(4)
    graphed = ResNet(4)
    graphed.load_state_dict(reference.state_dict())
    opt_ref, sched_ref = train.make_optimizer(reference, config)
    opt_graph, sched_graph = train.make_optimizer(graphed, config, cuda_graph=True)
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
    saved_graph, saved_sched = train.portable_state(opt_graph, sched_graph)
    assert saved_graph["param_groups"][0]["lr"] == pytest.approx(1e-3 / 8)
    assert saved_graph["param_groups"][0]["capturable"] is False
    assert all(not isinstance(v, torch.Tensor) for v in saved_sched["base_lrs"] + saved_sched["_last_lr"])
    saved_ref, _ = train.portable_state(opt_ref, sched_ref)
    model_a, model_b = ResNet(4), ResNet(4)
    model_a.load_state_dict(graphed.state_dict())
    model_b.load_state_dict(graphed.state_dict())
    plain, _ = train.make_optimizer(model_a, config)
    train.load_optimizer_state(plain, saved_graph)
    regraphed, _ = train.make_optimizer(model_b, config, cuda_graph=True)
    new_lr = regraphed.param_groups[0]["lr"]
    train.load_optimizer_state(regraphed, saved_ref)
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
