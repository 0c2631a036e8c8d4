"""The architecture: stage shapes, named branches, separate ReLUs, equality with torchvision's ResNet-18, and the
BatchNorms folded into the convs computing the same function."""
import pytest
import torch
import torch.nn as nn
import torchvision

from model import STAGES, BasicBlock, ResNet, fold_batchnorm, state_shapes


@pytest.mark.parametrize("width", [4, 64])
def test_stage_output_shapes_follow_table_1(width):
    model = ResNet(width=width).eval()
    expected = {"conv1": (width, 32, 32), "conv2_x": (width, 16, 16), "conv3_x": (2 * width, 8, 8),
                "conv4_x": (4 * width, 4, 4), "conv5_x": (8 * width, 2, 2)}
    with model.capture(*STAGES) as acts, torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    assert {name: tuple(a.shape[1:]) for name, a in acts.items()} == expected
    assert logits.shape == (2, 10)


def test_blocks_have_trunk_and_shortcut_and_every_relu_is_its_own_module():
    model = ResNet(width=4)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8
    for block in blocks:
        assert isinstance(block.trunk, nn.Sequential) and hasattr(block, "shortcut")
    # the shortcut is a projection exactly where the shape changes: first blocks of conv3_x..conv5_x
    projections = [name for name, b in model.named_modules() if isinstance(b, BasicBlock)
                   and not isinstance(b.shortcut, nn.Identity)]
    assert projections == ["conv3_x.block1", "conv4_x.block1", "conv5_x.block1"]
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 1 + 2 * 8 and len({id(r) for r in relus}) == len(relus)
    assert not any(r.inplace for r in relus)
    assert isinstance(model.conv2_x.pool, nn.MaxPool2d)


def test_equals_torchvision_resnet18_with_a_3x3_stride_1_stem():
    """Independent reference: torchvision's resnet18 with conv1 made 3x3/1 is the same function."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=10)
    reference.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    ours = ResNet(width=64)
    theirs = list(reference.state_dict().values())
    mine = ours.state_dict()
    assert [tuple(t.shape) for t in theirs] == [tuple(t.shape) for t in mine.values()]
    ours.load_state_dict(dict(zip(mine.keys(), theirs)))
    # non-trivial BN statistics, so eval mode exercises them
    reference.train()
    with torch.no_grad():
        reference(torch.randn(16, 3, 32, 32))
    ours.load_state_dict(dict(zip(mine.keys(), reference.state_dict().values())))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), reference.eval()(x), rtol=1e-5, atol=1e-5)


def test_capture_removes_its_hooks_even_on_error():
    model = ResNet(width=4)
    with pytest.raises(RuntimeError):
        with model.capture("conv1", "conv5_x"):
            model(torch.randn(1, 4, 32, 32))  # wrong channel count raises inside the block
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="conv1, conv2_x"):
        model.stage("conv6_x")


@pytest.mark.parametrize("width, num_classes", [(3, 10), (8, 7), (64, 10)])
def test_state_shapes_are_those_of_the_network_built(width, num_classes):
    built = ResNet(width, num_classes).state_dict()
    assert state_shapes(width, num_classes) == {name: tuple(t.shape) for name, t in built.items()}


@pytest.mark.parametrize("width", [4, 16])  # a subsampled shortcut below 16 input channels, and a strided one
def test_folding_the_batchnorms_keeps_every_stage_its_logits_and_input_gradients(width):
    torch.manual_seed(0)
    model = ResNet(width).double().eval()
    with torch.no_grad():  # statistics and affine parameters unlike a fresh BatchNorm's, so folding does something
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 0  # the model is left as it was
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    with model.capture(*STAGES) as plain, folded.capture(*STAGES) as fused:
        y, y_folded = model(x), folded(x)
    for name in STAGES:  # Grad-CAM and the scores read the stages' outputs
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y_folded, y, rtol=1e-10, atol=1e-10)
    gradient, = torch.autograd.grad(y[:, 3].sum(), x)
    folded_gradient, = torch.autograd.grad(y_folded[:, 3].sum(), x)
    torch.testing.assert_close(folded_gradient, gradient, rtol=1e-10, atol=1e-10)
