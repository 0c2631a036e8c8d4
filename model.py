"""The report's ResNet-18, hand-written in the torchvision style and adapted to 32x32 CIFAR-10 images.

Stage names follow Table 1 of the ResNet paper (He et al., 2015); each attribute's output is that
stage's output:

    conv1    3x3 conv, stride 1 -> BN -> ReLU                    width  x 32x32
    conv2_x  3x3 max-pool, stride 2 -> 2 BasicBlocks             width  x 16x16
    conv3_x  2 BasicBlocks, the first with stride 2              2width x  8x8
    conv4_x  2 BasicBlocks, the first with stride 2              4width x  4x4
    conv5_x  2 BasicBlocks, the first with stride 2              8width x  2x2
    global average pool -> fc

Every ReLU is its own non-in-place nn.ReLU module, so hook-based tools (captum, pytorch-grad-cam)
and ResNet.reconstruct below can treat each one separately.
"""
from collections import OrderedDict
from copy import deepcopy
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

STAGES = ("conv1", "conv2_x", "conv3_x", "conv4_x", "conv5_x")
PATHS = ("both", "shortcut", "trunk")  # where ResNet.reconstruct sends the signal at a residual sum
METHODS = ("deconvnet", "guided", "gradient")  # ResNet.reconstruct's rule for the signal at each ReLU


def conv3x3(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class SubsampledConv1x1(nn.Conv2d):
    """A 1x1 conv with `stride`. On a CPU with fewer than 16 input channels it is computed as the stride-1
    conv of every stride-th row and column (the same function); elsewhere as the strided conv, which is
    faster in channels_last. Weights, state_dict keys and attributes are a strided nn.Conv2d's."""
    # never oneDNN's strided 1x1 kernel below its channel block, which corrupts memory (docs/performance.md)

    def __init__(self, in_channels, out_channels, stride):
        super().__init__(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x):
        if x.device.type == "cpu" and self.in_channels < 16:
            return F.conv2d(x[:, :, ::self.stride[0], ::self.stride[1]], self.weight, self.bias)
        return F.conv2d(x, self.weight, self.bias, stride=self.stride)


class BasicBlock(nn.Module):
    """relu(trunk(x) + shortcut(x)); the shortcut is a 1x1 conv + BN only where the shape changes."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.trunk = nn.Sequential(OrderedDict(
            conv1=conv3x3(in_channels, out_channels, stride),
            bn1=nn.BatchNorm2d(out_channels),
            relu1=nn.ReLU(),
            conv2=conv3x3(out_channels, out_channels),
            bn2=nn.BatchNorm2d(out_channels),
        ))
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(OrderedDict(
                conv=SubsampledConv1x1(in_channels, out_channels, stride),
                bn=nn.BatchNorm2d(out_channels),
            ))
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.trunk(x) + self.shortcut(x))


def make_stage(in_channels, out_channels, stride, pool=False):
    """Two BasicBlocks; conv2_x is opened by the 3x3/2 max-pool, as in the paper."""
    layers = OrderedDict()
    if pool:
        layers["pool"] = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    layers["block1"] = BasicBlock(in_channels, out_channels, stride)
    layers["block2"] = BasicBlock(out_channels, out_channels, 1)
    return nn.Sequential(layers)


def init_weights(module):
    """torchvision's initialisation of resnet18, so the recipe behaves as it does there, for every
    conv and BatchNorm in `module` (the fc keeps PyTorch's default): each conv's weight is drawn from
    N(0, 2 / fan_out), fan_out = out_channels * kernel height * kernel width (Kaiming, mode fan_out),
    from the global RNG in module order; each BatchNorm gets weight 1, bias 0 and, as a BatchNorm just
    built has, running mean 0, running variance 1 and no batches counted. ResNet.__init__ calls it on
    the whole network, so a network's stages are re-initialised (visualize.sanity) by the same rules."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            m.reset_running_stats()


class ResNet(nn.Module):
    def __init__(self, width=64, num_classes=10):
        super().__init__()
        self.width = width
        self.conv1 = nn.Sequential(OrderedDict(
            conv=conv3x3(3, width),
            bn=nn.BatchNorm2d(width),
            relu=nn.ReLU(),
        ))
        self.conv2_x = make_stage(width, width, stride=1, pool=True)
        self.conv3_x = make_stage(width, 2 * width, stride=2)
        self.conv4_x = make_stage(2 * width, 4 * width, stride=2)
        self.conv5_x = make_stage(4 * width, 8 * width, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)
        init_weights(self)

    def stage(self, name):
        """The stage module called `name` (one of STAGES), with a clear error for any other name."""
        if name not in STAGES:
            raise ValueError(f"unknown layer {name!r}; choose one of {', '.join(STAGES)}")
        return getattr(self, name)

    @contextmanager
    def capture(self, *layers):
        """Record the outputs of the named stages during forward passes inside the `with` block.

            with model.capture("conv1", "conv5_x") as acts:
                model(x)
            acts["conv5_x"]  # (N, C, H, W), still attached to the graph

        The hooks are removed on exit, also when the block raises.
        """
        acts = {}
        handles = []
        try:
            for name in layers:
                handles.append(self.stage(name).register_forward_hook(
                    lambda module, inputs, output, name=name: acts.__setitem__(name, output)))
            yield acts
        finally:
            for handle in handles:
                handle.remove()

    def forward(self, x):
        for name in STAGES:
            x = getattr(self, name)(x)
        return self.head(x)

    def head(self, x):
        """The logits from conv5_x's output x: global average pool, then fc."""
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def channels(self, layer):
        """The number of channels of the named stage's output."""
        # a stage ends in a conv -> BN (-> ReLU), so its last conv sets its width
        return [m for m in self.stage(layer).modules() if isinstance(m, nn.Conv2d)][-1].out_channels

    def check_channel(self, layer, channel, name="channel"):
        """ValueError unless `channel` is a channel of stage `layer`'s output; the message calls it `name`."""
        channels = self.channels(layer)  # raises for an unknown name, listing the valid ones
        if not 0 <= channel < channels:
            raise ValueError(f"{name} {channel} is out of range: {layer} of this width-{self.width} network "
                             f"has {channels} channels; choose 0..{channels - 1}")

    def receptive_field(self, layer, row, col, image_size=32, clip=True):
        """[top, left, bottom, right]: the inclusive pixel bounds of the input that unit (row, col)
        of stage `layer`'s output sees, clipped to the image_size x image_size input (clip=False:
        the field as the layers define it, reaching into the zero padding).

        Walks the modules from the stage down to the input, widening the span by the kernel,
        stride and padding of every conv and the max-pool; a BasicBlock's field is the union of
        its trunk's and its shortcut's.
        """
        self.stage(layer)  # raises for an unknown name, listing the valid ones
        spans = [(row, row), (col, col)]
        for name in reversed(STAGES[:STAGES.index(layer) + 1]):
            spans = [input_span(self.stage(name), span, dim) for dim, span in enumerate(spans)]
        if clip:
            spans = [(max(lo, 0), min(hi, image_size - 1)) for lo, hi in spans]
        (top, bottom), (left, right) = spans
        return [top, left, bottom, right]

    @torch.no_grad()
    def reconstruct(self, x, layer, channel, path="both", top1=False, method="deconvnet"):
        """Project `channel` of stage `layer` back to input space: the deconvnet (Zeiler & Fergus),
        guided backpropagation (Springenberg et al. 2014) or the plain gradient.

        x is a normalized batch (N, 3, 32, 32); the result has its shape. With A(x) = f_L(...f_1(x))
        the network up to the layer, the backward pass is seeded with
            s = select_activations(A(x), channel, top1):
        A(x) with all other channels zeroed, and with top1 also all but the channel's strongest
        activation in each image. It returns R = B_1(...B_L(s)), where B is each module's backward:
        a linear map (conv, BN) is transposed, B(g) = W^T g; the max-pool routes the signal to the
        switches of this forward pass (the transpose of gathering each window's maximum, which is
        also the max-pool's gradient); a residual sum sends it to both branches and adds what they
        return. The methods differ only at a ReLU, with forward input z and incoming signal g
        ([c] is 1 where the condition c holds, else 0):
            deconvnet  B(g) = max(g, 0)              the signal rectified, whatever z was
            guided     B(g) = max(g, 0) * [z > 0]    only where both z and g are positive
            gradient   B(g) = g * [z > 0]            the ReLU's own derivative
        So "gradient" is the vector-Jacobian product R = J_A(x)^T s = d<s, A(x)>/dx (s held fixed),
        and at conv1, whose only ReLU is the one that made s (s >= 0, and s = 0 wherever z <= 0),
        the three are the same. At each residual sum of the chosen stage the signal goes to both
        branches (path="both") or only to the "shortcut" or the "trunk" (for "gradient": the
        gradient with the other branch cut there); the stages below always use both. The model must
        be in eval mode: BN is the fixed affine map of its running statistics, and this leaves them
        untouched.
        """
        self.check_channel(layer, channel)
        if path not in PATHS:
            raise ValueError(f"unknown path {path!r}; choose one of {', '.join(PATHS)}")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if self.training:
            raise ValueError("reconstruct needs the model in eval mode (BatchNorm's running "
                             "statistics); call model.eval() first")
        names = STAGES[:STAGES.index(layer) + 1]
        tapes = []
        for name in names:
            x, tape = stage_forward(self.stage(name), x)
            tapes.append(tape)
        signal = select_activations(x, channel, top1)
        relu_rule = RELU_RULES[method]
        for name, tape in zip(reversed(names), reversed(tapes)):
            signal = stage_transpose(tape, signal, path if name == layer else "both", relu_rule)
        return signal


def fold_batchnorm(model, copy=True):
    """An eval-mode copy of `model` (left untouched; copy=False: `model` itself, a copy the caller made
    already) with every BatchNorm folded into the conv before it
    (torch.nn.utils.fusion.fuse_conv_bn_eval: the conv gains the scale and a bias, the BatchNorm becomes
    nn.Identity): the same function as model.eval() up to rounding, with one pass over the activations
    fewer a conv (what it saves: docs/class_evidence.md#cost). For forward passes and input gradients
    (the faithfulness measures); not for training, nor for reconstruct, which walks the BatchNorms."""
    folded = (deepcopy(model) if copy else model).eval()
    for sequence in folded.modules():
        if not isinstance(sequence, nn.Sequential):
            continue
        names = list(sequence._modules)
        for conv, bn in zip(names, names[1:]):
            if isinstance(sequence._modules[conv], nn.Conv2d) and isinstance(sequence._modules[bn], nn.BatchNorm2d):
                setattr(sequence, conv, fuse_conv_bn_eval(sequence._modules[conv], sequence._modules[bn]))
                setattr(sequence, bn, nn.Identity())
    return folded


def input_span(module, span, dim):
    """The (first, last) input positions along `dim` (0: rows, 1: columns) that the outputs
    span[0]..span[1] of `module` read, padding included (so they can lie outside the input)."""
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
        kernel, stride, padding, dilation = (
            v if isinstance(v, int) else v[dim]
            for v in (module.kernel_size, module.stride, module.padding, module.dilation))
        return span[0] * stride - padding, span[1] * stride - padding + dilation * (kernel - 1)
    if isinstance(module, nn.Sequential):
        for child in reversed(module):
            span = input_span(child, span, dim)
        return span
    if isinstance(module, BasicBlock):
        trunk, shortcut = input_span(module.trunk, span, dim), input_span(module.shortcut, span, dim)
        return min(trunk[0], shortcut[0]), max(trunk[1], shortcut[1])
    if isinstance(module, (nn.BatchNorm2d, nn.ReLU, nn.Identity)):
        return span  # pointwise
    raise TypeError(f"no receptive field rule for {type(module).__name__}")


def state_shapes(width, num_classes=10):
    """{name: shape} of ResNet(width, num_classes).state_dict(), found without building that network.

    Every dimension of every tensor is a constant or a multiple of the width, so the shapes at widths
    1 and 2 give them at any width (tested against real networks). Lets a checkpoint's weights, or a
    width too large to allocate, be checked before anything is allocated.
    """
    one, two = (ResNet(w, num_classes).state_dict() for w in (1, 2))
    return {name: tuple(a + (b - a) * (width - 1) for a, b in zip(one[name].shape, two[name].shape)) for name in one}


# --------------------------------------------------------------------------- back to the pixels
# The transposes below map a signal at a module's output back to its input. Each needs only the
# module's weights and, from the forward pass, the input size (strided convs round sizes down, so the
# transpose cannot infer it), for the max-pool the switches (where each window's maximum was) and, for
# a ReLU, where its input was positive (which "guided" and "gradient" use). Routing by the switches is
# also the max-pool's own gradient, so one transpose serves all three methods.

def conv_transpose(conv, y, input_size):
    """The transpose (adjoint) of `conv` without its bias, with an output of spatial `input_size`."""
    natural = [(n - 1) * s - 2 * p + d * (k - 1) + 1 for n, s, p, d, k in
               zip(y.shape[-2:], conv.stride, conv.padding, conv.dilation, conv.kernel_size)]
    # output_padding adds back the rows/columns a strided conv dropped when it rounded down
    output_padding = [size - n for size, n in zip(input_size, natural)]
    return F.conv_transpose2d(y, conv.weight, stride=conv.stride, padding=conv.padding,
                              output_padding=output_padding, groups=conv.groups, dilation=conv.dilation)


def bn_transpose(bn, y):
    """Eval-mode BN is gamma * (x - mean) / sqrt(var + eps) + beta: its linear part is a diagonal scale."""
    return y * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(1, -1, 1, 1)


def max_pool_with_switches(pool, x):
    """(pool(x), switches): the flat index within each H*W plane of every window's maximum."""
    return F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                        ceil_mode=pool.ceil_mode, return_indices=True)


def max_unpool_transpose(y, switches, input_size):
    """The transpose of gathering each window's maximum: scatter every signal back to its switch.

    Overlapping windows (3x3 with stride 2) can share a switch, and then their signals must add;
    nn.MaxUnpool2d writes them one over another instead, which is not the transpose.
    """
    n, c = y.shape[:2]
    out = y.new_zeros(n, c, input_size[0] * input_size[1])
    out.scatter_add_(2, switches.flatten(2), y.flatten(2))
    return out.view(n, c, *input_size)


# What each method does with the signal g at a ReLU whose forward input was positive where
# `positive` (z > 0) is True; see ResNet.reconstruct for the formulas.
RELU_RULES = {
    "deconvnet": lambda g, positive: F.relu(g),
    "guided": lambda g, positive: torch.where(positive, F.relu(g), 0.0),
    "gradient": lambda g, positive: torch.where(positive, g, 0.0),
}
assert tuple(RELU_RULES) == METHODS


def block_forward(block, x):
    """block(x), bit for bit (the same modules in the same order), and what its transpose needs:
    (trunk tape, shortcut tape, where the residual sum, the output ReLU's input, is positive)."""
    trunk, trunk_tape = stage_forward(block.trunk, x)
    # an identity shortcut is a one-module sequence, so both branches are taped alike
    shortcut_modules = block.shortcut if isinstance(block.shortcut, nn.Sequential) else [block.shortcut]
    shortcut, shortcut_tape = stage_forward(shortcut_modules, x)
    total = trunk + shortcut
    return block.relu(total), (trunk_tape, shortcut_tape, total > 0)


def block_transpose(saved, y, path="both", relu_rule=RELU_RULES["deconvnet"]):
    """relu(trunk(x) + shortcut(x)) transposed: the ReLU's rule, then send the signal down `path` and add."""
    trunk_tape, shortcut_tape, positive = saved
    y = relu_rule(y, positive)
    out = 0
    if path in ("both", "trunk"):
        out = out + stage_transpose(trunk_tape, y, relu_rule=relu_rule)
    if path in ("both", "shortcut"):
        out = out + stage_transpose(shortcut_tape, y, relu_rule=relu_rule)
    return out


def stage_forward(modules, x):
    """Run a stage's modules (or a block's trunk or shortcut) in order; return the output and a tape
    of what their transposes need: (module, input size, saved) per module, where saved is the
    max-pool's switches, where a ReLU's input was positive, a block's own tapes (block_forward),
    or None."""
    tape = []
    for module in modules:
        if isinstance(module, nn.MaxPool2d):
            out, saved = max_pool_with_switches(module, x)
        elif isinstance(module, BasicBlock):
            out, saved = block_forward(module, x)
        else:
            out, saved = module(x), (x > 0 if isinstance(module, nn.ReLU) else None)
        tape.append((module, x.shape[-2:], saved))
        x = out
    return x, tape


def stage_transpose(tape, y, path="both", relu_rule=RELU_RULES["deconvnet"]):
    """Walk a tape backwards, transposing each module; `path` applies to its blocks and `relu_rule`
    (one of RELU_RULES) to every ReLU, the blocks' included."""
    for module, input_size, saved in reversed(tape):
        if isinstance(module, nn.ReLU):
            y = relu_rule(y, saved)
        elif isinstance(module, nn.BatchNorm2d):
            y = bn_transpose(module, y)
        elif isinstance(module, nn.Conv2d):
            y = conv_transpose(module, y, input_size)
        elif isinstance(module, nn.MaxPool2d):
            y = max_unpool_transpose(y, saved, input_size)
        elif isinstance(module, BasicBlock):
            y = block_transpose(saved, y, path, relu_rule)
        elif isinstance(module, nn.Identity):
            pass  # its own transpose
        else:
            raise TypeError(f"the deconvnet has no transpose for {type(module).__name__}")
    return y


def select_activations(a, channel, top1=False):
    """a (N, C, H, W) with every channel but `channel` zeroed, and with top1 all but its per-image peak."""
    selected = torch.zeros_like(a)
    fmap = a[:, channel].flatten(1)
    if top1:
        peak = fmap.argmax(1, keepdim=True)
        fmap = torch.zeros_like(fmap).scatter_(1, peak, fmap.gather(1, peak))
    selected[:, channel] = fmap.view_as(a[:, channel])
    return selected
