"""SCORE-style training: TRADES with squared errors instead of CE and KL (Pang et al. 2022).

"Robustness and accuracy could be reconcilable by (proper) definition": the
local-equivalence view replaces the KL divergence by a distance on the output
probabilities. Here: natural term ‖softmax(f(x)) − onehot(y)‖², robust term
β·‖softmax(f(x')) − softmax(f(x))‖², and the attack maximises the robust term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clat.methods.registry import register_method
from clat.methods.trades import TRADES


@dataclass
class ScoreConfig:
    beta: float = 6.0  # weight of the squared-error robust term

    def check(self, need) -> None:
        need(self.beta >= 0, f"score.beta must be >= 0, got {self.beta}")


@register_method("score", label="SCORE", section=ScoreConfig, baseline=True)
class SCORE(TRADES):
    def divergence(self, logits_adv: torch.Tensor, probs_clean: torch.Tensor) -> torch.Tensor:
        return (F.softmax(logits_adv, dim=1) - probs_clean).pow(2).sum(1)

    def natural(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = F.one_hot(y, logits.shape[1]).to(logits)
        if self.label_smoothing:  # the smoothed target of cross-entropy's label smoothing
            target = target * (1 - self.label_smoothing) + self.label_smoothing / logits.shape[1]
        return (F.softmax(logits, dim=1) - target).pow(2).sum(1).mean()
