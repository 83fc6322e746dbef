"""CLAT: fine-tune only the most critical layers against a feature-space attack (Eq. 8-9).

Criticality-Leveraged Adversarial Training (Gopal et al.), Algorithm 1.

At the start of epochs 1, 11, 21, … of its stage (every ``reselect_every``),
CLAT measures the criticality of every layer on a fresh random training batch,
keeps the top-k trainable and freezes everything else (parameters and
BatchNorm statistics). Each step then minimises

    CE(F(x), y) + λ · mean_x Σ_{i∈S} ‖F_i(x+δ*) − F_i(x)‖₂

with δ* maximising the same feature distance by PGD (or one FGSM-RS step,
"CLAT (Fast)"). The clean features are computed once per batch and reused as
the attack's target and in the loss; the attack and the adversarial forward
run the network only up to the deepest critical layer. CLAT composes with a
base method: ``ce_on="base"`` replaces the CE term by the base method's loss, and
every hook of the base method runs too (AWP's warm-up and weight perturbation
included). The base loss is computed first, then CLAT's feature term: a base
method that perturbs the weights for its loss (AWP) perturbs them for the whole
objective, as AWP around "X + CLAT".
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from clat.attacks.threat import Shard, ThreatModel, feature_distance, perturb
from clat.base.distributed import broadcast_object
from clat.base.errors import ConfigError
from clat.base.run_records import SelectionEvent
from clat.criticality.index import CriticalityConfig, compute_criticality, eligible_mask  # noqa: F401  (a section of ClatConfig)
from clat.criticality.selectors import SELECTORS, LayerScoring, choose, measured_key
from clat.layers.capture import FeatureExtractor, recomputed_blocks
from clat.layers.discovery import Layer, resolve_layers, warn_unassigned
from clat.layers.freezing import freeze_all_but, frozen_bn_statistics
from clat.methods.base import EpochContext, Method, accuracy
from clat.methods.registry import register_method
from clat.models import list_models, model_info


def default_k(layers: list[Layer], zoo_model: str | None = None) -> int:
    """How many layers CLAT trains when ``clat.k`` is not set: the paper's number for a zoo model
    (:func:`clat.models.model_info`), else its "about 5% of the layers"."""
    if zoo_model is not None:
        k = model_info(zoo_model).default_k
        if k is not None:
            return k
    return max(1, round(0.05 * len(layers)))


def resolve_k(k: int | None, layers: list[Layer], zoo_model: str | None = None, default: int | None = None) -> int:
    """The number of layers CLAT trains (and ``clat criticality`` lists as its top-k), the one place its sources meet:
    ``clat.k`` when set, else ``default`` (``create_method(default_k=...)``), else the paper's number for a zoo model,
    else about 5% of the layers (:func:`default_k`). ``zoo_model``: a model name that is not in the zoo counts as none."""
    if k is not None:
        return k
    if default is not None:
        return default
    return default_k(layers, zoo_model if zoo_model in list_models() else None)


@dataclass
class ClatConfig:
    k: int | None = None  # number of critical layers; None: the model's paper default
    lam: float = 0.1  # λ of Eq. 9 (when lam_mode is fixed); chosen by the sweep in docs/lambda_sweep.md
    lam_mode: Literal["fixed", "auto"] = "fixed"  # auto: λ = rho * CE / L_C measured at each (re)selection
    rho: float = 1.0  # lam_mode=auto: the ratio of the feature term to CE at each (re)selection
    selection: str = "critical"  # how layers are chosen: critical, random, deepest (the k last eligible ones), ... (`clat list selectors`)
    dynamic: bool = True  # re-select every `reselect_every` epochs (Algorithm 1); false: select once
    reselect_every: int = 10  # epochs between (re)selections (Algorithm 1: 10)
    layers: list[int | str] = field(default_factory=list)  # pin these layers (names, or indices given as integers) instead of selecting
    exclude: list[int | str] = field(default_factory=list)  # never select these
    ce_on: Literal["clean", "adv", "base"] = "clean"  # CE term of Eq. 9: clean input, x+δ*, or the base method's loss
    base: str | None = None  # base method for ce_on=base (default: the pretrain method)
    inner: Literal["pgd", "fast"] = "pgd"  # inner maximisation: PGD or one FGSM-RS step ("CLAT (Fast)")
    distance_scaling: Literal["none", "n", "sqrt_n"] = "none"  # Eq. 8 has no 1/N_i
    # the feature attack recomputes the blocks before the critical layers in its backward (activation checkpointing): same result, less
    # memory, about one more forward per attack step
    recompute: bool = False
    freeze_bn_stats: bool = False  # also keep the selected layers' BN running statistics fixed
    criticality: CriticalityConfig = field(default_factory=CriticalityConfig)

    def check(self, need) -> None:
        SELECTORS.entry(self.selection)  # a known selector (a package.module:function is imported now): else one line naming them
        need(self.k is None or self.k >= 1, f"clat.k must be >= 1, got {self.k}")
        need(self.lam >= 0, f"clat.lam must be >= 0, got {self.lam}")
        need(self.rho > 0, f"clat.rho must be > 0, got {self.rho}")
        need(self.reselect_every >= 1, f"clat.reselect_every must be >= 1, got {self.reselect_every}")
        need(self.criticality.batch_size >= 1, f"clat.criticality.batch_size must be >= 1, got {self.criticality.batch_size}")
        need(self.criticality.steps >= 1, f"clat.criticality.steps must be >= 1, got {self.criticality.steps}")
        need(self.criticality.chunk_size is None or self.criticality.chunk_size >= 1,
             f"clat.criticality.chunk_size must be >= 1 (or null), got {self.criticality.chunk_size}")


def reselection_chunk(batch_size: int) -> int:
    """The default criticality chunk of a run: a quarter of its training batch. A chunk's attack runs the whole
    model (a full-model input-gradient graph, like PGD-AT's attack), so at the full batch a re-selection peaked
    1.3x above a CLAT step of ResNet-18 (benchmarks/memory.py); a quarter keeps it below CLAT's step unless the
    critical layer is among the very first. The selection costs ~0.1% of an epoch, so the smaller chunks'
    speed hardly matters."""
    return max(1, batch_size // 4)


def resolve_chunk(chunk_size: int | None, batch_size: int) -> int:
    """The criticality chunk of a (re)selection: ``clat.criticality.chunk_size`` when set, else :func:`reselection_chunk`
    of the run's ``data.batch_size``."""
    return chunk_size or reselection_chunk(batch_size)


@register_method("clat", label="CLAT", section=ClatConfig, needs_layers=True)
class CLAT(Method):
    @classmethod
    def from_config(cls, ctx) -> "CLAT":
        cfg = ctx.cfg
        base = None
        if cfg.clat.ce_on == "base":
            base = ctx.baseline(cfg.clat.base or cfg.pretrain.method, "clat.ce_on=base (clat.base, or else pretrain.method)")
        return cls(cfg.attack.threat(), cfg.clat, ctx.layers, k=resolve_k(cfg.clat.k, ctx.layers, ctx.zoo_model, ctx.default_k), base=base,
                   chunk_size=resolve_chunk(cfg.clat.criticality.chunk_size, cfg.data.batch_size))

    def __init__(self, attack: ThreatModel, cfg: ClatConfig, layers: list[Layer], *, k: int, base: Method | None = None,
                 chunk_size: int | None = None) -> None:
        """``k`` and ``chunk_size`` as resolved (:func:`resolve_k`, :func:`resolve_chunk`; ``from_config`` does it): a
        ``cfg.k`` that says otherwise is an error. ``chunk_size`` None: a selection measures its whole batch at once."""
        super().__init__(attack)
        if cfg.k is not None and cfg.k != k:
            raise ConfigError(f"clat.k={cfg.k} but CLAT was built with k={k}; build it with k=resolve_k(cfg.k, layers)")
        self.cfg = cfg
        self.chunk_size = chunk_size  # of a (re)selection's criticality
        self.layers = layers
        self.k = k
        self.eligible = eligible_mask(layers, include_classifier=cfg.criticality.include_classifier, exclude=cfg.exclude)
        n_ok = sum(self.eligible)
        if cfg.layers:
            self.pinned = resolve_layers(layers, cfg.layers)
        else:
            self.pinned = []
            if not 1 <= self.k <= n_ok:
                raise ConfigError(f"clat.k={self.k} but the model has {n_ok} layers eligible for selection (of {len(layers)}); choose k "
                                  f"between 1 and {n_ok}")
        if cfg.ce_on == "base" and base is None:
            raise ConfigError("clat.ce_on=base needs a base method (clat.base or a pretrain method)")
        self.base = base
        self.lam = cfg.lam
        self.selected: list[Layer] = []
        self.history: list[dict] = []
        self._extractor: FeatureExtractor | None = None
        self._scale: dict[str, float] | None = None

    # -- selection ---------------------------------------------------------------------
    def _due(self, stage_epoch: int) -> bool:
        if not self.selected:
            return True
        return self.cfg.dynamic and not self.pinned and stage_epoch % self.cfg.reselect_every == 0

    def setup(self, model: nn.Module) -> None:
        warn_unassigned(model, self.layers, "clat")
        if self.base is not None:
            self.base.setup(model)

    def on_epoch_start(self, model: nn.Module, ctx: EpochContext) -> dict:
        base_events = self.base.on_epoch_start(model, ctx) if self.base is not None else {}  # (AWP's warm-up); CLAT freezes after it
        if not self._due(ctx.stage_epoch):
            self._freeze(model)
            return base_events
        cc = self.cfg.criticality
        x, y = ctx.sample_batch(cc.batch_size)
        result = compute_criticality(
            model, self.layers, x, y, self.threat.replace(steps=cc.steps),
            **cc.measure_kwargs(), exclude=self.cfg.exclude, chunk_size=self.chunk_size,
        )
        if self.pinned:
            chosen = self.pinned
        else:  # by the selector (clat.selection); criticality is measured and logged whichever it is
            scoring = LayerScoring(model, self.layers, x, y, self.threat.replace(steps=cc.steps), self.eligible, self.k, ctx.generator,
                                   cc, self.cfg.exclude, self.chunk_size, measured={measured_key(cc): result})
            chosen = choose(self.cfg.selection, scoring)
        # data-parallel runs: every rank trains rank 0's choice (GPU kernels need not be bit-identical across ranks)
        chosen = resolve_layers(self.layers, broadcast_object([l.name for l in chosen]))
        self._set_selection(chosen)
        trainable = self._freeze(model)
        if self.cfg.lam_mode == "auto":
            self.lam = broadcast_object(self._auto_lambda(model, x, y))
        event = SelectionEvent(epoch=ctx.epoch + 1, epoch_in_stage=ctx.stage_epoch + 1, selected=[l.name for l in chosen],
                               selected_index=[l.index for l in chosen], trainable_params=trainable, criticality=result.criticality,
                               weakness=result.weakness, denominator=cc.denominator, lam=self.lam)
        self.history.append(event.to_dict())
        return {**base_events, "selection": event}

    def _set_selection(self, chosen: list[Layer]) -> None:
        self.selected = sorted(chosen, key=lambda l: l.index)
        self._extractor = None

    def _freeze(self, model: nn.Module) -> int:
        return freeze_all_but(model, self.selected)

    def trainable_bns(self) -> list[str] | None:
        if self.cfg.freeze_bn_stats:
            return []
        return [l.bn_name for l in self.selected if l.bn_name is not None]

    def extractor(self, model: nn.Module) -> FeatureExtractor:
        if self._extractor is None or self._extractor.model is not model:
            self._extractor = FeatureExtractor(model, self.selected, point=self.cfg.criticality.point)
            s = self.cfg.distance_scaling
            self._scale = None if s == "none" else {l.name: (1.0 / l.numel if s == "n" else l.numel ** -0.5) for l in self.selected}
        return self._extractor

    # -- the objective ------------------------------------------------------------------
    def attack_features(self, model: nn.Module, x: torch.Tensor, target: dict[str, torch.Tensor],
                        shard: Shard | None = None) -> torch.Tensor:
        """δ* of Eq. 8: maximise the feature distance to the (fixed) clean features."""
        ext = self.extractor(model)
        threat = self.threat.replace(steps=1, alpha=1.25 * self.threat.eps) if self.cfg.inner == "fast" else self.threat
        hooked = [n for l in self.selected for n in (l.name, l.output_module(self.cfg.criticality.point))]
        recompute = recomputed_blocks(model, hooked) if self.cfg.recompute else contextlib.nullcontext()
        with frozen_bn_statistics(model), recompute:
            return perturb(lambda xa: feature_distance(ext(xa).outputs, target, self._scale), x, threat, shard=shard)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, shard: Shard | None = None) -> tuple[torch.Tensor,
                                                                                                            dict[str, torch.Tensor]]:
        if not self.selected:
            raise RuntimeError("CLAT.loss called before any layer was selected (on_epoch_start)")
        ext = self.extractor(model)
        ce_on = self.cfg.ce_on
        metrics: dict[str, torch.Tensor] = {}
        if ce_on == "base":  # first: a base method may perturb the weights for its loss (AWP); CLAT's term then sees them too
            assert self.base is not None
            ce, base_metrics = self.base.loss(model, x, y, shard)
            metrics.update({f"base_{k}": v for k, v in base_metrics.items()})
            if self.lam == 0:  # the base loss alone on the selected layers (the layer sweep's PGD-AT objective): no feature term
                metrics.update({"loss": ce.detach(), "ce": ce.detach()})
                return ce, metrics
            with frozen_bn_statistics(model):  # the base loss's forward updated the statistics already
                clean = ext(x, stop_early=True)
            x_adv = self.attack_features(model, x, {n: f.detach() for n, f in clean.outputs.items()}, shard)
        else:
            # The attack runs before any forward pass that builds a graph for the update, so no graph is alive
            # during its steps (the step's peak memory is the attack's alone). Its target, the clean features,
            # comes from a forward pass without a graph; the clean pass of the update then computes the same
            # features again (same weights, same batch statistics): gradients are identical to building the graph
            # first (tests/test_methods.py), at the cost of a forward pass up to the deepest selected layer.
            with torch.no_grad(), frozen_bn_statistics(model):
                target = ext(x, stop_early=True).outputs
            x_adv = self.attack_features(model, x, target, shard)
            del target
            clean = ext(x, stop_early=ce_on != "clean")  # the clean pass updates the BN statistics (once per step)
        with frozen_bn_statistics(model):  # running statistics follow the clean data only (one update per step)
            adv = ext(x_adv, stop_early=ce_on != "adv")
        if ce_on == "adv":
            ce = self.ce(adv.logits, y)
            metrics["adv_acc"] = accuracy(adv.logits, y)
        elif ce_on == "clean":
            ce = self.ce(clean.logits, y)
            metrics["acc"] = accuracy(clean.logits, y)
        lc = feature_distance(adv.outputs, clean.outputs, self._scale).mean()
        loss = ce + self.lam * lc
        metrics.update({"loss": loss.detach(), "ce": ce.detach(), "feature_dist": lc.detach()})
        return loss, metrics

    def after_backward(self, model: nn.Module) -> None:
        if self.base is not None:
            self.base.after_backward(model)

    def on_stage_end(self, model: nn.Module, validate) -> dict:
        return self.base.on_stage_end(model, validate) if self.base is not None else {}

    def plain_model(self, model: nn.Module) -> nn.Module:
        return self.base.plain_model(model) if self.base is not None else model

    def _auto_lambda(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        """λ = ρ · CE / L_C on the selection batch, so both terms start at a known ratio."""
        was = model.training
        model.eval()
        try:
            ext = self.extractor(model)
            with torch.no_grad():
                clean = ext(x, stop_early=False)
            x_adv = self.attack_features(model, x, clean.outputs)
            with torch.no_grad():
                adv = ext(x_adv, stop_early=True)
                lc = feature_distance(adv.outputs, clean.outputs, self._scale).mean().item()
                ce = self.ce(clean.logits, y).item()
        finally:
            model.train(was)
        return self.cfg.rho * ce / lc if lc > 0 else self.cfg.lam

    # -- resume -------------------------------------------------------------------------
    def log_fields(self) -> dict:
        return {"selected": [l.name for l in self.selected]}

    def state_dict(self) -> dict:
        return {"selected": [l.name for l in self.selected], "history": self.history, "lam": self.lam}

    def load_state_dict(self, state: dict) -> None:
        self._set_selection(resolve_layers(self.layers, state.get("selected", [])))
        self.history = list(state.get("history", []))
        self.lam = float(state.get("lam", self.cfg.lam))
