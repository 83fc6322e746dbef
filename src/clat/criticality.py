"""Layer weakness (Eq. 5), criticality index (Eq. 6), and critical-layer selection.

One untargeted PGD perturbation δ of the model's cross-entropy (model in eval
mode) and two forward passes (clean, attacked) give every layer's weakness

    W_i = mean_x ‖F_i(x+δ) − F_i(x)‖₂ / N_i

and its criticality ``C_i = W_i / W_in(i)``, where by default ``W_in(i)`` is the
weakness of the tensor layer i actually reads (SPEC: identical to the paper's
``W_{i−1}`` on a chain, and right on a residual network, where the layer before
i in execution order is often a parallel branch). ``denominator="previous"``
gives the paper's formula read literally. A layer that reads the model input
has ``C_i = W_i`` (the paper's ``C_1 = W_1``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import nn

from clat.attacks import pgd
from clat.errors import ConfigError
from clat.layers import FeatureExtractor, FeaturePoint, Layer

Denominator = Literal["input", "previous"]
Scaling = Literal["n", "sqrt_n", "none"]


def _scale(n: int, scaling: Scaling) -> float:
    return {"n": 1.0 / n, "sqrt_n": 1.0 / math.sqrt(n), "none": 1.0}[scaling]


@dataclass
class CriticalityResult:
    """Per-layer weakness and criticality; everything a table, plot or selection needs."""

    layers: list[Layer]
    weakness: list[float]
    input_weakness: list[float]
    criticality: list[float]
    eligible: list[bool]  # False for layers excluded from selection (the classifier by default)
    settings: dict = field(default_factory=dict)

    @property
    def ranking(self) -> list[int]:
        """Eligible layer indices, most critical first."""
        idx = [i for i, ok in enumerate(self.eligible) if ok]
        return sorted(idx, key=lambda i: -self.criticality[i])

    def top_k(self, k: int) -> list[Layer]:
        n = sum(self.eligible)
        if not 1 <= k <= n:
            raise ConfigError(f"k={k} critical layers requested but {n} layers are eligible for selection; choose k between 1 and {n}")
        return [self.layers[i] for i in self.ranking[:k]]

    def to_dict(self, k: int | None = None) -> dict:
        rank = {i: r + 1 for r, i in enumerate(self.ranking)}
        selected = {layer.index for layer in self.top_k(k)} if k else set()
        return {
            "settings": self.settings,
            "layers": [
                {
                    "index": layer.index,
                    "name": layer.name,
                    "bn": layer.bn_name,
                    "kind": layer.kind,
                    "out_shape": list(layer.out_shape),
                    "params": layer.num_params,
                    "weakness": self.weakness[i],
                    "input_weakness": self.input_weakness[i],
                    "criticality": self.criticality[i],
                    "rank": rank.get(i),
                    "eligible": self.eligible[i],
                    "selected": layer.index in selected,
                }
                for i, layer in enumerate(self.layers)
            ],
        }


def eligible_mask(layers: Sequence[Layer], *, include_classifier: bool = False, exclude: Sequence[str | int] = ()) -> list[bool]:
    """Which layers may be selected. The final classifier (the last layer, when it is
    a Linear) is excluded by default: its 1/N_i-normalised index is incomparable
    (SPEC: C ≈ 312 vs ≤ 3 for conv layers on a CIFAR ResNet-18)."""
    from clat.layers import resolve_layers

    banned = {layer.index for layer in resolve_layers(layers, exclude)}
    if not include_classifier and layers[-1].kind == "Linear":
        banned.add(layers[-1].index)
    return [layer.index not in banned for layer in layers]


@torch.no_grad()
def weakness_from_features(
    layers: Sequence[Layer],
    clean: dict[str, torch.Tensor],
    adv: dict[str, torch.Tensor],
    scaling: Scaling = "n",
) -> list[float]:
    out = []
    for layer in layers:
        d = (adv[layer.name] - clean[layer.name]).flatten(1).float().norm(dim=1).mean().item()
        out.append(d * _scale(layer.numel, scaling))
    return out


def compute_criticality(
    model: nn.Module,
    layers: Sequence[Layer],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 10,
    denominator: Denominator = "input",
    scaling: Scaling = "n",
    point: FeaturePoint = "post_bn",
    include_classifier: bool = False,
    exclude: Sequence[str | int] = (),
    x_adv: torch.Tensor | None = None,
) -> CriticalityResult:
    """Criticality of every layer from one PGD perturbation of the batch ``(x, y)``.

    The model runs in eval mode (its mode is restored). ``x_adv`` may be given to
    reuse a perturbation (then no attack is run).
    """
    if denominator not in ("input", "previous"):
        raise ConfigError(f"unknown criticality denominator {denominator!r}; use 'input' or 'previous'")
    if scaling not in ("n", "sqrt_n", "none"):
        raise ConfigError(f"unknown criticality scaling {scaling!r}; use 'n', 'sqrt_n' or 'none'")
    was_training = model.training
    model.eval()
    try:
        if x_adv is None:
            x_adv = pgd(model, x, y, eps=eps, alpha=alpha, steps=steps)
        extractor = FeatureExtractor(model, layers, point=point, capture_inputs=denominator == "input")
        with torch.no_grad():
            f_clean = extractor(x, stop_early=False)
            f_adv = extractor(x_adv, stop_early=False)
    finally:
        model.train(was_training)
    w = weakness_from_features(layers, f_clean.outputs, f_adv.outputs, scaling)
    if denominator == "input":
        w_in = []
        for layer in layers:
            n_in = 1
            for d in layer.in_shape:
                n_in *= d
            dist = (f_adv.inputs[layer.name] - f_clean.inputs[layer.name]).flatten(1).float().norm(dim=1).mean().item()
            w_in.append(dist * _scale(n_in, scaling))
    else:
        w_in = [float("nan")] + w[:-1]
    c = []
    for i, layer in enumerate(layers):
        if i == 0 or (denominator == "input" and layer.reads_model_input):
            c.append(w[i])
        else:
            c.append(w[i] / w_in[i] if w_in[i] > 0 else float("inf"))
    settings = {"eps": eps, "alpha": alpha, "steps": steps, "denominator": denominator, "scaling": scaling, "point": point, "batch_size": int(x.shape[0])}
    return CriticalityResult(list(layers), w, w_in, c, eligible_mask(layers, include_classifier=include_classifier, exclude=exclude), settings)


def select_random(layers: Sequence[Layer], eligible: Sequence[bool], k: int, generator: torch.Generator) -> list[Layer]:
    """k eligible layers drawn uniformly without replacement (the "random layers" ablation)."""
    pool = [layer for layer, ok in zip(layers, eligible) if ok]
    if not 1 <= k <= len(pool):
        raise ConfigError(f"k={k} random layers requested but {len(pool)} layers are eligible; choose k between 1 and {len(pool)}")
    perm = torch.randperm(len(pool), generator=generator)[:k].tolist()
    return sorted((pool[i] for i in perm), key=lambda layer: layer.index)
