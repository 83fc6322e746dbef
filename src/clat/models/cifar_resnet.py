"""CIFAR ResNet-18 as used by the paper (kuangliu/pytorch-cifar layout).

Module names follow that layout (``conv1``, ``bn1``, ``layer1.0.conv1``, …,
``linear``) so that its widely shared checkpoints load directly. With this
layout the paper's Table 6 holds: layer 11 is ``layer3.0.conv2`` + ``bn2``
with 590,336 parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clat.models.registry import register_model


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock], num_blocks: list[int], num_classes: int, normalize: nn.Module, width: int = 64) -> None:
        super().__init__()
        self.normalize = normalize
        self.in_planes = width
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(block, width, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, 2 * width, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, 4 * width, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, 8 * width, num_blocks[3], 2)
        self.linear = nn.Linear(8 * width * block.expansion, num_classes)

    def _make_layer(self, block: type[BasicBlock], planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@register_model("resnet18", default_k=1, description="CIFAR ResNet-18 (He et al. 2016; kuangliu layout), 11.2M parameters")
def resnet18(num_classes: int, normalize: nn.Module) -> nn.Module:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, normalize)


@register_model("resnet18_w16", default_k=1, description="CIFAR ResNet-18 at 1/4 width (16-128 channels), 0.70M parameters: CPU studies")
def resnet18_w16(num_classes: int, normalize: nn.Module) -> nn.Module:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, normalize, width=16)
