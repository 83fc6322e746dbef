"""MART: misclassification-aware adversarial training (Wang et al. 2020).

"Improving adversarial robustness requires revisiting misclassified examples":
boosted CE on PGD examples (CE + a margin term against the most likely wrong
class) plus β · KL(f(x) ‖ f(x')) weighted by (1 − p_y(x)), so examples the model
already gets wrong on clean inputs weigh more. Follows the reference code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from clat.attacks.threat import Shard, ce_objective, perturb, randn_like
from clat.layers.freezing import eval_mode, frozen_bn_statistics
from clat.methods.base import accuracy
from clat.methods.registry import register_method
from clat.methods.trades import TRADES


def mart_loss(logits: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float,
              label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, boosted CE, weighted KL) of MART (``label_smoothing``: of its CE term)."""
    adv_probs = F.softmax(logits_adv, dim=1)
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])  # most likely wrong class
    bce = F.cross_entropy(logits_adv, y, label_smoothing=label_smoothing) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), wrong)
    nat_probs = F.softmax(logits, dim=1)
    true_probs = nat_probs.gather(1, y.unsqueeze(1)).squeeze(1)
    kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(1)
    robust = (kl * (1.0000001 - true_probs)).mean()
    return bce + beta * robust, bce, robust


@dataclass
class MartConfig:
    beta: float = 6.0  # weight of the misclassification-weighted KL term
    attack_mode: Literal["eval", "train"] = "eval"  # model mode while crafting the attack: eval as the reference code; train as clat 0.1

    def check(self, need) -> None:
        need(self.beta >= 0, f"mart.beta must be >= 0, got {self.beta}")


@register_method("mart", label="MART", section=MartConfig, baseline=True)
class MART(TRADES):
    """MART: misclassification-aware adversarial training (Wang et al. 2020).

    It shares TRADES' β and attack mode (its constructor); its attack (PGD on the cross-entropy from
    x + 0.001·N(0, I)) and its loss are its own."""

    def adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, shard: Shard | None = None) -> torch.Tensor:
        with eval_mode(model) if self.attack_mode == "eval" else frozen_bn_statistics(model):
            return perturb(ce_objective(model, y), x, self.threat, delta0=0.001 * randn_like(x, shard))

    def objective(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                          dict[str, torch.Tensor]]:
        logits_adv = model(x_adv)
        with frozen_bn_statistics(model):
            logits = model(x)
        loss, bce, robust = mart_loss(logits, logits_adv, y, self.beta, self.label_smoothing)
        return loss, {"loss": loss.detach(), "bce": bce.detach(), "robust": robust.detach(), "adv_acc": accuracy(logits_adv, y)}
