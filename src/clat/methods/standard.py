"""Clean (standard) training: cross-entropy on the clean input."""

from __future__ import annotations

import torch
from torch import nn

from clat.attacks.threat import Shard
from clat.methods.base import Method, accuracy
from clat.methods.registry import register_method


@register_method("standard", label="Standard", baseline=True)
class Standard(Method):

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, shard: Shard | None = None) -> tuple[torch.Tensor,
                                                                                                            dict[str, torch.Tensor]]:
        logits = model(x)
        loss = self.ce(logits, y)
        return loss, {"loss": loss.detach(), "acc": accuracy(logits, y)}
