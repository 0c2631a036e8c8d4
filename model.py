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
and the deconvnet below can treat each one separately.
"""
from collections import OrderedDict
from contextlib import contextmanager

import torch
import torch.nn as nn

STAGES = ("conv1", "conv2_x", "conv3_x", "conv4_x", "conv5_x")


def conv3x3(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


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
                conv=nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
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

        # torchvision's initialisation, so the recipe behaves as it does for torchvision's resnet18.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

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
        return self.fc(torch.flatten(self.avgpool(x), 1))
