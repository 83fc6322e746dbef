"""CIFAR VGG-19 with BatchNorm (Simonyan & Zisserman 2015), with a 4096-4096 classifier.

Features: the kuangliu/pytorch-cifar layout (``features.0`` conv 3x3 with bias,
``features.1`` BN, ReLU, …, five max-pools, 16 convs; module indices as in
kuangliu's ``VGG('VGG19')``), ending in a 512-channel 1x1 map.

Classifier — a choice, stated here and in docs/models.md: kuangliu's CIFAR VGG-19
has a single ``Linear(512, classes)`` and 20.04M parameters, far from the 39.3M of
the paper's Table 6. The paper's count is matched by the classic VGG head on the
512-d pooled feature: ``Linear(512, 4096) -> ReLU -> Dropout -> Linear(4096, 4096)
-> ReLU -> Dropout -> Linear(4096, classes)`` (torchvision's module names
``classifier.0/3/6``): 38.96M for 10 classes (-0.9%), 39.33M for 100 classes
(the paper's figure is probably the CIFAR-100 one). Checkpoints of kuangliu's
single-linear VGG therefore do not load into this model (the 16 conv layers
match; the classifier does not).

Layers: every conv is merged with the BN that follows it; the three linears stand
alone. 19 layers (16 convs + 3 linears) — the "19" of the name. Only the last
linear is the classifier excluded from selection by default; the two hidden
4096-wide linears (2.1M and 16.8M parameters) are selectable.
"""

from __future__ import annotations

import torch
from torch import nn

from clat.models.registry import register_model

VGG19_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, cfg: list[int | str], num_classes: int, normalize: nn.Module, hidden: int = 4096, dropout: float = 0.5) -> None:
        super().__init__()
        self.normalize = normalize
        layers: list[nn.Module] = []
        c = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                assert isinstance(v, int)
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        layers.append(nn.AvgPool2d(1, 1))  # kuangliu keeps this no-op; kept so that feature indices match
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(c, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(self.normalize(x))
        return self.classifier(out.flatten(1))


@register_model("vgg19", default_k=1, description="CIFAR VGG-19-BN with a 4096-4096 classifier (kuangliu features), 39.0M parameters")
def vgg19(num_classes: int, normalize: nn.Module) -> nn.Module:
    return VGG(VGG19_CFG, num_classes, normalize)


VGG11_W16_CFG: list[int | str] = [16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128, "M"]


@register_model("vgg11_w16", default_k=1,
                description="CIFAR VGG-11-BN at 1/4 width (16-128 channels) with a 256-256 classifier, 0.68M parameters: CPU studies (a "
                            "chain)")
def vgg11_w16(num_classes: int, normalize: nn.Module) -> nn.Module:
    """VGG-11 (configuration A of Simonyan & Zisserman) at a quarter of its width: 8 conv+BN layers and
    3 linears, 11 layers in a plain chain, where Eq. 6 has no ambiguity (the CPU-sized counterpart of
    ``resnet18_w16`` for studies that must not depend on residual connections)."""
    return VGG(VGG11_W16_CFG, num_classes, normalize, hidden=256)
