"""CIFAR ResNet-50 (He et al. 2016) with Bottleneck blocks, kuangliu/pytorch-cifar layout.

3x3 stem without max-pool (CIFAR images are 32x32), blocks [3, 4, 6, 3] of
``1x1 -> 3x3 -> 1x1`` convs each followed by BatchNorm, expansion 4, a conv+BN
shortcut where the shape changes, global average pooling and ``linear``. This is
the ResNet-50 of kuangliu/pytorch-cifar, of Madry's ``robustness`` library and of
RobustBench (``Engstrom2019Robustness``, ``Augustin2020Adversarial``): 23.52M
parameters for 10 classes (the paper's Table 6 says 23.7M: within 0.8%).

Every BatchNorm directly consumes a conv output, so every BN is merged into a
layer: 54 layers = stem + 16 blocks x 3 convs + 4 shortcut convs + linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clat.models.cifar_resnet import ResNet
from clat.models.registry import register_model


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.expansion * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, 1, stride, bias=False), nn.BatchNorm2d(self.expansion * planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


@register_model(
    "resnet50", default_k=3, description="CIFAR ResNet-50, Bottleneck blocks (He et al. 2016; kuangliu layout), 23.5M parameters"
)
def resnet50(num_classes: int, normalize: nn.Module) -> nn.Module:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, normalize)  # type: ignore[arg-type]
