"""The one interface every training method implements.

A method is a loss (TRADES' lesson) plus a few hooks the training loop calls:
which BatchNorm layers train, what happens when an epoch starts (CLAT's
re-selection), and a JSON-able state for resuming. A method never touches the
optimizer, the schedule or the device; the loop derives the trainable set from
``requires_grad``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from clat.attacks import Shard, ThreatModel
from clat.config import AttackConfig


@dataclass
class EpochContext:
    epoch: int  # 0-based epoch of the whole run
    stage_epoch: int  # 0-based epoch within the current stage
    sample_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # n fresh random training images (no augmentation)
    generator: torch.Generator  # seeded per epoch: random choices stay reproducible on resume


class Method:
    """Base class: full-model training with the loss of a subclass."""

    name = "base"

    def __init__(self, attack: AttackConfig | ThreatModel) -> None:
        if isinstance(attack, ThreatModel):
            attack = AttackConfig(eps=attack.eps, alpha=attack.alpha, steps=attack.steps, norm=attack.norm)
        self.attack = attack  # the run's ``attack:`` section
        self.threat: ThreatModel = attack.threat()  # the training threat model every attack of the method uses

    @classmethod
    def from_config(cls, ctx) -> "Method":
        """The method as a run config describes it (``ctx``: :class:`clat.methods.registry.BuildContext`): the run's
        attack section, and the method's own section as keyword arguments (``trades.beta`` -> ``beta=``)."""
        return cls(ctx.cfg.attack, **ctx.options(cls.name))

    def setup(self, model: nn.Module) -> None:
        """Called once when the stage starts, before the optimizer is built (LoRA adds its adapters here)."""

    def trainable_bns(self) -> list[str] | None:
        """BatchNorm modules whose running statistics update; None: all of them."""
        return None

    def on_epoch_start(self, model: nn.Module, ctx: EpochContext) -> dict:
        """Called before each epoch; returns events to log (JSON-able)."""
        for p in model.parameters():
            p.requires_grad_(True)
        return {}

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, shard: Shard | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of a batch and the metrics to log. ``shard``: where ``x`` sits in a data-parallel
        step's global batch; pass it to every random draw of an attack (``pgd(..., shard=shard)``)."""
        raise NotImplementedError

    def after_backward(self, model: nn.Module) -> None:
        """Called between ``loss.backward()`` and ``optimizer.step()`` (AWP restores weights here)."""

    def on_stage_end(self, model: nn.Module, validate: Callable[[nn.Module], dict]) -> dict:
        """Called once after the stage's last training epoch, before its evaluation and
        checkpoint; ``validate(model)`` gives clean and PGD accuracy on the validation split."""
        return {}

    def plain_model(self, model: nn.Module) -> nn.Module:
        """The model as the stage's end leaves it, for weights saved inside the stage (the best epoch, an early stop):
        ``model`` itself, unless the method changes its structure during the stage (LoRA: a copy, adapters merged)."""
        return model

    def log_fields(self) -> dict:
        """What the loop adds to each epoch's metrics row beyond the epoch's events (JSON-able)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == y).float().mean().detach()


class AdversarialMethod(Method):
    """A method whose loss is ``objective(model, x, adversarial(model, x, y), y)``.

    Splitting the two lets wrappers reuse them: AWP perturbs the weights between
    crafting the example and computing the objective; CLAT can use the objective
    as its CE term (``ce_on=base``).
    """

    def adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, shard: Shard | None = None) -> torch.Tensor:
        raise NotImplementedError

    def objective(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, shard: Shard | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.objective(model, x, self.adversarial(model, x, y, shard), y)
