"""A small explicit model registry (timm's ``@register_model`` idea, without the magic)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from clat.errors import ConfigError

# Channel statistics of the CIFAR training sets; used by the Normalize layer
# inside each model so that the model's input is plain [0, 1] pixels.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel. Buffers are not persistent, so state dicts
    stay compatible with the same architecture trained without it."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ConfigError(f"normalization needs one mean and one positive std per channel, got mean={mean}, std={std}")
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def default_normalization(num_classes: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return (CIFAR100_MEAN, CIFAR100_STD) if num_classes == 100 else (CIFAR10_MEAN, CIFAR10_STD)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Callable[..., nn.Module]
    default_k: int  # the paper's number of critical layers for this model
    description: str


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, *, default_k: int, description: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelInfo(name, fn, default_k, description)
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _REGISTRY[name]


def create_model(
    name: str,
    num_classes: int = 10,
    *,
    normalize: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """Build a registered model. ``normalize=False`` gives a model that expects
    inputs already normalized by the caller (e.g. third-party checkpoints trained
    on raw [0, 1] pixels, such as the AutoAttack example ResNet-18)."""
    info = model_info(name)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if normalize:
        dm, ds = default_normalization(num_classes)
        norm: nn.Module = Normalize(mean or dm, std or ds)
    else:
        norm = nn.Identity()
    return info.builder(num_classes=num_classes, normalize=norm)
