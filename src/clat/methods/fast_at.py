"""Fast-AT: cross-entropy on one FGSM step from a random start (Wong et al. 2020).

"Fast is better than free": step 1.25 ε from a uniform random start in the ε-ball."""

from __future__ import annotations

import torch
from torch import nn

from clat.attacks.threat import Shard, fgsm_rs
from clat.layers.freezing import frozen_bn_statistics
from clat.methods.pgd_at import PGDAT
from clat.methods.registry import register_method


@register_method("fast_at", label="Fast-AT", baseline=True)
class FastAT(PGDAT):

    def adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, shard: Shard | None = None) -> torch.Tensor:
        with frozen_bn_statistics(model):
            return fgsm_rs(model, x, y, self.threat, shard=shard)
