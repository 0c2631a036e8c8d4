"""ResNet.reconstruct: its pieces are exact transposes, and each method's whole projection equals an
independent autograd reference, the input gradient with every ReLU's backward replaced by the method's
rule (the deconvnet: rectify the gradient; guided: rectify it and keep it only where the ReLU's input
was positive; gradient: the network's own ReLU, i.e. torch.autograd.grad itself)."""
import pytest
import torch
import torch.nn as nn

from model import (METHODS, STAGES, BasicBlock, ResNet, conv_transpose, max_pool_with_switches,
                   max_unpool_transpose, select_activations)


def random_model(width=4, seed=0):
    """A float64 model in eval mode whose BN layers all do something: random statistics, scale and shift."""
    torch.manual_seed(seed)
    model = ResNet(width=width).double()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        with torch.no_grad():
            bn.running_mean.normal_(0, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_(1.0, 0.5)  # a few negative gammas flip channels, which the transpose must keep
            bn.bias.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: a second thread only adds synchronisation, which costs seconds on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(4, 3, 32, 32, dtype=torch.float64)


def inner(a, b):
    return (a * b).sum().item()


# --------------------------------------------------------------------------- the pieces are transposes

@pytest.mark.parametrize("name, input_size", [("conv1.conv", 32), ("conv3_x.block1.trunk.conv1", 16),
                                              ("conv3_x.block1.shortcut.conv", 16)])
def test_transposed_conv_is_the_adjoint(model, name, input_size):
    conv = model.get_submodule(name)
    torch.manual_seed(2)
    x = torch.randn(2, conv.in_channels, input_size, input_size, dtype=torch.float64)
    with torch.no_grad():
        y = torch.randn_like(conv(x))
        back = conv_transpose(conv, y, x.shape[-2:])
        assert back.shape == x.shape
        assert inner(conv(x), y) == pytest.approx(inner(back, x), rel=1e-10)


def test_max_unpool_adds_shared_switches_and_is_the_adjoint_of_the_gather(model):
    pool = model.conv2_x.pool
    torch.manual_seed(3)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    pooled, switches = max_pool_with_switches(pool, x)
    assert torch.equal(pooled, x.flatten(2).gather(2, switches.flatten(2)).view_as(pooled))

    # for fixed switches, pooling is the linear map "gather at the switches"; check <gather x', y> = <x', unpool y>
    x2, y = torch.randn_like(x), torch.randn_like(pooled)
    gathered = x2.flatten(2).gather(2, switches.flatten(2)).view_as(pooled)
    unpooled = max_unpool_transpose(y, switches, x.shape[-2:])
    assert inner(gathered, y) == pytest.approx(inner(x2, unpooled), rel=1e-10)

    # the overlapping windows really share switches here, so overwriting (nn.MaxUnpool2d) is not the transpose
    per_plane = switches.flatten(2)
    shared = sum(p.numel() - p.unique().numel() for p in per_plane.view(-1, per_plane.shape[-1]))
    assert shared > 10
    overwritten = nn.MaxUnpool2d(3, 2, 1)(y, switches, output_size=x.shape[-2:])
    assert inner(x2, overwritten) != pytest.approx(inner(gathered, y), rel=1e-3)


# --------------------------------------------------------------------------- an independent reference

class RectifiedGradientReLU(torch.autograd.Function):
    """relu forward; backward passes relu(incoming gradient), the deconvnet's rule, ignoring the forward sign."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(min=0)


class GuidedReLU(torch.autograd.Function):
    """relu forward; backward passes the incoming gradient only where it and the forward input are both
    positive, guided backpropagation's rule."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad.clamp(min=0) * (x > 0)


# each method's ReLU backward; None: the network's own ReLU, so the reference is the plain gradient
REFERENCE_RELUS = {"deconvnet": RectifiedGradientReLU, "guided": GuidedReLU, "gradient": None}


def reference(model, x, layer, channel, top1=False, detach=None, method="deconvnet"):
    """d<F, A_layer(x)>/dx by autograd, F = A's `channel` (only its per-image peak with top1), every ReLU's
    backward replaced by `method`'s rule (REFERENCE_RELUS). detach="trunk" or "shortcut" stops the
    gradient through that branch of the chosen stage's blocks, so only the other branch carries it there."""
    relu_function = REFERENCE_RELUS[method]
    handles = [relu.register_forward_hook(lambda m, inputs, out: relu_function.apply(inputs[0]))
               for relu in model.modules() if isinstance(relu, nn.ReLU) and relu_function is not None]
    if detach is not None:
        handles += [getattr(block, detach).register_forward_hook(lambda m, inputs, out: out.detach())
                    for block in model.get_submodule(layer).modules() if isinstance(block, BasicBlock)]
    try:
        x = x.clone().requires_grad_(True)
        with model.capture(layer) as acts:
            model(x)
        a = acts[layer]
        selected = torch.zeros_like(a)
        fmap = a[:, channel].detach()
        if top1:
            flat = fmap.flatten(1)
            keep = flat == flat.max(1, keepdim=True).values
            fmap = (flat * keep).view_as(fmap)
        selected[:, channel] = fmap
        (grad,) = torch.autograd.grad((selected * a).sum(), x)
    finally:
        for handle in handles:
            handle.remove()
    return grad


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("top1", [False, True])
@pytest.mark.parametrize("layer", STAGES)
def test_both_paths_equal_the_rectified_input_gradient(model, images, layer, top1, method):
    """Each method's projection is its autograd definition (for the deconvnet: the rectified input gradient)."""
    for channel in (1, model.channels(layer) - 1):
        got = model.reconstruct(images, layer, channel, top1=top1, method=method)
        expected = reference(model, images, layer, channel, top1=top1, method=method)
        assert got.shape == images.shape and expected.abs().max() > 0
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        # the channel asked for is the one projected, not a neighbour
        neighbour = reference(model, images, layer, channel - 1, top1=top1, method=method)
        assert (got - neighbour).abs().max() > 1e-3 * expected.abs().max()
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("path, other", [("shortcut", "trunk"), ("trunk", "shortcut")])
@pytest.mark.parametrize("layer", STAGES[1:])
def test_one_branch_equals_the_gradient_with_the_other_branch_cut(model, images, layer, path, other, method):
    nonzero = 0
    for channel in range(model.channels(layer)):
        got = model.reconstruct(images, layer, channel, path=path, method=method)
        expected = reference(model, images, layer, channel, detach=other, method=method)
        assert got.shape == images.shape and torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        nonzero += bool(expected.abs().max() > 0)
    assert nonzero >= model.channels(layer) // 2  # rectification may silence a channel, but not most


def test_shortcut_and_trunk_differ(model, images):
    for layer in ("conv3_x", "conv5_x"):
        shortcut = model.reconstruct(images, layer, 0, path="shortcut")
        trunk = model.reconstruct(images, layer, 0, path="trunk")
        both = model.reconstruct(images, layer, 0, path="both")
        assert shortcut.shape == trunk.shape == images.shape
        assert torch.isfinite(shortcut).all() and torch.isfinite(trunk).all()
        scale = both.abs().max()
        assert (shortcut - trunk).abs().max() > 0.05 * scale
        assert (shortcut - both).abs().max() > 0.05 * scale and (trunk - both).abs().max() > 0.05 * scale


def test_conv1_has_no_residual_sum_so_every_path_is_the_same(model, images):
    both = model.reconstruct(images, "conv1", 3)
    for path in ("shortcut", "trunk"):
        assert torch.equal(model.reconstruct(images, "conv1", 3, path=path), both)


# --------------------------------------------------------------------------- the three methods

@pytest.mark.parametrize("layer", STAGES)
def test_gradient_is_torch_autograd_grad_of_the_selected_activations(model, images, layer):
    """method="gradient" is the vector-Jacobian product J^T s of the unmodified network, s the seed."""
    x = images.clone().requires_grad_(True)
    stage_output = x
    for name in STAGES[:STAGES.index(layer) + 1]:
        stage_output = model.stage(name)(stage_output)
    for top1 in (False, True):
        seed = select_activations(stage_output.detach(), 1, top1)
        (expected,) = torch.autograd.grad(stage_output, x, grad_outputs=seed, retain_graph=True)
        got = model.reconstruct(images, layer, 1, top1=top1, method="gradient")
        assert expected.abs().max() > 0
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())


def test_the_three_methods_agree_at_conv1(model, images):
    """conv1's only ReLU is the one that made the seed (s >= 0, zero where its input was not positive)."""
    for top1 in (False, True):
        for channel in (0, 3):
            deconvnet = model.reconstruct(images, "conv1", channel, top1=top1)
            assert deconvnet.abs().max() > 0
            for method in ("guided", "gradient"):
                assert torch.equal(model.reconstruct(images, "conv1", channel, top1=top1, method=method), deconvnet)


@pytest.mark.parametrize("layer", STAGES[1:])
def test_the_methods_differ_above_conv1(model, images, layer):
    """Above conv1 the ReLUs on the way back tell the methods apart, so the tests above are not vacuous."""
    got = {method: model.reconstruct(images, layer, 1, method=method) for method in METHODS}
    scale = got["gradient"].abs().max()
    assert (got["guided"] - got["gradient"]).abs().max() > 0.05 * scale
    assert (got["guided"] - got["deconvnet"]).abs().max() > 0.05 * scale


# --------------------------------------------------------------------------- receptive field

def receptive_field(layer, row, col, size=32):
    """Input rows and columns (inclusive ranges) that unit (row, col) of `layer` sees, from the architecture:
    conv1 3x3/1; conv2_x a 3x3/2 pad-1 max-pool then two blocks; conv3_x..conv5_x two blocks, the first
    of stride 2. A block sees the union of its trunk (3x3/stride, then 3x3/1, both pad 1) and its
    shortcut (1x1/stride)."""
    def back(span, kernel, stride, pad):  # input positions a span of outputs reads (padding included)
        return span[0] * stride - pad, span[1] * stride - pad + kernel - 1

    def block(span, stride):
        trunk = back(back(span, 3, 1, 1), 3, stride, 1)
        shortcut = back(span, 1, stride, 0)
        return min(trunk[0], shortcut[0]), max(trunk[1], shortcut[1])

    stages = {"conv1": [], "conv2_x": [1, 1], "conv3_x": [2, 1], "conv4_x": [2, 1], "conv5_x": [2, 1]}
    spans = [(row, row), (col, col)]
    for name in reversed(STAGES[:STAGES.index(layer) + 1]):
        for stride in reversed(stages[name]):
            spans = [block(s, stride) for s in spans]
        if name == "conv2_x":
            spans = [back(s, 3, 2, 1) for s in spans]
    spans = [back(s, 3, 1, 1) for s in spans]  # conv1
    return [range(max(lo, 0), min(hi, size - 1) + 1) for lo, hi in spans]


def test_receptive_field_sizes_follow_the_architecture():
    # the textbook recurrence: each layer adds (kernel - 1) * (product of the strides below it)
    sizes = [3, 3 + 2, 5 + 4 * 2 * 2, 21 + 2 * 2 + 3 * 2 * 4, 49 + 2 * 4 + 3 * 2 * 8, 105 + 2 * 8 + 3 * 2 * 16]
    far_from_borders = [len(receptive_field(name, 1000, 1000, size=10**6)[0]) for name in STAGES]
    assert far_from_borders == sizes[:1] + sizes[2:]
    assert len(receptive_field("conv3_x", 0, 0)[0]) == 25  # clipped by the image border


@pytest.mark.parametrize("layer", STAGES)
def test_top1_reconstruction_is_zero_outside_the_units_receptive_field(model, layer):
    torch.manual_seed(4)
    x = torch.randn(16, 3, 32, 32, dtype=torch.float64)
    with model.capture(layer) as acts, torch.no_grad():
        model(x)
    # a channel that fires in every image, so each has a peak to project
    channel = acts[layer].amax(dim=(2, 3)).min(0).values.argmax().item()
    fmap = acts[layer][:, channel]
    recon = model.reconstruct(x, layer, channel, top1=True)
    outside_tested = 0
    for image in range(len(x)):
        assert fmap[image].max() > 0
        row, col = divmod(fmap[image].flatten().argmax().item(), fmap.shape[-1])
        rows, cols = receptive_field(layer, row, col)
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[rows.start:rows.stop, cols.start:cols.stop] = True
        assert (recon[image][:, ~inside] == 0).all()
        assert (recon[image][:, inside] != 0).any()
        outside_tested += (~inside).sum().item()
    if layer in ("conv1", "conv2_x", "conv3_x"):
        assert outside_tested > 0  # the field does not cover the whole image, so the test has teeth


# --------------------------------------------------------------------------- arguments

def test_bad_arguments_raise_with_the_valid_choices(model, images):
    with pytest.raises(ValueError, match="conv1, conv2_x, conv3_x, conv4_x, conv5_x"):
        model.reconstruct(images, "conv6_x", 0)
    with pytest.raises(ValueError, match=r"0\.\.31"):
        model.reconstruct(images, "conv5_x", 32)
    with pytest.raises(ValueError, match=r"0\.\.3\b"):
        model.reconstruct(images, "conv1", -1)
    with pytest.raises(ValueError, match="both, shortcut, trunk"):
        model.reconstruct(images, "conv1", 0, path="residual")
    with pytest.raises(ValueError, match="deconvnet, guided, gradient"):
        model.reconstruct(images, "conv1", 0, method="saliency")
    train_mode = random_model().train()
    with pytest.raises(ValueError, match="eval"):
        train_mode.reconstruct(images, "conv1", 0)
