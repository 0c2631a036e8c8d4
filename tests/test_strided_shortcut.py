"""The strided 1x1 shortcut (model.SubsampledConv1x1) and oneDNN's faulty AVX2 kernel (docs/performance.md).

oneDNN's AVX2 1x1 convolution, in channels_last with stride 2 and fewer input channels than its block of
8, writes past its workspace when it computes the weight gradient: glibc aborts the process, or the
gradient comes out wrong without a word. Below 16 input channels on a CPU the model's shortcut takes every
second row and column and convolves with stride 1 (widths 4, 6, 8); above, it is the strided conv itself
(width 64). These tests check that either way it is exactly the strided 1x1 conv, in both memory formats,
at the shapes the model gives it. Each comparison runs in a subprocess twice, once with the CPU's own
kernels and once with oneDNN held to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2), so the
faulty kernel would be reached on any x86 CPU, and a crash fails one test with its reason instead of
killing the suite.
"""
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, script_env
from model import ResNet, SubsampledConv1x1

AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
KERNELS = {"native": {}, "avx2": AVX2}


def shortcut_shapes(width):
    """(in_channels, out_channels, input size) of every strided shortcut of ResNet(width)."""
    model = ResNet(width)
    sizes = {"conv3_x": 16, "conv4_x": 8, "conv5_x": 4}
    return [(stage.block1.shortcut.conv.in_channels, stage.block1.shortcut.conv.out_channels, sizes[name])
            for name, stage in ((n, model.stage(n)) for n in sizes)]


def run_python(code, env, threads, timeout=240):
    """Run `code` in a fresh interpreter (cwd = the repo) with `threads` torch threads and `env` added."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=script_env({**env, "OMP_NUM_THREADS": str(threads)}))


def crashed(proc):
    return f"exit {proc.returncode} (a negative exit is the signal that killed it)\n{proc.stderr[-2000:]}"


def test_subsampled_conv_keeps_the_strided_conv_attributes_and_keys():
    model = ResNet(4)
    conv = model.conv3_x.block1.shortcut.conv
    assert isinstance(conv, SubsampledConv1x1) and isinstance(conv, torch.nn.Conv2d)
    assert (conv.kernel_size, conv.stride, conv.padding, conv.bias) == ((1, 1), (2, 2), (0, 0), None)
    assert "conv3_x.block1.shortcut.conv.weight" in model.state_dict()
    # odd sizes round down the same way: floor((n - 1) / 2) + 1 rows either way
    x = torch.randn(2, 4, 15, 9)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, stride=2), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("threads", [1, 2])
def test_shortcut_gradients_in_channels_last_equal_the_nchw_ones(threads, kernels):
    """The op itself (not a whole network, whose ReLU gates rounding can open or shut): output, weight
    gradient and input gradient of the shortcut in channels_last against the plain strided conv in NCHW,
    at the shapes of widths 4, 6, 8 and 64 (one process for all, as starting one costs more than these)."""
    shapes = [shape for width in (4, 6, 8, 64) for shape in shortcut_shapes(width)]
    proc = run_python(f"""
        import torch, torch.nn.functional as F
        from model import SubsampledConv1x1
        torch.manual_seed(0)
        for cin, cout, size in {shapes}:
            for trial in range(5):  # the fault shows within a few iterations when it is there
                x = torch.randn(32, cin, size, size)
                conv = SubsampledConv1x1(cin, cout, 2)
                grad_out = torch.randn(32, cout, size // 2, size // 2)
                # the reference: the strided conv itself, in NCHW, where the kernels are right
                x_ref = x.clone().requires_grad_()
                w_ref = conv.weight.detach().clone().requires_grad_()
                F.conv2d(x_ref, w_ref, stride=2).backward(grad_out)
                conv = conv.to(memory_format=torch.channels_last)
                x_cl = x.to(memory_format=torch.channels_last).requires_grad_()
                out = conv(x_cl)
                out.backward(grad_out.to(memory_format=torch.channels_last))
                for name, got, want in (("output", out, F.conv2d(x, w_ref.detach(), stride=2)),
                                        ("weight gradient", conv.weight.grad, w_ref.grad),
                                        ("input gradient", x_cl.grad, x_ref.grad)):
                    scale = want.abs().max().item()
                    error = (got - want).abs().max().item()
                    assert error <= 1e-5 * scale, f"{{name}} at {{(cin, cout, size)}}: {{error}} of {{scale}}"
        print("ok")
    """, KERNELS[kernels], threads)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", crashed(proc)


@pytest.mark.parametrize("width", [4, 6])
def test_training_steps_in_channels_last_at_a_narrow_width_run_to_the_end(width):
    """The whole model's training step at a width under 8, on the AVX2 kernels and one thread (where the
    fault aborted the process), runs to its end with finite losses."""
    proc = run_python(f"""
        import torch, torch.nn.functional as F
        from model import ResNet
        torch.manual_seed(0)
        model = ResNet({width}).to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4)
        images = torch.randn(64, 3, 32, 32).to(memory_format=torch.channels_last)
        labels = torch.randint(0, 10, (64,))
        losses = []
        for step in range(8):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert all(torch.isfinite(torch.tensor(losses))), losses
        assert losses[-1] < losses[0], losses  # the same batch eight times: it must be learnt
        print("ok")
    """, AVX2, threads=1)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", crashed(proc)
