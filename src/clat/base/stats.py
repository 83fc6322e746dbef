"""Intervals for comparing trained models: over seeds, and over seeds and test images together.

A robustness comparison between two training methods has two sources of noise: the training run (seed: data
order, augmentation, attack starts) and the finite test set (which images happened to be drawn). A Student-t
interval over seeds (:func:`t_interval`) sees only the first, because every seed is scored on the same images.
:func:`seeds_images_bootstrap` sees both: per-image outcomes of each seed's models go in, and seeds and images are
resampled independently (the two-way, or "pigeonhole", bootstrap for crossed factors: Owen 2007, *The pigeonhole
bootstrap*; it is mildly conservative). :func:`holm` adjusts a family of p-values (Holm 1979).

Example::

    a = np.stack([load_record(f"a_s{s}.records.npz")["aa"] for s in range(4)])  # [seeds, images]
    b = np.stack([load_record(f"b_s{s}.records.npz")["aa"] for s in range(4)])
    r = seeds_images_bootstrap(a, b)     # r.estimate, r.ci, r.p
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from clat.base.errors import ConfigError

# two-sided 95% quantiles of Student's t by degrees of freedom (1-30); above 30 the normal 1.96 is within 4%
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    return _T975[df - 1] if df <= len(_T975) else 1.96


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) (Numerical Recipes' betai, continued fraction)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1 - x) / b


def _betacf(a: float, b: float, x: float) -> float:
    tiny = 1e-300

    def step(num: float, c: float, d: float) -> tuple[float, float]:
        d = 1.0 + num * d
        c = 1.0 + num / c
        return (c if abs(c) > tiny else tiny), 1.0 / (d if abs(d) > tiny else tiny)

    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        c, d = step(m * (b - m) * x / ((a - 1 + 2 * m) * (a + 2 * m)), c, d)
        h *= d * c
        c, d = step(-(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 1 + 2 * m)), c, d)
        h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def t_test_p(t: float, df: int) -> float:
    """Two-sided p-value of a t statistic with ``df`` degrees of freedom."""
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


@dataclass(frozen=True)
class Interval:
    """An estimate, its 95% interval, a two-sided p-value for "no difference", and what the interval is over."""

    estimate: float
    ci: tuple[float, float]
    p: float
    over: str  # "seeds" or "seeds x images"
    n_seeds: int
    n_images: int | None = None

    @property
    def has_interval(self) -> bool:
        """False for an estimate from a single value (:func:`t_interval` of one seed): no interval, no p."""
        return not any(math.isnan(v) for v in self.ci)

    @property
    def excludes_zero(self) -> bool:
        return self.has_interval and (self.ci[0] > 0 or self.ci[1] < 0)

    def to_dict(self) -> dict:
        """JSON-ready: no interval (one value) is ``"ci": null`` and ``"p": null``."""
        return {"estimate": self.estimate, "ci": list(self.ci) if self.has_interval else None,
                "p": None if math.isnan(self.p) else self.p, "over": self.over, "n_seeds": self.n_seeds, "n_images": self.n_images}


def t_interval(diffs: Sequence[float]) -> Interval:
    """Mean of per-seed differences with its Student-t 95% interval and the paired t-test's two-sided p. One
    difference has no interval and no p (``ci`` is ``(nan, nan)``, ``has_interval`` is False, ``to_dict`` writes
    ``"ci": null``): callers say so rather than print a point as an interval. With identical differences (zero
    spread) the interval is the point, which reads as no evidence of spread from so few seeds, not as infinite
    precision: callers should show the seed count."""
    d = [float(v) for v in diffs]
    if not d:
        raise ConfigError("no differences to summarize")
    m = statistics.fmean(d)
    if len(d) < 2:
        return Interval(m, (math.nan, math.nan), math.nan, "seeds", len(d))
    sd = statistics.stdev(d)
    if sd <= 1e-12 * max(abs(m), 1e-12):  # equal differences up to rounding
        sd = 0.0
    h = t975(len(d) - 1) * sd / math.sqrt(len(d))
    if sd == 0:
        p = 1.0 if m == 0 else 0.0
    else:
        p = t_test_p(m / (sd / math.sqrt(len(d))), len(d) - 1)
    return Interval(m, (m - h, m + h), p, "seeds", len(d))


def seeds_images_bootstrap(a: np.ndarray, b: np.ndarray, *, n_boot: int = 10_000, seed: int = 0) -> Interval:
    """``mean(a) − mean(b)`` over seeds and images, with a two-way bootstrap interval.

    ``a``: outcomes ``[seeds, images]`` (bool or 0/1) of one method, each row a seed; ``b``: the other method's,
    paired row by row (the same seeds, the same images), or one row ``[images]`` for a single model (a checkpoint
    with no seeds: image noise is then most of the uncertainty). Each bootstrap replicate draws seeds and images
    independently with replacement. The interval is the 2.5-97.5 percentile range; ``p`` is two-sided from the
    normal approximation with the bootstrap standard error (it can be smaller than 1/n_boot)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2:
        raise ConfigError(f"a must be [seeds, images], got shape {a.shape}")
    if b.ndim == 1:
        b = np.broadcast_to(b, a.shape)
    if b.shape != a.shape:
        raise ConfigError(f"a {a.shape} and b {b.shape} must have the same seeds and images")
    d = a - b  # [S, N]
    s_n, i_n = d.shape
    est = float(d.mean())
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    dt = d.T.copy()  # [N, S]
    for lo in range(0, n_boot, 500):  # in blocks of 500 replicates
        b_n = min(500, n_boot - lo)
        img = rng.integers(0, i_n, size=(b_n, i_n))  # each replicate's images, as counts per image (a [b, N] matrix)
        counts = np.bincount((img + np.arange(b_n)[:, None] * i_n).ravel(), minlength=b_n * i_n).reshape(b_n, i_n)
        per_seed = (counts @ dt) / i_n  # [b, S]: each seed's mean over the replicate's images
        pick = rng.integers(0, s_n, size=(b_n, s_n))  # the replicate's seeds
        boot[lo : lo + b_n] = np.take_along_axis(per_seed, pick, axis=1).mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    se = float(boot.std(ddof=1))
    p = 1.0 if se == 0 and est == 0 else (0.0 if se == 0 else math.erfc(abs(est) / se / math.sqrt(2)))
    return Interval(est, (float(lo), float(hi)), p, "seeds x images", s_n, i_n)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): controls the family-wise error rate."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adj = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adj[i] = running
    return adj


__all__ = ["Interval", "holm", "seeds_images_bootstrap", "t975", "t_interval", "t_test_p"]
