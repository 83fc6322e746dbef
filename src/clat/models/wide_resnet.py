"""Wide residual networks (Zagoruyko & Komodakis 2016) in the two layouts robust checkpoints use.

``wrn34_10`` — WideResNet-34-10 of Madry et al. / TRADES (Zhang et al. 2019), the
code RobustBench ships as ``WideResNet``: module names ``conv1``,
``block1.layer.0.{bn1,conv1,bn2,conv2,convShortcut}``, ``block2``, ``block3``,
``bn1``, ``fc``; in-place ReLUs; TRADES' initialisation. 46.16M parameters for 10
classes (Table 6: 46.16M). The TRADES release also defines a ``sub_block1`` that
its forward pass never uses (RobustBench's ``sub_block1=True``); it is not built
here (it would add 2.1M dead parameters), and its keys are dropped when such a
checkpoint is loaded (``unused_checkpoint_prefixes``, read by
:func:`clat.runs.checkpoint.load_into`).

``wrn70_16`` — WideResNet-70-16 of Gowal et al. 2020 / Rebuffi et al. 2021 (DeepMind),
RobustBench's ``DMWideResNet(depth=70, width=16, activation_fn=Swish)``: module
names ``init_conv``, ``layer.0.block.0.{batchnorm_0,conv_0,batchnorm_1,conv_1,shortcut}``,
``batchnorm``, ``logits``; "SAME" padding done by hand (``F.pad`` then an
unpadded conv, asymmetric for stride 2) so that their weights give their
outputs; Swish (SiLU) activations, as in every public WRN-70-16 checkpoint on
RobustBench. 266.8M parameters (Table 6: 267M). RobustBench stores this model's
normalization as ``mean``/``std`` buffers; here it lives in the ``normalize``
module, and :func:`clat.runs.checkpoint.load_into` maps those buffers onto it.

Both are pre-activation networks: each block starts with ``BN -> act`` on its
input, which (except in the very first block, where it reads the stem conv) is a
residual sum. Such BatchNorms are *standalone*: no conv output feeds them
directly, so they belong to no layer (see :mod:`clat.layers`) and CLAT never
trains them. The BN after each block's first conv is merged with that conv.
Layers: WRN-34-10 35 (stem + 15 blocks x 2 convs + 3 shortcut convs + fc),
WRN-70-16 71 (stem + 33 blocks x 2 convs + 3 shortcut convs + logits).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clat.models.registry import register_model

# -- Madry / TRADES layout ------------------------------------------------------------------

def wrn_shape(depth: int, width: int) -> tuple[int, list[int]]:
    """Blocks per group and the channels (stem, group 1-3) of a WRN-depth-width: depth = 6n + 4."""
    if (depth - 4) % 6:
        raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
    return (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]

class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.droprate = drop_rate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = None if self.equalInOut else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
            out = x
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        return torch.add(x if self.convShortcut is None else self.convShortcut(x), out)


class NetworkBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate) for i in range(n)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-width of Madry et al. / TRADES (without the unused ``sub_block1``)."""

    # keys of public checkpoints that this model does not have and never used
    unused_checkpoint_prefixes: tuple[str, ...] = ("sub_block1.",)

    def __init__(self, depth: int, widen_factor: int, num_classes: int, normalize: nn.Module, drop_rate: float = 0.0) -> None:
        super().__init__()
        n, ch = wrn_shape(depth, widen_factor)
        self.normalize = normalize
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], num_classes)
        self.nChannels = ch[3]
        for m in self.modules():  # TRADES' initialisation
            if isinstance(m, nn.Conv2d):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


# -- DeepMind (Gowal et al. / Rebuffi et al.) layout ---------------------------------------
class DMBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, activation: type[nn.Module]) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"unsupported stride {stride}")
        self.batchnorm_0 = nn.BatchNorm2d(in_planes)
        self.relu_0 = activation()
        self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride, 0, bias=False)  # padded by hand ("SAME")
        self.batchnorm_1 = nn.BatchNorm2d(out_planes)
        self.relu_1 = activation()
        self.conv_1 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.has_shortcut = in_planes != out_planes
        self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False) if self.has_shortcut else None
        self._stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_shortcut:
            x = self.relu_0(self.batchnorm_0(x))
            v = x
        else:
            v = self.relu_0(self.batchnorm_0(x))
        v = F.pad(v, (1, 1, 1, 1) if self._stride == 1 else (0, 1, 0, 1))
        out = self.relu_1(self.batchnorm_1(self.conv_0(v)))
        out = self.conv_1(out)
        return torch.add(self.shortcut(x) if self.shortcut is not None else x, out)


class DMBlockGroup(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self.block = nn.Sequential(
            *[DMBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, activation) for i in range(n)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DMWideResNet(nn.Module):
    """WRN-depth-width of Gowal et al. 2020 (DeepMind), RobustBench's ``DMWideResNet``."""

    def __init__(self, depth: int, width: int, num_classes: int, normalize: nn.Module, activation: type[nn.Module] = nn.SiLU) -> None:
        super().__init__()
        n, ch = wrn_shape(depth, width)
        self.normalize = normalize
        self.init_conv = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.layer = nn.Sequential(
            DMBlockGroup(n, ch[0], ch[1], 1, activation),
            DMBlockGroup(n, ch[1], ch[2], 2, activation),
            DMBlockGroup(n, ch[2], ch[3], 2, activation),
        )
        self.batchnorm = nn.BatchNorm2d(ch[3])
        self.relu = activation()
        self.logits = nn.Linear(ch[3], num_classes)
        self.num_channels = ch[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(self.init_conv(self.normalize(x)))
        out = self.relu(self.batchnorm(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.logits(out)


@register_model("wrn34_10", default_k=2, description="WideResNet-34-10 (Madry et al./TRADES layout), 46.2M parameters")
def wrn34_10(num_classes: int, normalize: nn.Module) -> nn.Module:
    return WideResNet(34, 10, num_classes, normalize)


@register_model(
    "wrn70_16", default_k=4, description="WideResNet-70-16, Swish (Gowal et al. 2020; RobustBench DMWideResNet layout), 267M parameters"
)
def wrn70_16(num_classes: int, normalize: nn.Module) -> nn.Module:
    return DMWideResNet(70, 16, num_classes, normalize, activation=nn.SiLU)
