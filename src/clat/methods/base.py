"""The one interface every training method implements.

A method is a loss (TRADES' lesson) plus a few hooks the training loop calls:
which BatchNorm layers train, what happens when an epoch starts (CLAT's
re-selection), and a JSON-able state for resuming. A method never touches the
optimizer, the schedule or the device; the loop derives the trainable set from
``requires_grad``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from clat.attacks.threat import Shard, ThreatModel
from clat.base import rng
from clat.data.loader import to_unit_float


@dataclass
class EpochContext:
    """What a method's ``on_epoch_start`` may use. In a loop of one's own, :meth:`of` makes it from the training data."""

    epoch: int  # 0-based epoch of the whole run
    stage_epoch: int  # 0-based epoch within the current stage
    sample_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # n fresh random training images (no augmentation)
    generator: torch.Generator  # seeded per epoch: random choices stay reproducible on resume

    @classmethod
    def of(cls, epoch: int, data: Any, *, seed: int = 0, stage_epoch: int | None = None,
           device: torch.device | str = "cpu") -> "EpochContext":
        """The context of (0-based) ``epoch`` for a loop of one's own (docs/own_loop.md). ``data``: the training data, as an
        ``(images, labels)`` pair of tensors, a torch ``Dataset`` of ``(image, label)`` pairs or a ``DataLoader`` (its
        dataset; the dataset's own transforms apply). ``sample_batch(n)`` draws n random examples of it as float [0, 1]
        images on ``device``; the draws and ``generator`` depend on ``seed`` and the epoch only, as in ``clat.train``, so
        a re-run epoch selects the same layers. ``stage_epoch``: the epoch within the stage (default: ``epoch``)."""

        data = getattr(data, "dataset", data)  # a DataLoader: its dataset

        def sample_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            pair = isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)
            idx = torch.randperm(len(data[0]) if pair else len(data), generator=rng.epoch_generator(seed, epoch, 2))[:n]
            if pair:
                x, y = data[0][idx], data[1][idx]
            else:
                items = [data[int(i)] for i in idx]
                x, y = torch.stack([torch.as_tensor(a) for a, _ in items]), torch.as_tensor([int(b) for _, b in items])
            return to_unit_float(x).to(device), y.to(device)

        return cls(epoch, epoch if stage_epoch is None else stage_epoch, sample_batch, rng.epoch_generator(seed, epoch, 1))


class Method:
    """Base class: full-model training with the loss of a subclass."""

    name = "base"
    label_smoothing = 0.0  # of the cross-entropy terms of the training loss (the stage's label_smoothing); attacks use plain labels

    def __init__(self, attack: ThreatModel) -> None:
        """``attack``: the training threat model every attack of the method uses (a run's is its ``attack:`` section's,
        ``cfg.attack.threat()``; an object with a ``threat()`` method, such as that section itself, is taken too)."""
        self.threat: ThreatModel = attack if isinstance(attack, ThreatModel) else attack.threat()

    @classmethod
    def from_config(cls, ctx) -> "Method":
        """The method as a run config describes it (``ctx``: :class:`clat.methods.registry.BuildContext`): the run's
        attack section, and the method's own section as keyword arguments (``trades.beta`` -> ``beta=``)."""
        return cls(ctx.cfg.attack.threat(), **ctx.options(cls.name))

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

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, shard: Shard | None = None) -> tuple[torch.Tensor,
                                                                                                            dict[str, torch.Tensor]]:
        """The training loss of a batch and the metrics to log. ``shard``: where ``x`` sits in a data-parallel
        step's global batch; pass it to every random draw of an attack (``pgd(..., shard=shard)``)."""
        raise NotImplementedError

    def ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The cross-entropy term of a training loss, with the method's label smoothing."""
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

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

    def objective(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                          dict[str, torch.Tensor]]:
        raise NotImplementedError

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, shard: Shard | None = None) -> tuple[torch.Tensor,
                                                                                                            dict[str, torch.Tensor]]:
        return self.objective(model, x, self.adversarial(model, x, y, shard), y)
