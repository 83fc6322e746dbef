"""The evaluation protocol: what to run on a model, and what to flag (the policy behind ``clat eval``).

:class:`EvalProtocol` says which attacks judge a model (clat's PGD with restarts, APGD-CE or the full
AutoAttack from the independent ``pyautoattack``, an ε sweep, the gradient-masking sanity checks), all
under one :class:`~clat.attacks.threat.ThreatModel`; :func:`run_protocol` runs them and returns an
:class:`EvalResult`: the headline accuracies, every number behind them (JSON-able) and the flags a reader
must see: AutoAttack's own reliability warnings, perturbations outside ε,
AutoAttack far below PGD (PGD overestimating robustness), and the sanity checks' findings.
``clat eval`` and the study (``scripts/study.py``) both evaluate through it.

Example::

    r = run_protocol(model, x_test, y_test, EvalProtocol(ThreatModel(steps=20), restarts=5, autoattack="standard"))
    r.pgd_acc, r.autoattack_acc, r.flags    # flags: [] when nothing looks wrong
    print("\\n".join(r.summary_lines())); json.dumps(r.to_dict())   # every number behind it
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from clat.attacks.threat import DEFAULT_THREAT, ThreatModel, eps_str
from clat.base.errors import ConfigError
from clat.eval.accuracy import eps_sweep, evaluate_outcomes
from clat.eval.autoattack import AutoAttackVersion, autoattack_outcomes
from clat.eval.records import EvalRecord
from clat.eval.sanity import BANNER, autoattack_check, sanity_checks


@dataclass(frozen=True)
class EvalProtocol:
    """What judges a model. ``threat``: the white-box PGD (its steps) and the ball of every attack;
    ``restarts``: PGD runs, an example counts as robust only if no run fools it; ``pgd=False``: clean
    accuracy only from clat's own code; ``apgd_ce`` / ``autoattack`` (a version: standard, plus, rand):
    pyautoattack's attacks; ``eps_sweep``: PGD accuracy at these radii; ``sanity``: the gradient-masking
    checks (:func:`clat.eval.sanity.sanity_checks`, with ``square_queries`` of the black-box Square attack).
    ``seed`` fixes every random start (results do not depend on ``batch_size``). ``autoattack_stages``: run only
    the first stages of ``autoattack`` (e.g. ``("apgd-ce", "apgd-t")``, a cheaper screening whose verdict equals the
    full version's after those stages, image for image)."""

    threat: ThreatModel = DEFAULT_THREAT
    restarts: int = 1
    pgd: bool = True
    apgd_ce: bool = False
    autoattack: AutoAttackVersion | None = None
    eps_sweep: Sequence[float] = field(default_factory=tuple)
    sanity: bool = False
    square_queries: int = 1000
    seed: int = 0
    batch_size: int = 256
    autoattack_stages: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.threat, ThreatModel):
            raise ConfigError(f"EvalProtocol.threat must be a clat.attacks.threat.ThreatModel, got {type(self.threat).__name__}")
        if self.restarts < 1:
            raise ConfigError(f"restarts must be >= 1, got {self.restarts}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.square_queries < 0:
            raise ConfigError(f"square_queries must be >= 0, got {self.square_queries}")
        if self.autoattack not in (None, "standard", "plus", "rand"):
            raise ConfigError(f"unknown AutoAttack version {self.autoattack!r}; use standard, plus or rand (apgd_ce=True for APGD-CE alone)")
        if self.autoattack_stages is not None and self.autoattack is None:
            raise ConfigError("autoattack_stages selects stages of AutoAttack: set autoattack (e.g. 'standard') too")

    def to_dict(self) -> dict:
        return {"threat": self.threat.to_dict(), "restarts": self.restarts, "pgd": self.pgd, "apgd_ce": self.apgd_ce,
                "autoattack": self.autoattack, "eps_sweep": list(self.eps_sweep), "sanity": self.sanity,
                "square_queries": self.square_queries, "seed": self.seed,
                **({"autoattack_stages": list(self.autoattack_stages)} if self.autoattack_stages is not None else {})}


def _autoattack_flags(res: dict, key: str, aa: dict, protocol: EvalProtocol) -> list[str]:
    name = "APGD-CE" if key == "apgd_ce" else f"AutoAttack ({aa['version']})"
    flags = [f"{name} (pyautoattack's own check): {w}" for w in aa["warnings"]]
    if not aa["within_eps"]:
        flags.append(f"{name} returned perturbations of size {aa['max_perturbation']:.4g} > ε = {protocol.threat.eps:.4g}")
    if protocol.pgd:
        chk = autoattack_check(res["pgd_acc"], aa["robust_acc"], res["n"], name=name)
        res.setdefault("checks", []).append(chk)
        if chk["flag"]:
            flags.append(f"{chk['title']}: {chk['message']}")
    return flags


@dataclass(frozen=True)
class EvalResult:
    """What :func:`run_protocol` found: the headline accuracies (None for what did not run), the flags a
    reader must see, and ``details``, every number behind them (JSON-able: :func:`clat.eval.accuracy.evaluate`'s
    dict with ``apgd_ce``, ``autoattack``, ``eps_sweep``, ``sanity``, ``checks``, ``flags``, ``protocol``)."""

    n: int
    clean_acc: float
    pgd_acc: float | None
    apgd_ce_acc: float | None
    autoattack_acc: float | None
    flags: list[str]
    details: dict
    outcomes: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)  # per image, True = correct
    index_offset: int = 0

    def record(self, indices: Sequence[int] | None = None, **meta) -> EvalRecord:
        """The per-image outcomes as an :class:`~clat.eval.records.EvalRecord`: ``clean``, ``pgd/run<r>``, ``pgd``, ``apgd-ce``,
        ``aa/<stage>`` and ``aa``, as the protocol ran them. ``indices``: the images' positions in their split (default:
        consecutive from ``index_offset``); ``meta``: what the caller knows (data, split, model, checkpoint)."""
        idx = np.arange(self.index_offset, self.index_offset + self.n) if indices is None else np.asarray(indices)
        return EvalRecord(idx, {k: v.numpy() for k, v in self.outcomes.items()}, {"protocol": self.details["protocol"], **meta})

    @property
    def robust_acc(self) -> float | None:
        """The lowest robust accuracy any attack of the protocol measured."""
        accs = [a for a in (self.pgd_acc, self.apgd_ce_acc, self.autoattack_acc) if a is not None]
        return min(accs) if accs else None

    def to_dict(self) -> dict:
        return self.details

    def summary_lines(self) -> list[str]:
        return summary_lines(self.details)


def run_protocol(model: nn.Module, x: torch.Tensor, y: torch.Tensor, protocol: EvalProtocol = EvalProtocol(), *,
                 surrogates: Mapping[str, nn.Module] | None = None, device: torch.device | str | None = None,
                 progress: bool = False, index_offset: int = 0) -> EvalResult:
    """Run ``protocol`` on images ``x`` (uint8 or float in [0, 1]) and labels ``y``.

    ``flags`` holds every line a reader must see (sanity-check flags start with ``possible gradient
    masking``). ``surrogates``: models whose PGD examples are transferred in the sanity checks.
    ``index_offset``: the position of ``x[0]`` in a larger set (seeded starts follow the example, so an
    evaluation in parts equals the whole)."""
    t = protocol.threat
    res, outcomes = evaluate_outcomes(model, x, y, t, restarts=protocol.restarts, attack=protocol.pgd, batch_size=protocol.batch_size,
                                      seed=protocol.seed, progress=progress, desc=f"PGD-{t.steps}", index_offset=index_offset)
    flags: list[str] = []
    for key, version, on in (("apgd_ce", "apgd-ce", protocol.apgd_ce), ("autoattack", protocol.autoattack, protocol.autoattack is not None)):
        if on:
            aa, per_image = autoattack_outcomes(model, x, y, t, version=version, batch_size=protocol.batch_size, seed=protocol.seed,
                                                device=device, progress=progress,
                                                attacks=protocol.autoattack_stages if key == "autoattack" else None)
            res[key] = aa
            flags += _autoattack_flags(res, key, aa, protocol)
            if key == "apgd_ce":
                outcomes["apgd-ce"] = per_image["aa"]
            else:
                outcomes.update({k: v for k, v in per_image.items() if k != "aa/clean"})
    if protocol.eps_sweep:
        res["eps_sweep"] = eps_sweep(model, x, y, protocol.eps_sweep, t, seed=protocol.seed, batch_size=protocol.batch_size, progress=progress)
    if protocol.sanity:
        san = sanity_checks(model, x, y, t, surrogates=surrogates, square_queries=protocol.square_queries, seed=protocol.seed,
                            batch_size=protocol.batch_size, progress=progress)
        san["flags"] = [f"{BANNER}: {f}" for f in san["flags"]]
        res["sanity"] = san
        flags = san["flags"] + flags
    res["flags"] = flags
    res["protocol"] = protocol.to_dict()
    return EvalResult(n=res["n"], clean_acc=res["clean_acc"], pgd_acc=res.get("pgd_acc"),
                      apgd_ce_acc=res["apgd_ce"]["robust_acc"] if "apgd_ce" in res else None,
                      autoattack_acc=res["autoattack"]["robust_acc"] if "autoattack" in res else None, flags=flags, details=res,
                      outcomes=outcomes, index_offset=index_offset)


def summary_lines(res: dict) -> list[str]:
    """What a person reads of a :func:`run_protocol` result's ``details``, one line per attack (flags apart)."""

    p = res["protocol"]
    lines = [f"clean {100 * res['clean_acc']:.2f}%"]
    if p["pgd"]:
        lines.append(f"PGD-{p['threat']['steps']} {100 * res['pgd_acc']:.2f}% (worst case of {p['restarts']} run(s); lowest run "
                     f"{100 * res['pgd_acc_lowest_run']:.2f}%, {res['time_s']:.0f} s)")
    for key in ("apgd_ce", "autoattack"):
        if key in res:
            aa = res[key]
            name = "APGD-CE" if key == "apgd_ce" else f"AutoAttack ({aa['version']})"
            lines.append(f"{name} {100 * aa['robust_acc']:.2f}% ({aa['time_s']:.0f} s)")
    if "eps_sweep" in res:
        norm = p["threat"]["norm"]
        lines.append("ε sweep: " + "  ".join(f"{eps_str(q['eps'], norm) if q['eps'] else 0}: {100 * q['acc']:.1f}%" for q in res["eps_sweep"]["points"]))
    if "sanity" in res:
        san = res["sanity"]
        lines.append(f"sanity checks: {len(san['checks']) - len(san['flags'])}/{len(san['checks'])} passed ({san['time_s']:.0f} s)")
    return lines


__all__ = ["EvalProtocol", "EvalResult", "run_protocol", "summary_lines"]
