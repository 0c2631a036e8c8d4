"""bench.py compares like with like: the default CUDA settings keep the recipe's maths, the tutorial
pipeline augments as train.py does, and the figures it writes are measured and consistent."""
import copy
import json
import math

import pytest
import torch

import bench
import data
import train
from model import ResNet


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_tutorial_pipeline_and_prepare_batch_give_the_same_tensors():
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(3)
    # Identity crop (offset 4, 4 into the zero-padded image), no flip: ToTensor + Normalize of the PIL image.
    test_set = bench.ArrayCIFAR(images, labels, bench.tutorial_transform(train_split=False))
    expected = torch.stack([test_set[i][0] for i in range(3)])
    identity = train.prepare_batch(images, torch.arange(3), torch.full((3, 2), 4), torch.zeros(3, dtype=torch.bool))
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
        ours = train.prepare_batch(images, torch.tensor([i]), torch.tensor([[top, left]]), torch.tensor([flip]))
        torch.testing.assert_close(ours[0], tutorial, rtol=0, atol=1e-6)
        assert label == labels[i]
        seen.add((top != 4 or left != 4, flip))
    assert {(True, True), (True, False)} <= seen  # shifted crops were compared, with and without flips


def one_step(model, batch, labels, bf16, channels_last):
    model = copy.deepcopy(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer, _ = train.make_optimizer(model, train.RECIPE)
    x = train.prepare_batch(*batch, channels_last)
    loss, _ = train.train_step(model, optimizer, x, labels, bf16)
    return loss.item(), model, x


def test_cuda_default_settings_keep_the_recipe_maths_on_cpu():
    images, labels = data.make_synthetic_images(64, seed=3)
    order, offsets, flips = train.epoch_plan(len(images), epoch=0, seed=3)
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
    assert (update32 - update16).abs().max() <= 2 * train.RECIPE["lr"] * 1.01
    assert torch.nn.functional.cosine_similarity(update32, update16, dim=0) >= 0.75
    for (name, buf), other in zip(fp32.named_buffers(), default.buffers()):  # BatchNorm running stats
        torch.testing.assert_close(other.float(), buf.float(), rtol=5e-2, atol=5e-3, msg=name)


def test_per_image_loop_scores_equal_one_batched_pass():
    torch.manual_seed(0)
    model = ResNet(4).eval()
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    indices, scores = bench.per_image_top(model, images, "conv4_x", 5, k=4)
    with torch.inference_mode(), model.capture("conv4_x") as acts:
        model(data.normalize(images))
    all_scores = acts["conv4_x"][:, 5].sum((1, 2))
    top = all_scores.topk(4)
    assert indices.tolist() == top.indices.tolist()
    torch.testing.assert_close(scores, top.values, rtol=1e-4, atol=1e-5)


def test_bench_writes_measured_consistent_figures(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--width", "4", "--images", "256", "--test-images", "96", "--batch-size", "32",
                "--warmup", "1", "--windows", "3", "--window-steps", "2", "--eval-images", "64",
                "--top-images", "48", "--k", "3", "--json", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert list(rows) == ["tutorial", "fp32", "bf16", "bf16_cl", "cuda_graph", "compile"]
    assert rows["compile"]["status"].startswith("n/a") and rows["cuda_graph"]["status"] == "n/a: CUDA only"
    assert [k for k, row in rows.items() if row["default"]] == ["fp32"] == [result["default_row"]]
    for key in ("tutorial", "fp32", "bf16", "bf16_cl"):
        row = rows[key]
        windows = row["window_images_per_s"]
        assert len(windows) == 3 and all(math.isfinite(r) and r > 0 for r in windows)
        assert row["train_images_per_s"] == sorted(windows)[1]  # the median
        assert math.isfinite(row["eval_images_per_s"]) and row["eval_images_per_s"] > 0
        # the full recipe: 52 epochs of 50,000 training images and 52 evaluations of 10,000
        assert row["projected_s"] == pytest.approx(52 * 50_000 / row["train_images_per_s"]
                                                   + 52 * 10_000 / row["eval_images_per_s"])
    assert result["recipe"]["iterations"] == 20_332
    assert result["default_vs_tutorial"] == pytest.approx(rows["fp32"]["train_images_per_s"]
                                                          / rows["tutorial"]["train_images_per_s"])
    top = result["top_activating"]
    assert top["status"] == "measured" and top["same_indices"] and top["max_score_rel_diff"] < 1e-4


def test_a_quick_run_never_overwrites_the_recorded_figures():
    for device in (torch.device("cpu"), torch.device("cuda")):
        full = bench.json_path(bench.parse_args([]), device)
        assert full == f"bench_{device.type}.json"  # what the README quotes
        assert bench.json_path(bench.parse_args(["--quick"]), device) != full
    assert bench.json_path(bench.parse_args(["--quick", "--json", "x.json"]), torch.device("cpu")) == "x.json"
