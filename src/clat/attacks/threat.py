"""The one attack implementation of clat: projected gradient ascent on any objective.

The threat model (:class:`ThreatModel`: the ball, its projection, the step and the random
start) is one value kept apart from the attack loop (Madry et al.'s ``robustness`` library
does the same), and the loop works on any per-sample objective: cross-entropy (PGD, Madry
et al. 2018), CLAT's feature distance (Eq. 8), TRADES' KL. FGSM with random start (Wong et
al. 2020, "Fast is better than free") is the same loop with one step of size 1.25 ε.

Inputs live in [0, 1] pixel space; every iterate satisfies ``‖δ‖ ≤ ε`` and
``x + δ ∈ [0, 1]``.

Example::

    x_adv = pgd(model, x, y)                                     # ThreatModel(): ℓ∞ 8/255, step 2/255, PGD-10
    x_adv = pgd(model, x, y, ThreatModel("l2", eps=0.5, alpha=0.125, steps=20))
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from clat.base.errors import ConfigError

Norm = Literal["linf", "l2"]
Objective = Callable[[torch.Tensor], torch.Tensor]  # x_adv -> per-sample loss [B] to maximise


@dataclass(frozen=True)
class Shard:
    """Where this process's batch sits inside the global batch of a data-parallel step: the random
    draws of an attack are made for all ``total`` images and sliced at ``offset``, so that with every
    rank's RNG in the same state the ranks together draw exactly what one process with the global
    batch draws (see :mod:`clat.distributed`). ``None`` wherever a shard is accepted: the batch is
    the whole batch."""

    offset: int
    total: int


def _draw(x: torch.Tensor, fill: Callable[[torch.Tensor], torch.Tensor], shard: Shard | None = None,
          per_sample: bool = False) -> torch.Tensor:
    """A random tensor shaped like ``x`` (or ``[B, 1, ...]`` with ``per_sample``), drawn for the
    whole global batch when ``shard`` is given. Values are drawn in contiguous order whatever
    ``x``'s memory format, so a channels-last run draws the same numbers as a contiguous one."""
    shape = (x.shape[0], *([1] * (x.dim() - 1))) if per_sample else tuple(x.shape)
    if shard is None:
        out = fill(torch.empty(shape, dtype=x.dtype, device=x.device))
    else:
        out = fill(torch.empty((shard.total, *shape[1:]), dtype=x.dtype, device=x.device)).narrow(0, shard.offset, x.shape[0])
    if not per_sample and x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


def uniform_like(x: torch.Tensor, low: float, high: float, shard: Shard | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    return _draw(x, lambda t: t.uniform_(low, high, generator=generator), shard)


def randn_like(x: torch.Tensor, shard: Shard | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """``torch.randn_like`` drawn for the global batch of ``shard`` (TRADES' and MART's starts use it)."""
    return _draw(x, lambda t: t.normal_(generator=generator), shard)


def _attack_loss_scale(x: torch.Tensor) -> float:
    """Under fp16 autocast, scale the attack objective before differentiating so that
    small input gradients do not underflow to zero (the sign / direction of the step
    is unchanged by a positive scale)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.float16:
        return 1024.0
    return 1.0


def _per_sample_norm(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


def eps_str(eps: float, norm: str = "linf") -> str:
    """A radius as people write it: ``8/255`` for an ℓ∞ multiple of 1/255, else 4 significant digits."""
    if norm == "linf" and eps > 0 and abs(eps * 255 - round(eps * 255)) < 1e-6:
        return f"{round(eps * 255)}/255"
    return f"{eps:.4g}"


@dataclass(frozen=True)
class ThreatModel:
    """The attacker a model is trained and judged against: an ℓ∞ or ℓ2 ball of radius ``eps`` around the
    image (in [0, 1] pixel space, intersected with the [0, 1] box), searched by ``steps`` PGD steps of size
    ``alpha`` from a random start. ``ThreatModel()`` is clat's default everywhere (the paper's ℓ∞ 8/255,
    step 2/255, PGD-10); a run's ``attack:`` section (:class:`clat.config.schema.AttackConfig`) gives its own
    (``cfg.attack.threat()``), and training, criticality, evaluation, the sanity checks and the reports
    all take this one value. Invalid values stop at construction with a one-line error."""

    norm: Norm = "linf"
    eps: float = 8 / 255
    alpha: float = 2 / 255
    steps: int = 10
    random_start: bool = True

    def __post_init__(self) -> None:
        if self.norm not in ("linf", "l2"):
            raise ConfigError(f"unknown attack norm {self.norm!r}; use 'linf' or 'l2'")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ConfigError(f"attack eps must be finite and > 0, got {self.eps}; for 8/255 write eps: 0.0313725")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"attack step size alpha must be finite and > 0, got {self.alpha}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"attack steps must be an integer >= 1, got {self.steps!r}")
        if self.norm == "linf" and self.eps >= 1:  # images are in [0, 1]: the ball would hold every image
            raise ConfigError(f"attack eps={self.eps:g} covers the whole [0, 1] pixel range under linf; the usual radius is 8/255")

    def text(self) -> str:
        """The threat model as the reports and messages write it: ``ℓ∞ ε=8/255, step 2/255``."""
        return f"{'ℓ∞' if self.norm == 'linf' else 'ℓ2'} ε={eps_str(self.eps, self.norm)}, step {eps_str(self.alpha, self.norm)}"

    def replace(self, **changes) -> "ThreatModel":
        """This threat model with some fields changed (``threat.replace(steps=20)``), validated again."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def project(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The closest ``δ`` with ``‖δ‖ ≤ ε`` (ℓ2: rescaled) and ``x + δ`` in [0, 1]."""
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            delta = delta * (self.eps / _per_sample_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        return (x + delta).clamp(0.0, 1.0) - x

    def sample(self, x: torch.Tensor, shard: Shard | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random ``δ`` shaped like ``x`` (not yet projected on the box): uniform in the ℓ∞ ball, or a
        uniform direction with a radius uniform in [0, ε] for ℓ2."""
        if self.norm == "linf":
            return uniform_like(x, -self.eps, self.eps, shard, generator)
        delta = randn_like(x, shard, generator)
        r = _draw(x, lambda t: t.uniform_(generator=generator), shard, per_sample=True)
        return delta / _per_sample_norm(delta).clamp_min(1e-12) * r * self.eps

    def random_init(self, x: torch.Tensor, shard: Shard | None = None) -> torch.Tensor:
        return self.project(x, self.sample(x, shard))

    def step(self, grad: torch.Tensor, alpha: float | None = None) -> torch.Tensor:
        """One ascent step of size ``alpha`` (default: the threat model's own) along ``grad``."""
        a = self.alpha if alpha is None else alpha
        if self.norm == "linf":
            return a * grad.sign()
        return a * grad / _per_sample_norm(grad).clamp_min(1e-12)


DEFAULT_THREAT = ThreatModel()


def perturb(
    objective: Objective,
    x: torch.Tensor,
    threat: ThreatModel = DEFAULT_THREAT,
    *,
    delta0: torch.Tensor | None = None,
    shard: Shard | None = None,
) -> torch.Tensor:
    """Maximise ``objective(x + δ).sum()`` over ``threat`` by projected gradient ascent
    (``threat.steps`` steps of ``threat.alpha``); returns ``x + δ`` (detached).

    The per-sample losses are summed, so each sample's step is independent of the
    batch size. Only the gradient with respect to the input is computed: no
    parameter gradients are accumulated and the caller's graph is untouched.
    ``delta0`` replaces the random start (it is projected first): TRADES' small
    Gaussian start, or per-example seeded starts that make results independent of
    batching. ``shard``: the random start is drawn for a data-parallel step's global batch.
    """
    if not isinstance(threat, ThreatModel):
        raise ConfigError(f"perturb() takes a clat.attacks.threat.ThreatModel, got {type(threat).__name__}; e.g. ThreatModel(eps=8/255)")
    x = x.detach()
    if delta0 is not None:
        delta = threat.project(x, delta0.detach().to(x))
    else:
        delta = threat.random_init(x, shard) if threat.random_start else torch.zeros_like(x)
    scale = _attack_loss_scale(x)
    for _ in range(threat.steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            loss = objective(x + delta)
            (grad,) = torch.autograd.grad(loss.sum() * scale if scale != 1.0 else loss.sum(), delta)
        delta = threat.project(x, delta.detach() + threat.step(grad))
    return (x + delta).detach()


def ce_objective(model: nn.Module, y: torch.Tensor) -> Objective:
    return lambda x_adv: F.cross_entropy(model(x_adv), y, reduction="none")


def feature_distance(adv: Mapping[str, torch.Tensor], clean: Mapping[str, torch.Tensor],
                     scale: Mapping[str, float] | None = None) -> torch.Tensor:
    """Per-sample ``Σ_i s_i ‖F_i(x+δ) − F_i(x)‖₂`` (Eq. 8); ``s_i`` = 1 unless ``scale`` says otherwise."""
    total = None
    for name, a in adv.items():
        d = (a - clean[name]).flatten(1).norm(dim=1)
        if scale is not None:
            d = d * scale[name]
        total = d if total is None else total + d
    assert total is not None
    return total


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel = DEFAULT_THREAT, *,
        shard: Shard | None = None) -> torch.Tensor:
    """Untargeted PGD on the cross-entropy (Madry et al. 2018) under ``threat``. Returns ``x_adv``."""
    return perturb(ce_objective(model, y), x, threat, shard=shard)


def fgsm_rs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel = DEFAULT_THREAT, *,
            shard: Shard | None = None) -> torch.Tensor:
    """FGSM with a random start and one step of 1.25 ε (Wong et al. 2020), in ``threat``'s ball."""
    return perturb(ce_objective(model, y), x, threat.replace(alpha=1.25 * threat.eps, steps=1, random_start=True), shard=shard)
