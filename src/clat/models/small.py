"""Small CNNs that train in seconds on a CPU, for demos, tests and CPU studies."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clat.models.registry import register_model


class SmallCNN(nn.Module):
    """Four conv+BN+ReLU stages (the last three stride 2), global average pool, linear."""

    def __init__(self, num_classes: int, normalize: nn.Module, widths: tuple[int, int, int, int] = (32, 64, 128, 256)) -> None:
        super().__init__()
        self.normalize = normalize
        chans = (3, *widths)
        self.features = nn.Sequential(
            *[
                nn.Sequential(
                    nn.Conv2d(chans[i], chans[i + 1], 3, 1 if i == 0 else 2, 1, bias=False),
                    nn.BatchNorm2d(chans[i + 1]),
                    nn.ReLU(),
                )
                for i in range(4)
            ]
        )
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(self.normalize(x))
        return self.classifier(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register_model("small_cnn", default_k=1, description="4-conv CNN, 0.39M parameters: CPU demos and studies")
def small_cnn(num_classes: int, normalize: nn.Module) -> nn.Module:
    return SmallCNN(num_classes, normalize)


@register_model("tiny_cnn", default_k=1, description="4-conv CNN at half width, 99K parameters: tests and smoke runs")
def tiny_cnn(num_classes: int, normalize: nn.Module) -> nn.Module:
    return SmallCNN(num_classes, normalize, widths=(16, 32, 64, 128))
