"""Sanity checks against gradient masking (Athalye, Carlini & Wagner 2018; Carlini et al.
2019, "On evaluating adversarial robustness"), reported as flags with their numbers.

A white-box attack that follows a useless gradient reports robustness that is not
there. Each check below compares the attack with something that cannot be fooled
by a masked gradient, and raises a flag when the comparison goes the wrong way:

``more_steps`` / ``more_restarts``
    A stronger PGD (5× the steps; several restarts) never gives a higher accuracy.
``black_box``
    Attacks that never use the model's gradient are weaker than white-box PGD:
    (a) the Square attack (Andriushchenko et al. 2020, from the independent
    ``pyautoattack`` package), a query-based random search on the margin of the
    model's outputs: it needs no second model, and flat, saturated or shattered
    gradients do not stop it (AutoAttack raises the same flag when its Square
    beats its gradient attacks); (b) PGD examples transferred from surrogate
    models, when given (another training run, an independently trained model,
    or the model with its non-differentiable parts removed, as BPDA would).
``eps_monotone`` / ``large_eps``
    Accuracy falls as ε grows and is about 0 at a huge ε (0.5 in ℓ∞: every image
    can be turned into a flat grey one).
``noise``
    PGD hurts more than uniform random noise of the same ε. The noise is PGD's own
    random start, so a PGD whose steps achieve nothing scores exactly the noise.
``gradient``
    The input gradient of the loss is non-zero for every example (softmax
    saturation and non-differentiable layers give exact zeros).

The white-box reference for ``black_box`` is the strongest of the PGD runs made
here (the lowest accuracy). Comparisons allow a slack of ``tol`` (at least one
example) so that a single borderline example does not raise a flag; the noise and
gradient checks have no slack.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from clat.attacks.threat import DEFAULT_THREAT, ThreatModel
from clat.base.errors import ConfigError
from clat.eval.accuracy import batches, check_inputs
from clat.eval.attacks import ATTACKS, PGD, AttackContext, AttackResult, EpsSweep, EvalAttack, Noise, Square, Transfer
from clat.layers.freezing import eval_mode

BANNER = "possible gradient masking"


def _eps(e: float, norm: str) -> str:
    k = e * 255
    return f"{round(k)}/255" if norm == "linf" and abs(k - round(k)) < 1e-6 and k >= 1 else f"{e:.4g}"


def _result(name: str, title: str, flag: bool, message: str, **values) -> dict:
    return {"name": name, "title": title, "flag": bool(flag), "message": message, "values": values}


def input_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Per-example ℓ1 norm of ∂CE/∂x at the clean inputs (0 where the output does not
    depend differentiably on the input at all)."""
    device = next(model.parameters()).device
    norms = []
    with eval_mode(model):
        for xb, yb in batches(x, y, batch_size, device):
            xb = xb.clone().requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy(model(xb), yb, reduction="sum")
                if not loss.requires_grad:
                    norms.append(torch.zeros(len(xb)))
                    continue
                (g,) = torch.autograd.grad(loss, xb, allow_unused=True)
            norms.append(torch.zeros(len(xb)) if g is None else g.flatten(1).abs().sum(1).cpu())
    return torch.cat(norms)


def sanity_checks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel = DEFAULT_THREAT,
    *,
    restarts: int = 3,
    large_eps: float | None = None,
    surrogates: Mapping[str, nn.Module] | None = None,
    square_queries: int = 1000,
    tol: float = 0.01,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Run every check on ``(x, y)`` under ``threat``; returns ``{"checks": [...], "flags": [...], ...}``.

    Each check has ``name``, ``title``, ``flag`` (True: possible gradient masking),
    ``message`` and ``values`` (the numbers behind it). ``square_queries=0`` skips
    the query-based black-box attack (the costliest check). Every attack is an evaluation attack object
    (:mod:`clat.eval.attacks`: :class:`~clat.eval.attacks.PGD`, :class:`~clat.eval.attacks.Square`,
    :class:`~clat.eval.attacks.Transfer`, :class:`~clat.eval.attacks.EpsSweep`, :class:`~clat.eval.attacks.Noise`).
    """
    check_inputs(x, y, batch_size)
    if restarts < 1:
        raise ConfigError(f"sanity checks need restarts >= 1, got {restarts}")
    large = large_eps if large_eps is not None else (0.5 if threat.norm == "linf" else 16.0)
    if large <= threat.eps:
        raise ConfigError(f"the large ε of the sanity checks ({large}) must exceed ε ({threat.eps})")
    t0 = time.time()
    n = len(x)
    slack = max(1, math.floor(tol * n))  # examples
    ctx = AttackContext(seed=seed, batch_size=batch_size, progress=progress)
    wb = _white_box(model, x, y, threat, restarts, ctx)
    checks = _pgd_checks(wb, threat.steps, restarts, slack)
    bb = {a.title: _acc(a.run(model, x, y, threat, ctx.replace(stream="transfer")).outcomes[a.key])
          for a in _black_box_attacks(square_queries, surrogates)}
    if bb:
        checks.append(_black_box_check(bb, _acc(wb["white"]), slack, n))
    checks += _eps_checks(model, x, y, threat, large, slack, tol, ctx)
    noise = Noise().run(model, x, y, threat, ctx).outcomes["noise"]
    checks.append(_noise_check(noise, wb["clean"], wb["base"], threat.steps))
    checks.append(_gradient_check(input_gradients(model, x, y, batch_size)))
    flags = [f"{c['title']}: {c['message']}" for c in checks if c["flag"]]
    return {
        "n": n,
        "settings": {"eps": threat.eps, "alpha": threat.alpha, "steps": threat.steps, "restarts": restarts, "norm": threat.norm,
                     "large_eps": large, "square_queries": square_queries, "surrogates": list(surrogates or {}), "tol": tol,
                     "slack_examples": slack, "seed": seed},
        "clean_acc": _acc(wb["clean"]),
        "white_box_acc": _acc(wb["white"]),
        "checks": checks,
        "flags": flags,
        "gradient_masking_suspected": bool(flags),
        "time_s": time.time() - t0,
    }


def _acc(c: torch.Tensor) -> float:
    return c.sum().item() / len(c)


def _white_box(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, restarts: int, ctx: AttackContext) -> dict:
    """PGD (per image, True = correct): one run (``base``), 5× the steps from the same starts (``longer``), ``restarts``
    runs from other starts (``runs``, worst case ``multi``) and the strongest of them all (``white``)."""
    base = PGD().run(model, x, y, threat, ctx.replace(desc="sanity: PGD")).outcomes
    longer = PGD().run(model, x, y, threat.replace(steps=5 * threat.steps), ctx.replace(desc="sanity: 5x steps")).outcomes
    multi = PGD(restarts).run(model, x, y, threat, ctx.replace(desc="sanity: restarts", stream="restarts")).outcomes
    out = {"clean": base["clean"], "base": base["pgd"], "longer": longer["pgd"], "multi": multi["pgd"],
           "runs": [multi[f"pgd/run{r}"] for r in range(restarts)]}
    out["white"] = out["base"] & out["longer"] & out["multi"]
    return out


def _pgd_checks(wb: dict, steps: int, restarts: int, slack: int) -> list[dict]:
    """``more_steps`` and ``more_restarts``: a stronger PGD never gives a higher accuracy."""
    base, longer, multi = wb["base"], wb["longer"], wb["multi"]
    d = longer.sum().item() - base.sum().item()
    more_steps = _result(
        "more_steps", "more PGD steps never raise accuracy", d > slack,
        f"PGD-{5 * steps} {100 * _acc(longer):.1f}% vs PGD-{steps} {100 * _acc(base):.1f}%"
        + (": more steps raised the accuracy" if d > slack else ""),
        steps=steps, acc=_acc(base), steps_more=5 * steps, acc_more=_acc(longer),
    )
    d = multi.sum().item() - base.sum().item()
    more_restarts = _result(
        "more_restarts", "more restarts never raise accuracy", d > slack,
        f"worst case of {restarts} restarts {100 * _acc(multi):.1f}% vs 1 run {100 * _acc(base):.1f}%"
        + (": more restarts raised the accuracy" if d > slack else ""),
        restarts=restarts, acc_one_run=_acc(base), acc_restarts=_acc(multi), acc_per_restart=[_acc(r) for r in wb["runs"]],
    )
    return [more_steps, more_restarts]


def _black_box_attacks(square_queries: int, surrogates: Mapping[str, nn.Module] | None) -> list[EvalAttack]:
    """A query-based attack on the model's outputs, and PGD transferred from each surrogate."""
    return ([Square(square_queries)] if square_queries > 0 else []) + [Transfer(s, name) for name, s in (surrogates or {}).items()]


def _black_box_check(bb: dict[str, float], white: float, slack: int, n: int) -> dict:
    """``black_box``: attacks that never use the model's gradient are weaker than white-box PGD."""
    worst_name = min(bb, key=lambda k: bb[k])
    flag = round((white - bb[worst_name]) * n) > slack
    msg = (f"black-box {100 * bb[worst_name]:.1f}% ({worst_name}) vs white-box {100 * white:.1f}%"
           + (": a black-box attack beat the white-box attacks" if flag else ""))
    return _result("black_box", "black-box accuracy >= white-box accuracy", flag, msg, white_box_acc=white, black_box_acc=bb)


def _eps_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, large: float, slack: int, tol: float,
                ctx: AttackContext) -> list[dict]:
    """``eps_monotone`` and ``large_eps``: accuracy falls as ε grows, and reaches ~0 at a huge ε."""
    n, norm, eps = len(x), threat.norm, threat.eps
    eps_list = sorted({eps / 4, eps / 2, eps, 2 * eps, 4 * eps, large})
    points = EpsSweep(tuple(eps_list)).run(model, x, y, threat, ctx).details["points"]
    accs = [p["acc"] for p in points]
    rises = [(points[i]["eps"], points[i + 1]["eps"]) for i in range(len(accs) - 1) if round((accs[i + 1] - accs[i]) * n) > slack]
    monotone = _result(
        "eps_monotone", "accuracy falls as ε grows", bool(rises),
        "accuracy " + " → ".join(f"{100 * a:.1f}%" for a in accs) + f" for ε = {', '.join(_eps(e, norm) for e in eps_list)}"
        + (f": it rises from ε = {_eps(rises[0][0], norm)} to ε = {_eps(rises[0][1], norm)}" if rises else ""),
        eps=eps_list, acc=accs,
    )
    a_large = accs[-1]
    flag = round(a_large * n) > math.floor(tol * n)
    at_large = _result(
        "large_eps", f"accuracy ~0 at ε = {_eps(large, norm)}", flag,
        f"PGD-{threat.steps} accuracy at ε = {_eps(large, norm)}: {100 * a_large:.1f}%"
        + (" (an unbounded attack should reach ~0)" if flag else ""),
        eps=large, acc=a_large, threshold=tol,
    )
    return [monotone, at_large]


def _noise_check(noise: torch.Tensor, clean: torch.Tensor, base: torch.Tensor, steps: int) -> dict:
    """``noise``: PGD hurts more than uniform noise of the same ε (PGD's own random start)."""
    flag = noise.sum().item() > 0 and base.sum().item() >= noise.sum().item()
    return _result(
        "noise", "PGD hurts more than random noise of the same ε", flag,
        f"uniform noise {100 * _acc(noise):.1f}% vs PGD-{steps} {100 * _acc(base):.1f}% (clean {100 * _acc(clean):.1f}%)"
        + (": PGD is no stronger than random noise" if flag else ""),
        clean_acc=_acc(clean), noise_acc=_acc(noise), pgd_acc=_acc(base),
    )


def _gradient_check(g: torch.Tensor) -> dict:
    """``gradient``: the input gradient of the loss is non-zero for every example."""
    zero = int((g == 0).sum().item())
    return _result(
        "gradient", "input gradients are non-zero", zero > 0,
        f"∂CE/∂x is exactly zero for {zero}/{len(g)} examples (median ℓ1 norm {g.median().item():.3g})",
        zero_gradients=zero, median_l1=g.median().item(), min_l1=g.min().item(),
    )


def autoattack_check(pgd_acc: float, aa_acc: float, n: int, *, gap: float = 0.05, rel: float = 0.25, name: str = "AutoAttack") -> dict:
    """Our PGD should not overestimate robustness much: flag when ``name`` is lower than
    PGD's accuracy by more than ``gap`` (absolute) or by more than ``rel`` of PGD's
    accuracy, and by more than one example. (On properly trained CIFAR models
    AutoAttack is typically a few points below PGD.)"""
    d = pgd_acc - aa_acc
    flag = round(d * n) > 1 and (d > gap + 1e-9 or d > rel * pgd_acc + 1e-9)
    return _result(
        "pgd_vs_autoattack", f"{name} close to PGD (within {100 * gap:.0f} points and {100 * rel:.0f}% of it)", flag,
        f"{name} {100 * aa_acc:.1f}% vs PGD {100 * pgd_acc:.1f}%" + (": PGD overestimates robustness" if flag else ""),
        pgd_acc=pgd_acc, autoattack_acc=aa_acc, gap=gap, rel=rel, n=n,
    )


@dataclass(frozen=True)
class Sanity(EvalAttack):
    """The gradient-masking checks (:func:`sanity_checks`) as an evaluation attack: its numbers go to ``eval.json``'s
    ``sanity``, its flags (``possible gradient masking: ...``) lead the evaluation's flags; the context's
    ``surrogates`` are the transfer sources. ``square_queries=0`` skips the Square attack."""

    square_queries: int = 1000
    restarts: int = 3
    large_eps: float | None = None
    tol: float = 0.01
    name: ClassVar[str] = "sanity"
    flags_first: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.square_queries < 0:
            raise ConfigError(f"square_queries must be >= 0, got {self.square_queries}")

    def run(self, model, x, y, threat, ctx):
        san = sanity_checks(model, x, y, threat, restarts=self.restarts, large_eps=self.large_eps, surrogates=ctx.surrogates,
                            square_queries=self.square_queries, tol=self.tol, seed=0 if ctx.seed is None else ctx.seed,
                            batch_size=ctx.batch_size, progress=ctx.progress)
        san["flags"] = [f"{BANNER}: {f}" for f in san["flags"]]
        return AttackResult(san, flags=san["flags"])


ATTACKS.add("sanity", Sanity, description="checks against gradient masking (PGD variants, Square, ε, noise, gradients), as flags")

__all__ = ["BANNER", "Sanity", "autoattack_check", "input_gradients", "sanity_checks"]
