"""AWP: adversarial weight perturbation around a base method's step (Wu et al. 2020).

"Adversarial weight perturbation helps robust generalization". After the base
method crafts its adversarial examples, the weights w of every (trainable)
conv/linear weight tensor are moved to w + v with
``v = γ · ‖w‖ · g / ‖g‖``, g the gradient of the base objective (one ascent step
of the reference code's proxy, whose scale the normalisation removes); the
objective and its gradient are computed there, and the weights are restored
*exactly* (copied back) before the optimizer applies that gradient to w. This is
a hook around the step (``after_backward``), not a new loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from clat.attacks.threat import Shard, ThreatModel
from clat.layers.freezing import frozen_bn_statistics
from clat.methods.base import AdversarialMethod, EpochContext, Method
from clat.methods.registry import register_method


@dataclass
class AwpConfig:
    base: Literal["pgd_at", "trades"] = "pgd_at"  # the method AWP wraps
    gamma: float = 5e-3  # relative size of the weight perturbation
    warmup: int = 0  # epochs of the stage before AWP starts

    def check(self, need) -> None:
        need(self.gamma >= 0, f"awp.gamma must be >= 0, got {self.gamma}")
        need(self.warmup >= 0, f"awp.warmup must be >= 0, got {self.warmup}")


@register_method("awp", label="AWP", section=AwpConfig, baseline=True)
class AWP(Method):
    @classmethod
    def from_config(cls, ctx) -> "AWP":
        c = ctx.cfg.awp
        return cls(ctx.cfg.attack.threat(), ctx.baseline(c.base, "awp.base"), c.gamma, c.warmup)


    def __init__(self, attack: ThreatModel, base: AdversarialMethod, gamma: float = 5e-3, warmup: int = 0) -> None:
        super().__init__(attack)
        self.base = base
        self.gamma = gamma
        self.warmup = warmup
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._active = True

    def on_epoch_start(self, model: nn.Module, ctx: EpochContext) -> dict:
        self._active = ctx.stage_epoch >= self.warmup
        return self.base.on_epoch_start(model, ctx)

    def trainable_bns(self) -> list[str] | None:
        return self.base.trainable_bns()

    def _weights(self, model: nn.Module) -> list[torch.Tensor]:
        return [p for p in model.parameters() if p.requires_grad and p.dim() > 1]

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, shard: Shard | None = None) -> tuple[torch.Tensor,
                                                                                                            dict[str, torch.Tensor]]:
        x_adv = self.base.adversarial(model, x, y, shard)
        if self._active and self.gamma > 0:
            weights = self._weights(model)
            with frozen_bn_statistics(model):  # statistics update once per step, in the real objective
                obj, _ = self.base.objective(model, x, x_adv, y)
            grads = torch.autograd.grad(obj, weights, allow_unused=True)
            with torch.no_grad():
                self._saved = [(w, w.detach().clone()) for w in weights]
                for w, g in zip(weights, grads):
                    if g is not None:
                        w.add_(g * (self.gamma * w.norm() / (g.norm() + 1e-20)))
        loss, metrics = self.base.objective(model, x, x_adv, y)
        return loss, metrics

    def after_backward(self, model: nn.Module) -> None:
        with torch.no_grad():
            for w, saved in self._saved:
                w.copy_(saved)
        self._saved = []

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state)
