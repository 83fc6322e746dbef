"""How stable the criticality ranking is over random batches (paper Table 7), and what it costs next to a training epoch."""

from __future__ import annotations

import copy
import math
import time
from typing import Sequence

import torch
from torch import nn

from clat.attacks.threat import DEFAULT_THREAT, ThreatModel
from clat.base.errors import ConfigError
from clat.criticality.estimators import spearman
from clat.criticality.index import CriticalityConfig, CriticalityResult, compute_criticality
from clat.data.loader import to_unit_float
from clat.eval.accuracy import progress_bar
from clat.eval.attacks import PGD, EvalAttack, resolve_attack
from clat.layers.discovery import find_layers
from clat.layers.freezing import eval_mode
from clat.methods import PGDAT
from clat.training.stage import Stage


def measure_pgd_at_epoch_time(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    n_train: int | None = None,
    batch_size: int = 128,
    threat: ThreatModel = DEFAULT_THREAT,
    n_batches: int = 3,
) -> float:
    """Seconds for one PGD-AT training epoch over ``n_train`` images (default ``len(x)``), extrapolated from
    ``n_batches`` timed steps of clat's PGD-AT stage (:class:`clat.training.stage.Stage`, the loop's own step) on a
    copy of the model (the model itself is not changed). ``threat``: the run's threat model."""


    m = copy.deepcopy(model)
    stage = Stage(m, PGDAT(threat), lr=0.01)
    stage.model.train()
    device = next(m.parameters()).device
    xb, yb = to_unit_float(x[:batch_size].to(device)), y[:batch_size].to(device)
    stage.step(xb, yb)  # warm-up (allocations, kernel selection)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        stage.step(xb, yb)
    per_batch = (time.perf_counter() - t0) / n_batches
    return per_batch * math.ceil((n_train or len(x)) / len(xb))


def criticality_stability(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_sizes: Sequence[int] = (10, 30, 50, 100),
    repeats: int = 5,
    reference_size: int = 500,
    k: int = 5,
    threat: ThreatModel = DEFAULT_THREAT,
    criticality: CriticalityConfig | None = None,
    merge_norms: bool = False,
    seed: int = 0,
    epoch_time_s: float | None = None,
    progress: bool = False,
    attack: EvalAttack | str | None = None,
) -> dict:
    """How stable the top-k critical layers are over random batches (paper Table 7).

    ``threat`` is the threat model of the criticality perturbation (its steps included); ``criticality`` and
    ``merge_norms`` are the run's (``cfg.clat.criticality``, ``cfg.model.merge_norms``; defaults: clat's), so the
    rankings compared are the ones training makes. ``attack``: the evaluation attack (:mod:`clat.eval.attacks`) whose
    adversarial examples the criticality is measured on; default: clat's PGD with the global RNG's random start, the
    perturbation CLAT's training measures on.

    A reference ranking comes from ``reference_size`` images; for each batch size,
    ``repeats`` random batches (drawn from the rest of ``x``, so they never overlap
    the reference) give a top-k each: its overlap with the reference top-k, whether
    it is the same set and in the same order, the Spearman correlation of the whole
    ranking of eligible layers with the reference one, and the time taken (the attack included), also as
    a fraction of ``epoch_time_s`` (one PGD-AT training epoch) when given. ``k`` is
    lowered to (eligible layers − 1) when it would cover every eligible layer.
    """
    if repeats < 1 or reference_size < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ConfigError("criticality stability needs repeats >= 1, reference_size >= 1 and batch sizes >= 1")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    ref_idx, pool = perm[:reference_size], perm[reference_size:]
    if len(pool) < max(batch_sizes):
        raise ConfigError(f"{len(x)} images leave {len(pool)} beside the {reference_size}-image reference, fewer than the batch size "
                          f"{max(batch_sizes)}")
    cc = criticality or CriticalityConfig()
    measure = _Measure(model, x, y, threat, cc, merge_norms, PGD() if attack is None else resolve_attack(attack))
    measure(ref_idx[: min(batch_sizes)])  # warm-up: the first call pays for allocations and kernel selection
    ref, ref_time = measure(ref_idx)
    n_eligible = sum(ref.eligible)
    if k >= n_eligible:  # the top-k of all eligible layers is always the same set: compare fewer
        k = max(1, n_eligible - 1)
    ref_top = [l.index for l in ref.top_k(k)]
    with progress_bar(len(batch_sizes) * repeats, "criticality stability", progress) as bar:
        rows = [_row(measure, pool, g, bs, repeats, ref, ref_top, k, epoch_time_s, bar) for bs in batch_sizes]
    layers = measure.layers
    return {
        "k": k,
        "eligible_layers": n_eligible,
        "layers": [l.name for l in layers],
        "reference": {"size": len(ref_idx), "top_k": ref_top, "names": [layers[i].name for i in ref_top], "time_s": ref_time},
        "repeats": repeats,
        "attack": {"eps": threat.eps, "alpha": threat.alpha, "steps": threat.steps, "norm": threat.norm, "denominator": cc.denominator,
                   **({"evaluation_attack": measure.attack.describe()} if attack is not None else {})},
        "criticality": {**cc.measure_kwargs(), "merge_norms": merge_norms},
        "seed": seed,
        "epoch_time_s": epoch_time_s,
        "rows": rows,
    }


class _Measure:
    """One criticality measurement of the images ``idx`` (the attack's examples, then the ranking) and its time."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, cc: CriticalityConfig,
                 merge_norms: bool, attack: EvalAttack) -> None:
        self.model, self.x, self.y, self.threat, self.cc, self.attack = model, x, y, threat, cc, attack
        self.device = next(model.parameters()).device
        self.layers = find_layers(model, to_unit_float(x[:2].to(self.device)), merge_norms=merge_norms)

    def __call__(self, idx: torch.Tensor) -> tuple[CriticalityResult, float]:
        xb, yb = to_unit_float(self.x[idx].to(self.device)), self.y[idx].to(self.device)
        t0 = time.perf_counter()
        with eval_mode(self.model):  # as compute_criticality attacks: every image's perturbation is its own
            x_adv = self.attack.examples(self.model, xb, yb, self.threat)
        res = compute_criticality(self.model, self.layers, xb, yb, self.threat, x_adv=x_adv, **self.cc.measure_kwargs())
        return res, time.perf_counter() - t0


def _row(measure: _Measure, pool: torch.Tensor, g: torch.Generator, bs: int, repeats: int, ref: CriticalityResult,
         ref_top: list[int], k: int, epoch_time_s: float | None, bar) -> dict:
    """``repeats`` random batches of ``bs`` images from ``pool``, each ranked and compared with the reference."""
    ref_scores = [ref.criticality[i] for i in ref.ranking]
    tops, times, rhos = [], [], []
    for _ in range(repeats):
        idx = pool[torch.randperm(len(pool), generator=g)[:bs]]
        res, dt = measure(idx)
        tops.append([l.index for l in res.top_k(k)])
        times.append(dt)
        rhos.append(spearman(ref_scores, [res.criticality[i] for i in ref.ranking]) if len(ref_scores) > 1 else 1.0)
        if bar is not None:
            bar.update(1)
    overlap = [len(set(t) & set(ref_top)) / k for t in tops]
    row = {
        "batch_size": bs,
        "top_k": tops,
        "overlap_mean": sum(overlap) / repeats,
        "same_set": sum(set(t) == set(ref_top) for t in tops) / repeats,
        "same_order": sum(t == ref_top for t in tops) / repeats,
        "spearman_mean": sum(rhos) / repeats,
        "top1_agrees": sum(t[0] == ref_top[0] for t in tops) / repeats,
        "time_s_mean": sum(times) / repeats,
    }
    if epoch_time_s:
        row["fraction_of_epoch"] = row["time_s_mean"] / epoch_time_s
    return row
