"""What the figures' speed rests on: one pass over the test split serves every script, whichever asks
first (visualize.context), and bench_figures.py reads plot_all.py's times and compares like with like."""
import contextlib
import io

import pytest
import torch

import bench_figures
import data
import plot_all
from conftest import assert_one_line_error, run_script
from model import STAGES, ResNet
from visualize import context, scoring
from visualize.context import PlotRun

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def small_run(key, n=150, width=4):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return PlotRun(model=ResNet(width).eval(), checkpoint={}, device=torch.device("cpu"), caption="test",
                   images=images, labels=[0] * n, classes=["class-0"], key=("test_bench_figures", key))


@pytest.mark.parametrize("first", [["conv5_x"], ["conv2_x", "conv3_x", "conv4_x", "conv5_x"], ["conv1"]])
def test_one_pass_over_the_test_split_serves_every_stage_whichever_asks_first(monkeypatch, first):
    run = small_run(tuple(first))
    passes = []
    monkeypatch.setattr(context, "score_units", lambda *a, **k: passes.append(a) or scoring.score_units(*a, **k))
    asked = context.test_split_scores(run, first)
    later = context.test_split_scores(run, list(STAGES))
    assert len(passes) == 1  # the gradient pattern before the atlas, or after: one pass
    assert all(asked[layer] is later[layer] for layer in first)
    # the same numbers as scoring each stage on its own pass
    for layer in STAGES:
        alone = scoring.score_units(run.model, run.images, [layer], batch_size=64)[layer]
        for name in ("max", "sum"):
            torch.testing.assert_close(getattr(later[layer], name), getattr(alone, name), rtol=1e-5, atol=1e-5)
        assert later[layer].size == alone.size


def test_the_times_read_are_those_plot_all_prints(monkeypatch, trained_checkpoint, tmp_path):
    monkeypatch.setattr(plot_all, "SCRIPTS", ("plot_conv1_filters", "plot_learning_progress"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        paths = plot_all.main(["--checkpoint", str(trained_checkpoint), "--figures-dir", str(tmp_path)])
    scripts, total = bench_figures.figure_times(out.getvalue())
    assert list(scripts) == ["plot_conv1_filters", "plot_learning_progress", "index.html"]  # the page is a step too
    assert [row["files"] for row in scripts.values()] == [8, 8, 1] and len(paths) == 17  # each PNG with its JSON
    assert 0 < sum(row["seconds"] for row in scripts.values()) <= total + 0.1  # each printed to 0.1 s
    report = bench_figures.figures_ratio(scripts, total, wall=total + 2.0, forward_s=(1.5, 2.5), cpu=6.0,
                                         forward_cpu_s=(1.0, 2.0))
    assert report["forward_pass_mean_s"] == 2.0 and report["ratio"] == pytest.approx(total / 2.0)
    assert report["wall_ratio"] == pytest.approx((total + 2.0) / 2.0) and report["cpu_ratio"] == 4.0
    assert report["scripts"]["plot_conv1_filters"]["ratio"] == pytest.approx(scripts["plot_conv1_filters"]["seconds"] / 2)
    with pytest.raises(bench_figures.utils.UserError, match="no time per script"):
        bench_figures.figure_times("wrote figures/x.png\n")


def test_per_image_loop_scores_equal_one_batched_pass():
    torch.manual_seed(0)
    model = ResNet(4).eval()
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    indices, scores = bench_figures.per_image_top(model, images, "conv4_x", 5, k=4)
    with torch.inference_mode(), model.capture("conv4_x") as acts:
        model(data.normalize(images))
    all_scores = acts["conv4_x"][:, 5].sum((1, 2))
    top = all_scores.topk(4)
    assert indices.tolist() == top.indices.tolist()
    torch.testing.assert_close(scores, top.values, rtol=1e-4, atol=1e-5)


def test_top_activating_against_the_loop_finds_the_same_images(tmp_path):
    result = bench_figures.main(["--top-activating", "--width", "4", "--top-images", "48", "--k", "3",
                                 "--layer", "conv4_x", "--channel", "5", "--json", str(tmp_path / "top.json")])
    assert result["status"] == "measured" and result["same_indices"] and result["max_score_rel_diff"] < 1e-4
    assert result["images"] == 48 and result["batched_s"] > 0 and result["per_image_s"] > 0
    assert (tmp_path / "top.json").stat().st_size > 0


def test_help_and_bad_flags():
    proc = run_script("benchmarks/bench_figures.py", "--help")
    assert proc.returncode == 0 and "(default: 64)" in " ".join(proc.stdout.split())
    assert_one_line_error(run_script("benchmarks/bench_figures.py", "--width", "0"), "--width must be at least 1")
    assert_one_line_error(run_script("benchmarks/bench_figures.py", "--top-activating", "--channel", "999", "--width", "4"),
                          "--channel 999", "0..31")
