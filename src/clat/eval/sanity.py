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
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from clat.attacks.threat import DEFAULT_THREAT, ThreatModel
from clat.base.errors import ConfigError
from clat.eval.accuracy import batches, check_inputs, eps_sweep, pgd_correct, pgd_examples, seeded_start
from clat.eval.autoattack import square_correct
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
    the query-based black-box attack (the costliest check).
    """
    check_inputs(x, y, batch_size)
    if restarts < 1:
        raise ConfigError(f"sanity checks need restarts >= 1, got {restarts}")
    eps, alpha, steps, norm = threat.eps, threat.alpha, threat.steps, threat.norm
    large = large_eps if large_eps is not None else (0.5 if norm == "linf" else 16.0)
    if large <= eps:
        raise ConfigError(f"the large ε of the sanity checks ({large}) must exceed ε ({eps})")
    t0 = time.time()
    n = len(x)
    slack = max(1, math.floor(tol * n))  # examples
    common = dict(batch_size=batch_size, progress=progress)
    checks = []

    def acc(c: torch.Tensor) -> float:
        return c.sum().item() / n

    # white-box PGD: base, 5x steps (same starts), more restarts (other starts)
    clean, base = pgd_correct(model, x, y, threat, seed=seed, desc="sanity: PGD", **common)
    _, longer = pgd_correct(model, x, y, threat.replace(steps=5 * steps), seed=seed, desc="sanity: 5x steps", **common)
    _, multi = pgd_correct(model, x, y, threat, restarts=restarts, seed=seed, stream="restarts", desc="sanity: restarts", **common)
    base_ok, long_ok, multi_ok = base[0], longer[0], multi.all(0)
    white = base_ok & long_ok & multi_ok  # the strongest white-box result, per example
    d = long_ok.sum().item() - base_ok.sum().item()
    checks.append(_result(
        "more_steps", "more PGD steps never raise accuracy", d > slack,
        f"PGD-{5 * steps} {100 * acc(long_ok):.1f}% vs PGD-{steps} {100 * acc(base_ok):.1f}%"
        + (": more steps raised the accuracy" if d > slack else ""),
        steps=steps, acc=acc(base_ok), steps_more=5 * steps, acc_more=acc(long_ok),
    ))
    d = multi_ok.sum().item() - base_ok.sum().item()
    checks.append(_result(
        "more_restarts", "more restarts never raise accuracy", d > slack,
        f"worst case of {restarts} restarts {100 * acc(multi_ok):.1f}% vs 1 run {100 * acc(base_ok):.1f}%"
        + (": more restarts raised the accuracy" if d > slack else ""),
        restarts=restarts, acc_one_run=acc(base_ok), acc_restarts=acc(multi_ok), acc_per_restart=[acc(r) for r in multi],
    ))

    # black-box: a query-based attack on the model's outputs, and transfer from surrogates
    bb: dict[str, float] = {}
    if square_queries > 0:
        sq = square_correct(model, x, y, threat, n_queries=square_queries, batch_size=batch_size, seed=seed, progress=progress)
        bb[f"Square, {square_queries} queries"] = acc(sq)
    tgt_dev = next(model.parameters()).device
    for name, sur in (surrogates or {}).items():
        sur_dev = next(sur.parameters()).device
        ok = torch.zeros(n, dtype=torch.bool)
        with eval_mode(model, sur):
            for b, (xb, yb) in enumerate(batches(x, y, batch_size, sur_dev)):
                sl = slice(b * batch_size, b * batch_size + len(xb))
                x_adv = pgd_examples(sur, xb, yb, range(sl.start, sl.stop), threat, seed=seed, stream="transfer")
                with torch.no_grad():
                    ok[sl] = clean[sl] & (model(x_adv.to(tgt_dev)).argmax(1) == yb.to(tgt_dev)).cpu()
        bb[f"transfer from {name}"] = acc(ok)
    if bb:
        worst_name = min(bb, key=lambda k: bb[k])
        below = round((acc(white) - bb[worst_name]) * n)
        flag = below > slack
        msg = (f"black-box {100 * bb[worst_name]:.1f}% ({worst_name}) vs white-box {100 * acc(white):.1f}%"
               + (": a black-box attack beat the white-box attacks" if flag else ""))
        checks.append(_result("black_box", "black-box accuracy >= white-box accuracy", flag, msg, white_box_acc=acc(white), black_box_acc=bb))

    # accuracy over ε: falls, and reaches ~0 at a huge ε
    eps_list = sorted({eps / 4, eps / 2, eps, 2 * eps, 4 * eps, large})
    sweep = eps_sweep(model, x, y, eps_list, threat, seed=seed, **common)
    accs = [p["acc"] for p in sweep["points"]]
    rises = [(sweep["points"][i]["eps"], sweep["points"][i + 1]["eps"]) for i in range(len(accs) - 1) if round((accs[i + 1] - accs[i]) * n) > slack]
    checks.append(_result(
        "eps_monotone", "accuracy falls as ε grows", bool(rises),
        "accuracy " + " → ".join(f"{100 * a:.1f}%" for a in accs) + f" for ε = {', '.join(_eps(e, norm) for e in eps_list)}"
        + (f": it rises from ε = {_eps(rises[0][0], norm)} to ε = {_eps(rises[0][1], norm)}" if rises else ""),
        eps=eps_list, acc=accs,
    ))
    a_large = accs[-1]
    flag = round(a_large * n) > math.floor(tol * n)
    checks.append(_result(
        "large_eps", f"accuracy ~0 at ε = {_eps(large, norm)}", flag,
        f"PGD-{steps} accuracy at ε = {_eps(large, norm)}: {100 * a_large:.1f}%" + (" (an unbounded attack should reach ~0)" if flag else ""),
        eps=large, acc=a_large, threshold=tol,
    ))

    # random noise of the same ε (PGD's own random start) vs PGD
    dev = next(model.parameters()).device
    noise_ok = torch.zeros(n, dtype=torch.bool)
    with eval_mode(model), torch.no_grad():
        for b, (xb, yb) in enumerate(batches(x, y, batch_size, dev)):
            sl = slice(b * batch_size, b * batch_size + len(xb))
            delta = seeded_start(xb.shape[1:], range(sl.start, sl.stop), threat, seed=seed, stream=(0, 0)).to(xb)
            x_noise = (xb + delta).clamp(0, 1)
            noise_ok[sl] = clean[sl] & (model(x_noise).argmax(1) == yb).cpu()
    flag = noise_ok.sum().item() > 0 and base_ok.sum().item() >= noise_ok.sum().item()
    checks.append(_result(
        "noise", "PGD hurts more than random noise of the same ε", flag,
        f"uniform noise {100 * acc(noise_ok):.1f}% vs PGD-{steps} {100 * acc(base_ok):.1f}% (clean {100 * acc(clean):.1f}%)"
        + (": PGD is no stronger than random noise" if flag else ""),
        clean_acc=acc(clean), noise_acc=acc(noise_ok), pgd_acc=acc(base_ok),
    ))

    # input gradients
    g = input_gradients(model, x, y, batch_size)
    zero = int((g == 0).sum().item())
    checks.append(_result(
        "gradient", "input gradients are non-zero", zero > 0,
        f"∂CE/∂x is exactly zero for {zero}/{n} examples (median ℓ1 norm {g.median().item():.3g})",
        zero_gradients=zero, median_l1=g.median().item(), min_l1=g.min().item(),
    ))

    flags = [f"{c['title']}: {c['message']}" for c in checks if c["flag"]]
    return {
        "n": n,
        "settings": {"eps": eps, "alpha": alpha, "steps": steps, "restarts": restarts, "norm": norm, "large_eps": large,
                     "square_queries": square_queries, "surrogates": list(surrogates or {}), "tol": tol, "slack_examples": slack, "seed": seed},
        "clean_acc": acc(clean),
        "white_box_acc": acc(white),
        "checks": checks,
        "flags": flags,
        "gradient_masking_suspected": bool(flags),
        "time_s": time.time() - t0,
    }


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


__all__ = ["BANNER", "autoattack_check", "input_gradients", "sanity_checks"]
