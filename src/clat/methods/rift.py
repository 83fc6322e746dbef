"""RiFT: robust critical fine-tuning (Zhu et al. 2023), a parameter-efficient peer of CLAT.

"Improving generalization of adversarial training via robust critical fine-tuning":

1. *Module robust criticality* (MRC) of each layer: the largest increase of the
   adversarial loss when only that layer's weight moves within
   ``‖Δw‖ ≤ ε·‖w‖`` (found by projected gradient ascent on the weight, adversarial
   examples fixed). The layer with the *lowest* MRC is "non-robust-critical".
2. Fine-tune only that layer on clean inputs (cross-entropy).
3. Interpolate ``θ(α) = (1 − α)·θ_AT + α·θ_FT`` and keep the α with the best clean
   accuracy on the validation split (carved from the training data, never the
   test set) whose PGD accuracy is not more than ``tolerance`` below θ_AT's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from clat.attacks.threat import Shard, ThreatModel, pgd
from clat.base.distributed import broadcast_object
from clat.base.run_records import SelectionEvent
from clat.criticality.estimators import module_robust_criticality
from clat.criticality.index import eligible_mask
from clat.layers.discovery import Layer, resolve_layers, warn_unassigned
from clat.layers.freezing import freeze_all_but
from clat.methods.base import EpochContext, Method, accuracy
from clat.methods.registry import register_method


def interpolate(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """``(1 − α)·start + α·end`` per tensor, on ``end``'s device (a resumed run's ``start`` comes from a
    checkpoint on the CPU); exactly ``start`` at α = 0 and ``end`` at α = 1."""
    out = {}
    for k, a in start.items():
        b = end[k]
        a = a.to(b.device)
        out[k] = torch.lerp(a, b, alpha) if a.is_floating_point() else (a if alpha < 0.5 else b)
    return out


@dataclass
class RiftConfig:
    weight_eps: float = 0.1  # MRC: weight perturbation bound, relative to the layer's weight norm
    steps: int = 5  # MRC: gradient-ascent steps on the weight perturbation
    batch_size: int = 256  # training images used for MRC
    # interpolation weights tried between the start and the fine-tuned weights
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    tolerance: float = 0.005  # allowed drop of validation PGD accuracy when choosing α

    def check(self, need) -> None:
        need(self.weight_eps > 0 and self.steps >= 1 and self.batch_size >= 1, "rift.weight_eps must be > 0, rift.steps and "
                                                                               "rift.batch_size >= 1")
        need(bool(self.alphas) and all(0 <= a <= 1 for a in self.alphas), f"rift.alphas must be a non-empty list of values in [0, 1], got "
                                                                          f"{self.alphas}")


@register_method("rift", label="RiFT", section=RiftConfig, needs_layers=True)
class RiFT(Method):
    @classmethod
    def from_config(cls, ctx) -> "RiFT":
        return cls(ctx.cfg.attack.threat(), ctx.cfg.rift, ctx.layers)


    def __init__(self, attack: ThreatModel, cfg: RiftConfig, layers: list[Layer]) -> None:
        super().__init__(attack)
        self.cfg = cfg
        self.layers = layers
        self.eligible = eligible_mask(layers, include_classifier=False)
        self.selected: list[Layer] = []
        self.history: list[dict] = []
        self.start_state: dict[str, torch.Tensor] | None = None

    def setup(self, model: nn.Module) -> None:
        warn_unassigned(model, self.layers, "rift")

    def on_epoch_start(self, model: nn.Module, ctx: EpochContext) -> dict:
        if self.selected:
            freeze_all_but(model, self.selected)
            return {}
        self.start_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        x, y = ctx.sample_batch(self.cfg.batch_size)
        was = model.training
        model.eval()
        try:
            x_adv = pgd(model, x, y, self.threat)
            mrc = module_robust_criticality(model, self.layers, x_adv, y, eps=self.cfg.weight_eps, steps=self.cfg.steps)
        finally:
            model.train(was)
        idx = broadcast_object(min((i for i, ok in enumerate(self.eligible) if ok), key=lambda i: mrc[i]))  # rank 0's choice
        self.selected = [self.layers[idx]]
        trainable = freeze_all_but(model, self.selected)
        event = SelectionEvent(epoch=ctx.epoch + 1, epoch_in_stage=ctx.stage_epoch + 1, selected=[self.layers[idx].name],
                               selected_index=[idx], trainable_params=trainable, criticality=mrc,
                               extra={"measure": "module robust criticality (lowest is chosen)"})
        self.history.append(event.to_dict())
        return {"selection": event}

    def trainable_bns(self) -> list[str] | None:
        return [l.bn_name for l in self.selected if l.bn_name is not None]

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, shard: Shard | None = None) -> tuple[torch.Tensor,
                                                                                                            dict[str, torch.Tensor]]:
        logits = model(x)
        loss = self.ce(logits, y)
        return loss, {"loss": loss.detach(), "acc": accuracy(logits, y)}

    def on_stage_end(self, model: nn.Module, validate) -> dict:
        """Choose α on the validation split and leave the model at θ(α)."""
        assert self.start_state is not None
        end = {k: v.detach().clone() for k, v in model.state_dict().items()}
        results = []
        for alpha in self.cfg.alphas:
            model.load_state_dict(interpolate(self.start_state, end, alpha))
            results.append({"alpha": alpha, **validate(model)})
        ref = next((r for r in results if r["alpha"] == 0.0), None) or results[0]
        ok = [r for r in results if r["pgd_acc"] >= ref["pgd_acc"] - self.cfg.tolerance]
        best = max(ok, key=lambda r: (r["clean_acc"], r["pgd_acc"]))
        model.load_state_dict(interpolate(self.start_state, end, best["alpha"]))
        return {"interpolation": {"chosen_alpha": best["alpha"], "candidates": results, "tolerance": self.cfg.tolerance}}

    def log_fields(self) -> dict:
        return {"selected": [l.name for l in self.selected]}

    def state_dict(self) -> dict:
        # θ_AT (the interpolation's start) travels with the checkpoint so a resumed stage can still interpolate
        return {"selected": [l.name for l in self.selected], "history": self.history, "start_state": self.start_state}

    def load_state_dict(self, state: dict) -> None:
        self.selected = resolve_layers(self.layers, state.get("selected", []))
        self.history = list(state.get("history", []))
        self.start_state = state.get("start_state")
