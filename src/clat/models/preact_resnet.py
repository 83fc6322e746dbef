"""CIFAR PreAct ResNet-18 (He et al. 2016, "Identity mappings in deep residual networks").

The variant of Wong et al. (fast adversarial training) and Rice et al. (robust
overfitting), which RobustBench ships as ``PreActResNet(PreActBlockV2, [2, 2, 2, 2],
bn_before_fc=True)`` (``Wong2020Fast``, ``Rice2020OverfittingNetL2``): each block
is ``BN -> ReLU -> conv1 -> BN -> ReLU -> conv2`` plus a shortcut that reads the
pre-activated input (a 1x1 conv where the shape changes), and a final ``bn`` + ReLU
before the pooled linear classifier. 11.17M parameters for 10 classes.

Module names follow that code (``conv1``, ``layer1.0.bn1``, ``layer1.0.conv1``,
``layer1.0.bn2``, ``layer1.0.conv2``, ``layer2.0.shortcut.0``, ``bn``, ``linear``),
so its checkpoints load directly.

Layers (see :mod:`clat.layers`): a layer is a conv/linear merged with the BatchNorm
that *directly* consumes its output. Here ``conv1`` of each block is merged with
its ``bn2``; ``conv2`` feeds a residual sum and stays alone; the stem conv is
merged with ``layer1.0.bn1`` (the first block's pre-activation BN reads the stem
output itself). The other blocks' ``bn1`` and the final ``bn`` read residual sums:
they are *standalone* BatchNorms, part of no layer, so CLAT never trains them.
21 layers: stem + 16 block convs + 3 shortcut convs + linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clat.models.registry import register_model


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, num_blocks: list[int], num_classes: int, normalize: nn.Module) -> None:
        super().__init__()
        self.normalize = normalize
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@register_model(
    "preact_resnet18",
    default_k=1,
    description="CIFAR PreAct ResNet-18 (He et al. 2016; Wong et al./Rice et al. layout), 11.2M parameters",
)
def preact_resnet18(num_classes: int, normalize: nn.Module) -> nn.Module:
    return PreActResNet([2, 2, 2, 2], num_classes, normalize)
