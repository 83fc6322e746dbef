"""Estimators of "which layer should be fine-tuned", to be scored against the layer oracle (:mod:`clat.sweep`).

Every estimator maps a checkpoint and a batch of training images to one score per layer;
a higher score says "fine-tuning this layer alone helps robustness more". They are:

- ``paper``: CLAT's criticality index, Eq. 6 along the dataflow (``denominator=upstream``, 1/N_i);
- ``input``: the same with the post-activation input as the denominator (clat 0.1's default);
- ``previous``: the denominator read literally in execution order;
- ``sqrt_n`` and ``no_scaling``: Eq. 6 with 1/√N_i or no normalization of the weakness;
- ``exact_eq5``: Eq. 5 without the paper's shortcut: each layer's weakness under the attack that
  maximizes *that* layer's feature change (one feature attack per layer, and per source tensor),
  instead of one attack on the output for all layers; then Eq. 6;
- ``fisher``: the empirical Fisher information of the layer's parameters on adversarial inputs,
  per parameter (mean squared gradient of the cross-entropy over chunks of the batch);
- ``rift``: minus RiFT's module robust criticality (RiFT fine-tunes the layer of *lowest* MRC);
- ``params``: the layer's parameter count; ``depth``: its index (CLAT's ``deepest``, :mod:`clat.criticality.selectors`);
- ``random``: scored by its expectation over random rankings (:func:`score`).

:func:`score` compares a set of scores with the oracle's per-layer gains: Spearman's ρ with a
bootstrap 95% interval (layers resampled, and each layer's seeds resampled), and the regret of
the top-1 and top-2 choices (mean oracle gain of the best k layers minus that of the k chosen).
"""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clat.attacks.threat import ThreatModel, perturb
from clat.criticality.index import CriticalityConfig, distance, scale
from clat.criticality.selectors import LayerScoring, label, register_selector, scores
from clat.layers.capture import FeatureExtractor
from clat.layers.discovery import Layer, Tap
from clat.layers.freezing import eval_mode

# The estimators the layer oracle scores by default, in the order it computes them (estimators.json's keys).
ESTIMATORS = ("paper", "input", "previous", "sqrt_n", "no_scaling", "exact_eq5", "fisher", "rift", "params", "depth")


def _variant(name: str, label: str, denominator: str, scaling: str) -> None:
    register_selector(name, label=label)(lambda s: s.criticality(denominator=denominator, scaling=scaling).criticality)


_variant("paper", "Eq. 6, upstream (the paper's formula; clat's default)", "upstream", "n")
_variant("input", "Eq. 6, post-activation input (clat 0.1's default)", "input", "n")
_variant("previous", "Eq. 6, previous layer in execution order", "previous", "n")
_variant("sqrt_n", "Eq. 6 with 1/√N", "upstream", "sqrt_n")
_variant("no_scaling", "Eq. 6 without 1/N", "upstream", "none")


@register_selector("exact_eq5", label="Eq. 5 exactly (an attack per layer), then Eq. 6")
def _exact_eq5(s: LayerScoring) -> list[float]:
    return exact_criticality(s.model, s.layers, s.x, s.threat)


@register_selector("fisher", label="adversarial Fisher information per parameter")
def _fisher(s: LayerScoring) -> list[float]:
    return fisher(s.model, s.layers, s.x_adv(), s.y)


@register_selector("rift", label="−RiFT module robust criticality")
def _rift(s: LayerScoring) -> list[float]:
    with eval_mode(s.model):
        mrc = module_robust_criticality(s.model, list(s.layers), s.x_adv(), s.y, eps=s.options.get("rift_eps", 0.1),
                                        steps=s.options.get("rift_steps", 5))
    return [-m for m in mrc]


@register_selector("params", label="parameter count")
def _params(s: LayerScoring) -> list[float]:
    return [float(layer.num_params) for layer in s.layers]


LABELS = {name: label(name) for name in (*ESTIMATORS, "random")}


def compute_estimates(model: nn.Module, layers: Sequence[Layer], x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, *,
                      names: Sequence[str] = ESTIMATORS, rift_eps: float = 0.1, rift_steps: int = 5,
                      seed: int = 0) -> dict[str, list[float]]:
    """Scores of every layer (same order as ``layers``) for each selector in ``names`` (:mod:`clat.criticality.selectors`:
    registered names, aliases or ``package.module:function``), computed in that order and keyed by those names; every
    attack runs under ``threat``. The PGD examples (``x_adv``) are made first, shared by the selectors that use them."""
    torch.manual_seed(seed)
    scoring = LayerScoring(model, layers, x, y, threat, [True] * len(layers), generator=torch.Generator().manual_seed(seed),
                           settings=CriticalityConfig(include_classifier=True), options={"rift_eps": rift_eps, "rift_steps": rift_steps})
    scoring.x_adv()
    return {name: scores(name, scoring) for name in names}


def _max_weakness(model: nn.Module, x: torch.Tensor, extract: Callable[[torch.Tensor], torch.Tensor], numel: int,
                  threat: ThreatModel) -> float:
    """W of Eq. 5 for one feature: the mean distance under the PGD attack that maximizes it (1/N scaling)."""
    with torch.no_grad():
        clean = extract(x).detach()
    x_adv = perturb(lambda xa: (extract(xa) - clean).flatten(1).norm(dim=1), x, threat)
    with torch.no_grad():
        return distance(extract(x_adv), clean) * scale(numel, "n")


def exact_criticality(model: nn.Module, layers: Sequence[Layer], x: torch.Tensor, threat: ThreatModel) -> list[float]:
    """Eq. 6 on Eq. 5's weakness taken literally: every feature (each layer's, and each tensor that
    feeds a layer) under its own maximizing attack."""
    with eval_mode(model):
        w_layer: dict[int, float] = {}
        for layer in layers:
            ext = FeatureExtractor(model, [layer])
            w_layer[layer.index] = _max_weakness(model, x, lambda xa, e=ext, n=layer.name: e(xa).outputs[n], layer.numel, threat)
        w_tap: dict[Tap, float] = {}
        for layer in layers:
            src = layer.source()
            if src.kind == "tensor" and src.tap is not None and src.tap not in w_tap:
                ext = FeatureExtractor(model, [layer], taps=[src.tap])
                w_tap[src.tap] = _max_weakness(model, x, lambda xa, e=ext, t=src.tap: e(xa, stop_early=False).taps[t], src.tap.numel,
                                               threat)
    out = []
    for layer in layers:
        src = layer.source()
        w = w_layer[layer.index]
        if src.kind == "layer" and src.layer in w_layer:
            out.append(w / w_layer[src.layer])
        elif src.kind == "tensor" and src.tap in w_tap:
            out.append(w / w_tap[src.tap])
        else:
            out.append(w)
    return out


def fisher(model: nn.Module, layers: Sequence[Layer], x_adv: torch.Tensor, y: torch.Tensor, chunk: int = 10) -> list[float]:
    """Mean over chunks of ``chunk`` images of the squared gradient of the cross-entropy, per parameter of each layer."""
    modules = dict(model.named_modules())
    params = [[p for m in l.module_names for p in modules[m].parameters(recurse=False)] for l in layers]
    sums = [0.0] * len(layers)
    n = 0
    with eval_mode(model):
        for i in range(0, len(x_adv), chunk):
            loss = F.cross_entropy(model(x_adv[i:i + chunk]), y[i:i + chunk])
            flat = [p for ps in params for p in ps]
            grads = torch.autograd.grad(loss, flat, allow_unused=True)
            k = 0
            for j, ps in enumerate(params):
                for p in ps:
                    g = grads[k]
                    k += 1
                    if g is not None:
                        sums[j] += float(g.pow(2).sum())
            n += 1
    return [s / n / max(1, sum(p.numel() for p in ps)) for s, ps in zip(sums, params)]


# -- scoring ------------------------------------------------------------------------------------
def _ranks(v: Sequence[float]) -> list[float]:
    order = sorted(range(len(v)), key=lambda i: v[i])
    r = [0.0] * len(v)
    i = 0
    while i < len(order):  # average ranks for ties
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    ra, rb = _ranks(a), _ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = math.sqrt(sum((x - ma) ** 2 for x in ra)), math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va > 0 and vb > 0 else 0.0


def regret(est: Sequence[float], gain: Sequence[float], k: int) -> float:
    """Mean gain of the k truly best layers minus the mean gain of the estimator's top k."""
    best = sorted(gain, reverse=True)[:k]
    chosen = sorted(range(len(est)), key=lambda i: -est[i])[:k]
    return sum(best) / k - sum(gain[i] for i in chosen) / k


def score(est: Sequence[float] | None, gains: Sequence[Sequence[float]], *, n_boot: int = 2000, seed: int = 0) -> dict:
    """``est``: one score per layer (None: a random estimator, scored by its expectation);
    ``gains``: per layer, the oracle's gain for each seed. Returns ρ, its bootstrap 95% interval,
    and the top-1/top-2 regrets (percentage points when the gains are fractions)."""
    rng = random.Random(seed)
    mean = [sum(g) / len(g) for g in gains]
    n = len(mean)
    if est is None:  # random: the average over random rankings
        draws = [rng.sample(range(n), n) for _ in range(n_boot)]
        rhos = sorted(spearman(d, mean) for d in draws)
        return {"rho": sum(rhos) / len(rhos), "rho_ci": [rhos[int(0.025 * n_boot)], rhos[int(0.975 * n_boot) - 1]],
                "regret_top1": sum(regret(d, mean, 1) for d in draws) / n_boot,
                "regret_top2": sum(regret(d, mean, 2) for d in draws) / n_boot}
    boots = []
    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        g = [sum(rng.choice(gains[i]) for _ in gains[i]) / len(gains[i]) for i in idx]
        boots.append(spearman([est[i] for i in idx], g))
    boots.sort()
    return {"rho": spearman(est, mean), "rho_ci": [boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1]],
            "regret_top1": regret(est, mean, 1), "regret_top2": regret(est, mean, 2)}


@torch.no_grad()
def _adv_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return F.cross_entropy(model(x), y).item()


def module_robust_criticality(model: nn.Module, layers: list[Layer], x_adv: torch.Tensor, y: torch.Tensor, *, eps: float,
                              steps: int) -> list[float]:
    """MRC of every layer (module-weight perturbation bounded by ``eps·‖w‖``); model in eval mode."""
    modules = dict(model.named_modules())
    base = _adv_loss(model, x_adv, y)
    out = []
    for layer in layers:
        w = modules[layer.name].weight
        w0 = w.detach().clone()
        radius = eps * w0.norm()
        delta = torch.zeros_like(w0)
        for _ in range(steps):
            with torch.no_grad():
                w.copy_(w0 + delta)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), w)
            delta = delta + (radius / steps) * g / (g.norm() + 1e-20)
            delta = delta * (radius / delta.norm().clamp_min(radius))  # project onto the ball
        with torch.no_grad():
            w.copy_(w0 + delta)
        out.append(_adv_loss(model, x_adv, y) - base)
        with torch.no_grad():
            w.copy_(w0)
    return out
