"""What trains: freezing parameters outside the chosen layers, and the BatchNorm modes that go with it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

from torch import nn

from clat.layers.discovery import BN_TYPES, Layer, layer_parameter_names


def freeze_all_but(model: nn.Module, layers: Iterable[Layer]) -> int:
    """``requires_grad`` on the parameters of ``layers`` only; returns the trainable count."""
    keep = set(layer_parameter_names(model, layers))
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
        if name in keep:
            n += p.numel()
    return n


def unfreeze_all(model: nn.Module) -> int:
    for p in model.parameters():
        p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters())


def set_bn_train_mode(model: nn.Module, trainable_bns: Iterable[str] | None) -> None:
    """``model.train()``, then BatchNorm modules outside ``trainable_bns`` back to eval so
    their running statistics stay fixed. ``None`` means every BatchNorm trains."""
    model.train()
    if trainable_bns is None:
        return
    keep = set(trainable_bns)
    for name, m in model.named_modules():
        if isinstance(m, BN_TYPES) and name not in keep:
            m.eval()


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """The whole model(s) in eval mode (running statistics, no dropout) for the block; every
    module's own train/eval flag is restored afterwards (frozen BatchNorms stay frozen)."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training


@contextmanager
def frozen_bn_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers in train mode keep normalizing with batch statistics, but
    their running statistics are not updated (attack iterations must not pollute them)."""
    saved = []
    for m in model.modules():
        if isinstance(m, BN_TYPES) and m.training and m.track_running_stats:
            saved.append((m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None))
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for m, momentum, nbt in saved:
            m.momentum = momentum
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
