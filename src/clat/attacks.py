"""The one attack implementation of clat: projected gradient ascent on any objective.

The threat model (projection, step, random start) is kept apart from the attack
loop (Madry et al.'s ``robustness`` library does the same), and the loop works on
any per-sample objective: cross-entropy (PGD, Madry et al. 2018), CLAT's
feature distance (Eq. 8), TRADES' KL. FGSM with random start (Wong et al. 2020,
"Fast is better than free") is the same loop with one step of size 1.25 ε.

Inputs live in [0, 1] pixel space; every iterate satisfies ``‖δ‖ ≤ ε`` and
``x + δ ∈ [0, 1]``.

Example::

    x_adv = pgd(model, x, y, eps=8 / 255, alpha=2 / 255, steps=10)  # (the defaults: ThreatModel())
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from clat.errors import ConfigError

Norm = Literal["linf", "l2"]
Objective = Callable[[torch.Tensor], torch.Tensor]  # x_adv -> per-sample loss [B] to maximise


# Where this process's batch sits inside the global batch of a data-parallel step:
# (offset, global size). Set by the training loop with :func:`batch_shard`.
_SHARD: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("clat_batch_shard", default=None)


@contextmanager
def batch_shard(offset: int, global_size: int) -> Iterator[None]:
    """Random draws of the attacks inside this block are made for the whole global
    batch and sliced at ``offset``: with every rank's RNG in the same state, the
    ranks of a data-parallel step together draw exactly what one process with the
    global batch draws (see :mod:`clat.distributed`)."""
    token = _SHARD.set((int(offset), int(global_size)))
    try:
        yield
    finally:
        _SHARD.reset(token)


def _draw(x: torch.Tensor, fill: Callable[[torch.Tensor], torch.Tensor], per_sample: bool = False) -> torch.Tensor:
    """A random tensor shaped like ``x`` (or ``[B, 1, ...]`` with ``per_sample``), honouring
    :func:`batch_shard`. Values are drawn in contiguous order whatever ``x``'s memory
    format, so a channels-last run draws the same numbers as a contiguous one."""
    shape = (x.shape[0], *([1] * (x.dim() - 1))) if per_sample else tuple(x.shape)
    shard = _SHARD.get()
    if shard is None:
        out = fill(torch.empty(shape, dtype=x.dtype, device=x.device))
    else:
        offset, total = shard
        out = fill(torch.empty((total, *shape[1:]), dtype=x.dtype, device=x.device)).narrow(0, offset, x.shape[0])
    if not per_sample and x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


def uniform_like(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return _draw(x, lambda t: t.uniform_(low, high))


def randn_like(x: torch.Tensor) -> torch.Tensor:
    """``torch.randn_like`` that honours :func:`batch_shard` (TRADES' start uses it)."""
    return _draw(x, lambda t: t.normal_())


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


@dataclass(frozen=True)
class ThreatModel:
    """The attacker a model is trained and judged against: an ℓ∞ or ℓ2 ball of radius ``eps`` around the
    image (in [0, 1] pixel space), searched by ``steps`` PGD steps of size ``alpha`` from a random start.
    ``ThreatModel()`` is clat's default everywhere (the paper's ℓ∞ 8/255, step 2/255, PGD-10); a run's
    ``attack:`` section (:class:`clat.config.AttackConfig`) starts from it."""

    norm: Norm = "linf"
    eps: float = 8 / 255
    alpha: float = 2 / 255
    steps: int = 10
    random_start: bool = True


DEFAULT_THREAT = ThreatModel()


@dataclass(frozen=True)
class Threat:
    """An ℓ∞ or ℓ2 ball of radius ``eps`` intersected with the [0, 1] box."""

    eps: float
    norm: Norm = "linf"

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise ConfigError(f"attack eps must be > 0, got {self.eps}; for 8/255 write eps: 0.0313725")
        if self.norm not in ("linf", "l2"):
            raise ConfigError(f"unknown attack norm {self.norm!r}; use 'linf' or 'l2'")

    def project(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            delta = delta * (self.eps / _per_sample_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        return (x + delta).clamp(0.0, 1.0) - x

    def random_init(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "linf":
            delta = uniform_like(x, -self.eps, self.eps)
        else:  # uniform direction, radius uniform in [0, eps]
            delta = randn_like(x)
            r = _draw(x, lambda t: t.uniform_(), per_sample=True)
            delta = delta / _per_sample_norm(delta).clamp_min(1e-12) * r * self.eps
        return self.project(x, delta)

    def step(self, grad: torch.Tensor, alpha: float) -> torch.Tensor:
        if self.norm == "linf":
            return alpha * grad.sign()
        return alpha * grad / _per_sample_norm(grad).clamp_min(1e-12)


def perturb(
    objective: Objective,
    x: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: Norm = "linf",
    random_start: bool = True,
    delta0: torch.Tensor | None = None,
) -> torch.Tensor:
    """Maximise ``objective(x + δ).sum()`` over the threat model by projected
    gradient ascent; returns ``x + δ`` (detached).

    The per-sample losses are summed, so each sample's step is independent of the
    batch size. Only the gradient with respect to the input is computed: no
    parameter gradients are accumulated and the caller's graph is untouched.
    ``delta0`` replaces the random start (it is projected first): TRADES' small
    Gaussian start, or per-example seeded starts that make results independent of
    batching.
    """
    if steps < 1:
        raise ConfigError(f"attack steps must be >= 1, got {steps}")
    if not alpha > 0:
        raise ConfigError(f"attack step size alpha must be > 0, got {alpha}")
    threat = Threat(eps, norm)
    x = x.detach()
    if delta0 is not None:
        delta = threat.project(x, delta0.detach().to(x))
    else:
        delta = threat.random_init(x) if random_start else torch.zeros_like(x)
    scale = _attack_loss_scale(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            loss = objective(x + delta)
            (grad,) = torch.autograd.grad(loss.sum() * scale if scale != 1.0 else loss.sum(), delta)
        delta = threat.project(x, delta.detach() + threat.step(grad, alpha))
    return (x + delta).detach()


def ce_objective(model: nn.Module, y: torch.Tensor) -> Objective:
    return lambda x_adv: F.cross_entropy(model(x_adv), y, reduction="none")


def feature_distance(adv: Mapping[str, torch.Tensor], clean: Mapping[str, torch.Tensor], scale: Mapping[str, float] | None = None) -> torch.Tensor:
    """Per-sample ``Σ_i s_i ‖F_i(x+δ) − F_i(x)‖₂`` (Eq. 8); ``s_i`` = 1 unless ``scale`` says otherwise."""
    total = None
    for name, a in adv.items():
        d = (a - clean[name]).flatten(1).norm(dim=1)
        if scale is not None:
            d = d * scale[name]
        total = d if total is None else total + d
    assert total is not None
    return total


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float = DEFAULT_THREAT.eps,
    alpha: float = DEFAULT_THREAT.alpha,
    steps: int = DEFAULT_THREAT.steps,
    norm: Norm = DEFAULT_THREAT.norm,
    random_start: bool = DEFAULT_THREAT.random_start,
) -> torch.Tensor:
    """Untargeted PGD on the cross-entropy (Madry et al. 2018). Returns ``x_adv``."""
    return perturb(ce_objective(model, y), x, eps=eps, alpha=alpha, steps=steps, norm=norm, random_start=random_start)


def fgsm_rs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = DEFAULT_THREAT.eps, alpha: float | None = None) -> torch.Tensor:
    """FGSM with a random start and step 1.25 ε (Wong et al. 2020)."""
    return perturb(ce_objective(model, y), x, eps=eps, alpha=alpha if alpha is not None else 1.25 * eps, steps=1)
