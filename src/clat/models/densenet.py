"""CIFAR DenseNet-121 (Huang et al. 2017), kuangliu/pytorch-cifar layout, growth rate 32.

3x3 stem conv to 64 channels (no max-pool), dense blocks of [6, 12, 24, 16]
bottlenecks (``BN -> ReLU -> 1x1 conv to 128 -> BN -> ReLU -> 3x3 conv to 32``,
output concatenated in front of the input), transitions (``BN -> ReLU -> 1x1
conv`` halving the channels, 2x2 average pool), a final ``bn`` + ReLU, 4x4
average pool and ``linear``. Module names as kuangliu's (``conv1``,
``dense1.0.bn1``, ``dense1.0.conv1``, ``dense1.0.bn2``, ``dense1.0.conv2``,
``trans1.bn``, ``trans1.conv``, …, ``bn``, ``linear``). 6.96M parameters for 10
classes (Table 6: 6.96M).

A pre-activation network: each bottleneck's ``bn1`` reads a concatenation, each
transition's ``bn`` too, and so does the final ``bn``: those BatchNorms are
*standalone* (no conv output feeds them directly), belong to no layer and are never
trained by CLAT. ``bn2`` is merged with the bottleneck's ``conv1``; the stem conv
is merged with ``dense1.0.bn1``, which reads its output directly. Transition convs
feed an average pool and stand alone. 121 layers: stem + 58 bottlenecks x 2
convs + 3 transition convs + linear — the "121" of the name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clat.models.registry import register_model


class Bottleneck(nn.Module):
    def __init__(self, in_planes: int, growth_rate: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth_rate, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth_rate)
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNet(nn.Module):
    def __init__(self, nblocks: list[int], growth_rate: int, num_classes: int, normalize: nn.Module, reduction: float = 0.5) -> None:
        super().__init__()
        self.normalize = normalize
        self.growth_rate = growth_rate
        planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(3, planes, 3, padding=1, bias=False)
        for i, n in enumerate(nblocks, start=1):
            setattr(self, f"dense{i}", self._make_dense(planes, n))
            planes += n * growth_rate
            if i < len(nblocks):
                out_planes = int(math.floor(planes * reduction))
                setattr(self, f"trans{i}", Transition(planes, out_planes))
                planes = out_planes
        self.n_stages = len(nblocks)
        self.bn = nn.BatchNorm2d(planes)
        self.linear = nn.Linear(planes, num_classes)

    def _make_dense(self, planes: int, n: int) -> nn.Sequential:
        blocks = []
        for _ in range(n):
            blocks.append(Bottleneck(planes, self.growth_rate))
            planes += self.growth_rate
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        for i in range(1, self.n_stages + 1):
            out = getattr(self, f"dense{i}")(out)
            if i < self.n_stages:
                out = getattr(self, f"trans{i}")(out)
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@register_model(
    "densenet121", default_k=5, description="CIFAR DenseNet-121, growth 32 (Huang et al. 2017; kuangliu layout), 6.96M parameters"
)
def densenet121(num_classes: int, normalize: nn.Module) -> nn.Module:
    return DenseNet([6, 12, 24, 16], 32, num_classes, normalize)
