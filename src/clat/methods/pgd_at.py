"""PGD adversarial training: cross-entropy on PGD examples (Madry et al. 2018).

"Towards deep learning models resistant to adversarial attacks".

The attack runs with the model in its training mode (batch statistics, as in
the training forward) while BatchNorm running statistics stay frozen, so only
the training forward updates them.
"""

from __future__ import annotations

import torch
from torch import nn

from clat.attacks.threat import Shard, pgd
from clat.layers.freezing import frozen_bn_statistics
from clat.methods.base import AdversarialMethod, accuracy
from clat.methods.registry import register_method


@register_method("pgd_at", label="PGD-AT", baseline=True)
class PGDAT(AdversarialMethod):

    def adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, shard: Shard | None = None) -> torch.Tensor:
        with frozen_bn_statistics(model):
            return pgd(model, x, y, self.threat, shard=shard)

    def objective(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                          dict[str, torch.Tensor]]:
        logits = model(x_adv)
        loss = self.ce(logits, y)
        return loss, {"loss": loss.detach(), "adv_acc": accuracy(logits, y)}
