"""TRADES: CE on clean inputs + β · KL(f(x) ‖ f(x')) on KL-maximising examples (Zhang et al. 2019).

"Theoretically principled trade-off between robustness and accuracy". As in the
reference code, the attack runs with the model in eval mode (``attack_mode="eval"``;
``"train"`` uses batch statistics with frozen running ones, as clat 0.1 did), starts
from x + 0.001·N(0, I) and maximises the per-sample KL divergence to the (fixed) clean
prediction; the robust term is the KL summed over classes and averaged over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from clat.attacks.threat import Shard, ThreatModel, perturb, randn_like
from clat.layers.freezing import eval_mode, frozen_bn_statistics
from clat.methods.base import AdversarialMethod, accuracy
from clat.methods.registry import register_method


def kl_per_sample(logits_adv: torch.Tensor, probs_clean: torch.Tensor) -> torch.Tensor:
    """KL(p_clean ‖ p_adv) per sample, as ``nn.KLDivLoss(reduction='none')(log p_adv, p_clean).sum(1)``."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), probs_clean, reduction="none").sum(1)


@dataclass
class TradesConfig:
    beta: float = 6.0  # weight of the robust (KL) term
    # model mode while crafting the attack: eval as the reference code; train (batch statistics, running ones frozen) as clat 0.1
    attack_mode: Literal["eval", "train"] = "eval"

    def check(self, need) -> None:
        need(self.beta >= 0, f"trades.beta must be >= 0, got {self.beta}")


@register_method("trades", label="TRADES", section=TradesConfig, baseline=True)
class TRADES(AdversarialMethod):
    def __init__(self, attack: ThreatModel, beta: float = 6.0, attack_mode: str = "eval") -> None:
        super().__init__(attack)
        self.beta = beta
        self.attack_mode = attack_mode

    def divergence(self, logits_adv: torch.Tensor, probs_clean: torch.Tensor) -> torch.Tensor:
        return kl_per_sample(logits_adv, probs_clean)

    def adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, shard: Shard | None = None) -> torch.Tensor:
        with eval_mode(model) if self.attack_mode == "eval" else frozen_bn_statistics(model):
            with torch.no_grad():
                p_clean = F.softmax(model(x), dim=1)
            return perturb(lambda xa: self.divergence(model(xa), p_clean), x, self.threat, delta0=0.001 * randn_like(x, shard))

    def natural(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.ce(logits, y)

    def objective(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                          dict[str, torch.Tensor]]:
        logits = model(x)
        with frozen_bn_statistics(model):  # one statistics update per step, from the clean batch
            logits_adv = model(x_adv)
        natural = self.natural(logits, y)
        robust = self.divergence(logits_adv, F.softmax(logits, dim=1)).mean()
        loss = natural + self.beta * robust
        return loss, {"loss": loss.detach(), "natural": natural.detach(), "robust": robust.detach(), "acc": accuracy(logits, y),
                      "adv_acc": accuracy(logits_adv, y)}
