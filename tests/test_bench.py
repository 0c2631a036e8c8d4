"""bench.py compares like with like: the default CUDA settings keep the recipe's maths, the tutorial
pipeline augments as train.py does, and the figures it writes are measured and consistent."""
import copy
import json
import math
from pathlib import Path

import pytest
import torch

import bench
import cifar10
import data
import speed
import steps
from model import ResNet


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_tutorial_pipeline_and_prepare_batch_give_the_same_tensors():
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(3)
    # Identity crop (offset 4, 4 into the zero-padded image), no flip: ToTensor + Normalize of the PIL image.
    test_set = bench.ArrayCIFAR(images, labels, bench.tutorial_transform(train_split=False))
    expected = torch.stack([test_set[i][0] for i in range(3)])
    identity = data.prepare_batch(images, torch.arange(3), torch.full((3, 2), 4), torch.zeros(3, dtype=torch.bool))
    torch.testing.assert_close(identity, expected, rtol=0, atol=1e-6)

    # Random crops and flips: replay the tutorial transform's draws (RandomCrop draws top then left,
    # then RandomHorizontalFlip draws one uniform) and give them to prepare_batch.
    train_set = bench.ArrayCIFAR(images, labels, bench.tutorial_transform(train_split=True))
    seen = set()
    for seed in range(24):
        i = seed % 3
        torch.manual_seed(seed)
        tutorial, label = train_set[i]
        torch.manual_seed(seed)
        top, left = (torch.randint(0, 9, (1,)).item() for _ in range(2))
        flip = torch.rand(1).item() < 0.5
        ours = data.prepare_batch(images, torch.tensor([i]), torch.tensor([[top, left]]), torch.tensor([flip]))
        torch.testing.assert_close(ours[0], tutorial, rtol=0, atol=1e-6)
        assert label == labels[i]
        seen.add((top != 4 or left != 4, flip))
    assert {(True, True), (True, False)} <= seen  # shifted crops were compared, with and without flips


def one_step(model, batch, labels, bf16, channels_last):
    model = copy.deepcopy(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer, _ = steps.make_optimizer(model, steps.RECIPE)
    x = data.prepare_batch(*batch, channels_last)
    loss, _ = steps.train_step(model, optimizer, x, labels, "bf16" if bf16 else "fp32")
    return loss.item(), model, x


def test_cuda_default_settings_keep_the_recipe_maths_on_cpu():
    images, labels = cifar10.make_synthetic_images(64, seed=3)
    order, offsets, flips = data.epoch_plan(len(images), epoch=0, seed=3)
    batch = (images, order[:16], offsets[:16], flips[:16])
    torch.manual_seed(3)
    model = ResNet(8)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}

    loss32, fp32, x32 = one_step(model, batch, labels[order[:16]], bf16=False, channels_last=False)
    loss_cl, cl, x_cl = one_step(model, batch, labels[order[:16]], bf16=False, channels_last=True)
    loss16, default, _ = one_step(model, batch, labels[order[:16]], bf16=True, channels_last=True)

    # channels_last is a memory layout only: the same input values, and in fp32 the same loss and
    # gradients up to summation order. (Not the same weights after the step: Adam's first update is
    # lr * g / (|g| + eps), so a gradient entry near 0 flips its whole +-lr step on rounding noise.)
    assert x_cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(x_cl, x32)
    assert loss_cl == pytest.approx(loss32, rel=1e-5)
    for (name, p), q in zip(fp32.named_parameters(), cl.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4 * p.grad.abs().max().item(), msg=name)

    # bf16 autocast: the loss to 1e-2 relative. The gradients agree in direction (cosine >= 0.8; ~0.94
    # seen, ~0.0 between two batches) though not closely: at initialisation an fp32 gradient moves as
    # much (~25 %) when the input is perturbed by 0.4 %, bf16's rounding. After one Adam step no weight
    # is further apart than that step can move two (lr each), and the updates point the same way
    # (cosine >= 0.75; ~0.86 seen, ~0.01 for an update from another batch).
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    grad32 = torch.cat([p.grad.flatten() for p in fp32.parameters()])
    grad16 = torch.cat([p.grad.flatten() for p in default.parameters()])
    assert torch.nn.functional.cosine_similarity(grad32, grad16, dim=0) >= 0.8
    update32 = torch.cat([(p.detach() - start[n]).flatten() for n, p in fp32.named_parameters()])
    update16 = torch.cat([(p.detach() - start[n]).flatten() for n, p in default.named_parameters()])
    assert (update32 - update16).abs().max() <= 2 * steps.RECIPE["lr"] * 1.01
    assert torch.nn.functional.cosine_similarity(update32, update16, dim=0) >= 0.75
    for (name, buf), other in zip(fp32.named_buffers(), default.buffers()):  # BatchNorm running stats
        torch.testing.assert_close(other.float(), buf.float(), rtol=5e-2, atol=5e-3, msg=name)


AVX2_CPU = speed.Capabilities("cpu", "AMD EPYC", native_bf16=False, detail="no AMX or AVX512-BF16; ATen dispatch AVX2")


@pytest.mark.parametrize("all_rows", [False, True])
def test_bench_writes_measured_consistent_figures(tmp_path, monkeypatch, all_rows):
    """On a CPU without bf16 units (as speed.detect would see an AVX2 EPYC) the bf16 rows are skipped unless
    asked for; the train_py row is what train.py chooses, and its ratio to the fastest row is consistent."""
    monkeypatch.setattr(speed, "detect", lambda device: AVX2_CPU)
    # no compile trial in the choice's probe: on a slow CPU even this tiny run would be long enough to
    # weigh it (minutes of compiling; test_speed tests it with a fake probe)
    monkeypatch.setattr(speed, "COMPILE_MIN_RUN_S", float("inf"))
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--width", "4", "--images", "256", "--test-images", "96", "--batch-size", "32",
                "--warmup", "1", "--windows", "3", "--window-steps", "2", "--eval-images", "64",
                "--json", str(out), *(["--all-rows"] if all_rows else [])])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert list(rows) == ["tutorial", "fp32", "fp32_cl", "bf16", "bf16_cl", "train_py"]
    measured = [k for k, row in rows.items() if row["status"] == "measured"]
    assert measured == (list(rows) if all_rows else ["tutorial", "fp32", "fp32_cl", "train_py"])
    assert all(rows[k]["status"].startswith("skipped: cannot be fast here") for k in rows if k not in measured)
    # the train_py row is what train.py would choose here: its probe's fastest fp32 candidate
    choice = result["choice"]
    assert choice["precision"] == rows["train_py"]["precision"] == "fp32"
    assert set(choice["probe"]) == {"fp32 NCHW", "fp32 channels_last"}
    assert choice["label"] == max(choice["probe"], key=choice["probe"].get)
    assert rows["train_py"]["channels_last"] == (choice["label"] == "fp32 channels_last")
    for key in measured:
        row = rows[key]
        windows = row["window_images_per_s"]
        assert len(windows) == 3 and all(math.isfinite(r) and r > 0 for r in windows)
        assert row["train_images_per_s"] == sorted(windows)[1]  # the median
        assert math.isfinite(row["eval_images_per_s"]) and row["eval_images_per_s"] > 0
        # the full recipe: 52 epochs of 50,000 training images and 52 evaluations of 10,000
        assert row["projected_s"] == pytest.approx(52 * 50_000 / row["train_images_per_s"]
                                                   + 52 * 10_000 / row["eval_images_per_s"])
    assert result["recipe"]["iterations"] == 20_332
    others = {k: rows[k]["train_images_per_s"] for k in measured if k != "train_py"}
    assert result["fastest_row"] == max(others, key=others.get)
    assert result["choice_vs_fastest"] == pytest.approx(rows["train_py"]["train_images_per_s"] / max(others.values()))
    assert result["choice_vs_tutorial"] == pytest.approx(rows["train_py"]["train_images_per_s"]
                                                         / rows["tutorial"]["train_images_per_s"])
    assert result["capabilities"]["native_bf16"] is False and result["capabilities"]["fp32_matmul_gflop_per_s"] > 0


def test_the_table_has_each_setting_once_and_its_fast_rows_are_the_rules_candidates():
    for caps in (AVX2_CPU, speed.Capabilities("cuda", "NVIDIA A100", compute_capability=(8, 0)),
                 speed.Capabilities("cuda", "Tesla T4", compute_capability=(7, 5))):
        rows = bench.table_rows(caps)
        assert len({bench.row_key(r) for r in rows}) == len(rows)
        assert set(speed.plan(caps, dict.fromkeys(speed.SETTING_FIELDS)).candidates) <= set(rows)


def test_a_quick_run_never_overwrites_the_recorded_figures():
    for device in (torch.device("cpu"), torch.device("cuda")):
        full = bench.json_path(bench.parse_args([]), device)
        assert full == str(Path(bench.__file__).resolve().parent / f"bench_{device.type}.json")  # beside bench.py
        assert bench.json_path(bench.parse_args(["--quick"]), device) != full
    assert bench.json_path(bench.parse_args(["--quick", "--json", "x.json"]), torch.device("cpu")) == "x.json"


@pytest.mark.parametrize("quick", [False, True])
def test_a_quick_run_skips_the_compile_trial_and_says_so(monkeypatch, quick):
    """On a CPU the choice's probe may weigh torch.compile (minutes of compiling); --quick leaves it out,
    as --no-compile would, and the row's reason says it was skipped."""
    seen = {}

    def decide(asked, previous, caps, iterations, measure):
        seen.update(asked)
        return speed.Settings(), dict(speed_reason="probe", speed_probe={})
    monkeypatch.setattr(speed, "decide", decide)
    args = bench.parse_args(["--device", "cpu", *(["--quick"] if quick else [])])
    _, record = bench.trainpy_choice(args, torch.device("cpu"), AVX2_CPU)
    assert seen["compile"] is (False if quick else None)
    assert record["compile_trial"] is not quick
    assert ("compile trial skipped (--quick)" in record["reason"]) is quick
