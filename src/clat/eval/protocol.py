"""The evaluation protocol: what to run on a model, and what to flag (the policy behind ``clat eval``).

:class:`EvalProtocol` says which attacks judge a model (evaluation attack objects, :mod:`clat.eval.attacks`: clat's
PGD with restarts, APGD-CE or the full AutoAttack from the independent ``pyautoattack``, an ε sweep, the
gradient-masking sanity checks, or your own), all under one :class:`~clat.attacks.threat.ThreatModel`;
:func:`run_protocol` runs them and returns an :class:`EvalResult`: the headline accuracies, every number behind them
(JSON-able) and the flags a reader must see: AutoAttack's own reliability warnings, perturbations outside ε,
an attack far below PGD (PGD overestimating robustness), and the sanity checks' findings.
``clat eval``, :func:`clat.benchmark` and the study (``scripts/study.py``) all evaluate through it.

Example::

    r = run_protocol(model, x_test, y_test, EvalProtocol(ThreatModel(steps=20), [PGD(restarts=5), AutoAttack("standard")]))
    r.pgd_acc, r.autoattack_acc, r.flags    # flags: [] when nothing looks wrong
    print("\\n".join(r.summary_lines())); json.dumps(r.to_dict())   # every number behind it
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from clat.attacks.threat import DEFAULT_THREAT, ThreatModel, eps_str
from clat.base.errors import ConfigError
from clat.eval.accuracy import evaluate_outcomes
from clat.eval.attacks import APGDCE, PGD, AttackContext, AttackResult, AutoAttack, EpsSweep, EvalAttack, resolve_attack
from clat.eval.records import EvalRecord
from clat.eval.sanity import Sanity, autoattack_check

_FLAGS = ("restarts", "pgd", "apgd_ce", "autoattack", "eps_sweep", "sanity", "square_queries", "autoattack_stages")
# top-level keys of eval.json that no attack's details may take
RESERVED_KEYS = ("", "n", "clean_acc", "clean_correct", "checks", "flags", "protocol", "attack", "time_s")


def flag_attacks(*, pgd: bool = True, restarts: int = 1, apgd_ce: bool = False, autoattack: str | None = None,
                 autoattack_stages: Sequence[str] | None = None, eps_sweep: Sequence[float] = (), sanity: bool = False,
                 square_queries: int = 1000) -> list[EvalAttack]:
    """The attacks that ``clat eval``'s flags (and :class:`EvalProtocol`'s former keywords) choose, in the order they
    run: ``--no-pgd``, ``--restarts``, ``--apgd-ce``, ``--autoattack[-version]``, ``--eps-sweep``, ``--sanity``,
    ``--square-queries``."""
    if square_queries < 0:
        raise ConfigError(f"square_queries must be >= 0, got {square_queries}")
    if autoattack not in (None, "standard", "plus", "rand"):
        raise ConfigError(f"unknown AutoAttack version {autoattack!r}; use standard, plus or rand (apgd_ce=True for APGD-CE alone)")
    if autoattack_stages is not None and autoattack is None:
        raise ConfigError("autoattack_stages selects stages of AutoAttack: set autoattack (e.g. 'standard') too")
    white_box = PGD(restarts)  # checks restarts even when PGD does not run, as before
    return ([white_box] if pgd else []) + ([APGDCE()] if apgd_ce else []) + \
        ([AutoAttack(autoattack, autoattack_stages)] if autoattack is not None else []) + \
        ([EpsSweep(tuple(eps_sweep))] if eps_sweep else []) + ([Sanity(square_queries)] if sanity else [])


@dataclass(frozen=True, init=False)
class EvalProtocol:
    """What judges a model: ``attacks`` (:class:`~clat.eval.attacks.EvalAttack` objects, or their names, e.g.
    ``[PGD(restarts=5), AutoAttack("standard")]`` or ``["pgd", "autoattack", "mypkg.attacks:MyAttack"]``; default:
    PGD, one run) under one ``threat`` (the white-box PGD's steps and the ball of every attack). Clean accuracy is
    always measured; PGD runs first (every other attack's accuracy is checked against it); each attack's key in
    ``eval.json`` and its per-image outcomes are its own. ``seed`` fixes every random start (results do not depend on
    ``batch_size``).

    The former keywords (``restarts``, ``pgd``, ``apgd_ce``, ``autoattack``, ``eps_sweep``, ``sanity``,
    ``square_queries``, ``autoattack_stages``) still work for one release, with a DeprecationWarning: they build the
    same attacks (:func:`flag_attacks`)."""

    threat: ThreatModel
    attacks: tuple[EvalAttack, ...]
    seed: int
    batch_size: int

    def __init__(self, threat: ThreatModel = DEFAULT_THREAT, attacks: Sequence[EvalAttack | str] | EvalAttack | str | None = None, *,
                 seed: int = 0, batch_size: int = 256, **former) -> None:
        unknown = sorted(set(former) - set(_FLAGS))
        if unknown:
            raise TypeError(f"EvalProtocol() got an unexpected keyword argument {unknown[0]!r}")
        if former:
            if attacks is not None:
                raise ConfigError(f"EvalProtocol takes attacks=[...] or the former keywords ({', '.join(former)}), not both")
            warnings.warn(f"EvalProtocol's keywords {', '.join(former)} are deprecated and go after the next release: give the "
                          "attacks, e.g. "
                          "EvalProtocol(threat, attacks=[PGD(restarts=5), AutoAttack('standard')])", DeprecationWarning, stacklevel=2)
            attacks = flag_attacks(**former)
        if not isinstance(threat, ThreatModel):
            raise ConfigError(f"EvalProtocol.threat must be a clat.attacks.threat.ThreatModel, got {type(threat).__name__}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        given = (PGD(),) if attacks is None else (attacks,) if isinstance(attacks, (str, EvalAttack)) else tuple(attacks)
        chosen = _unique([resolve_attack(a, where=" (EvalProtocol attacks)") for a in given])
        chosen.sort(key=lambda a: not isinstance(a, PGD))  # PGD first: every other attack is compared with it
        for name, value in (("threat", threat), ("attacks", tuple(chosen)), ("seed", seed), ("batch_size", batch_size)):
            object.__setattr__(self, name, value)

    def find(self, kind: type) -> EvalAttack | None:
        """The protocol's attack of class ``kind``, if any."""
        return next((a for a in self.attacks if isinstance(a, kind)), None)

    def to_dict(self) -> dict:
        """What ``eval.json`` records as ``protocol``: the flags' layout (restarts, pgd, apgd_ce, autoattack, ...), and
        ``attacks`` (each one's name, key and settings) when the flags cannot say it all."""
        pgd, aa, sweep, san = self.find(PGD), self.find(AutoAttack), self.find(EpsSweep), self.find(Sanity)
        flags = {"restarts": pgd.restarts if pgd else 1, "pgd": pgd is not None, "apgd_ce": self.find(APGDCE) is not None,
                 "autoattack": aa.version if aa else None, "eps_sweep": list(sweep.eps or ()) if sweep else [], "sanity": san is not None,
                 "square_queries": san.square_queries if san else 1000}
        out = {"threat": self.threat.to_dict(), **flags, "seed": self.seed,
               **({"autoattack_stages": list(aa.stages)} if aa and aa.stages is not None else {})}
        if flag_attacks(**flags, autoattack_stages=aa.stages if aa else None) != list(self.attacks):
            out["attacks"] = [a.describe() for a in self.attacks]
        return out


def _unique(attacks: list[EvalAttack]) -> list[EvalAttack]:
    """The attacks, exact repeats dropped; two that would write the same key of eval.json (or two PGDs) refused."""
    out: list[EvalAttack] = []
    for a in attacks:
        if a in out:
            continue
        if a.key in RESERVED_KEYS and not isinstance(a, PGD):
            raise ConfigError(f"attack {a.title!r}: its key {a.key!r} is a top-level key of eval.json; give it another name")
        same = next((b for b in out if b.key == a.key), None)
        if same is not None:
            what = "one AutoAttack version" if isinstance(a, AutoAttack) else f"one attack of key {a.key!r}" if a.key else "one PGD"
            raise ConfigError(f"an evaluation runs {what}, got {same.title} {same.settings()} and {a.title} {a.settings()}: pick one")
        out.append(a)
    return out


@dataclass(frozen=True)
class EvalResult:
    """What :func:`run_protocol` found: the headline accuracies (None for what did not run), the flags a
    reader must see, and ``details``, every number behind them (JSON-able: :func:`clat.eval.accuracy.evaluate`'s
    dict with ``apgd_ce``, ``autoattack``, ``eps_sweep``, ``sanity``, ``checks``, ``flags``, ``protocol``, and each
    other attack's details under its key). ``accuracies``: every attack's headline accuracy, by its name."""

    n: int
    clean_acc: float
    pgd_acc: float | None
    apgd_ce_acc: float | None
    autoattack_acc: float | None
    flags: list[str]
    details: dict
    outcomes: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)  # per image, True = correct
    index_offset: int = 0
    accuracies: Mapping[str, float] = field(default_factory=dict)

    def record(self, indices: Sequence[int] | None = None, **meta) -> EvalRecord:
        """The per-image outcomes as an :class:`~clat.eval.records.EvalRecord`: ``clean``, ``pgd/run<r>``, ``pgd``, ``apgd-ce``,
        ``aa/<stage>`` and ``aa``, as the protocol ran them (and any other attack's). ``indices``: the images' positions in
        their split (default: consecutive from ``index_offset``); ``meta``: what the caller knows (data, split, model, checkpoint)."""
        idx = np.arange(self.index_offset, self.index_offset + self.n) if indices is None else np.asarray(indices)
        return EvalRecord(idx, {k: v.numpy() for k, v in self.outcomes.items()}, {"protocol": self.details["protocol"], **meta})

    @property
    def robust_acc(self) -> float | None:
        """The lowest robust accuracy any attack of the protocol measured."""
        accs = list(self.accuracies.values()) or [a for a in (self.pgd_acc, self.apgd_ce_acc, self.autoattack_acc) if a is not None]
        return min(accs) if accs else None

    def to_dict(self) -> dict:
        return self.details

    def summary_lines(self) -> list[str]:
        return summary_lines(self.details)


def run_protocol(model: nn.Module, x: torch.Tensor, y: torch.Tensor, protocol: EvalProtocol = EvalProtocol(), *,
                 surrogates: Mapping[str, nn.Module] | None = None, device: torch.device | str | None = None,
                 progress: bool = False, index_offset: int = 0) -> EvalResult:
    """Run ``protocol`` on images ``x`` (uint8 or float in [0, 1]) and labels ``y``: clean accuracy and PGD first,
    then every other attack in order, each checked against PGD when both give an accuracy.

    ``flags`` holds every line a reader must see (sanity-check flags start with ``possible gradient
    masking``). ``surrogates``: models whose PGD examples are transferred in the sanity checks.
    ``index_offset``: the position of ``x[0]`` in a larger set (seeded starts follow the example, so an
    evaluation in parts equals the whole)."""
    t = protocol.threat
    ctx = AttackContext(seed=protocol.seed, batch_size=protocol.batch_size, device=device, progress=progress, index_offset=index_offset,
                        surrogates=surrogates)
    pgd = protocol.find(PGD)
    if pgd is not None:
        r = pgd.run(model, x, y, t, ctx)
        res, outcomes, accuracies = dict(r.details), dict(r.outcomes), {pgd.name: r.robust_acc}
    else:  # clean accuracy alone
        res, outcomes = evaluate_outcomes(model, x, y, t, attack=False, batch_size=protocol.batch_size, seed=protocol.seed,
                                          progress=progress, desc=f"PGD-{t.steps}", index_offset=index_offset)
        accuracies = {}
    leading: list[str] = []
    flags: list[str] = []
    for attack in protocol.attacks:
        if attack is pgd:
            continue
        r = attack.run(model, x, y, t, ctx)
        res[attack.key] = r.details
        _add_outcomes(outcomes, r, attack)
        (leading if attack.flags_first else flags).extend(r.flags + _pgd_check(res, r, attack))
        if r.robust_acc is not None:
            accuracies[attack.name or attack.key] = r.robust_acc
    res["flags"] = flags = leading + flags
    res["protocol"] = protocol.to_dict()
    return EvalResult(n=res["n"], clean_acc=res["clean_acc"], pgd_acc=res.get("pgd_acc"),
                      apgd_ce_acc=res["apgd_ce"]["robust_acc"] if "apgd_ce" in res else None,
                      autoattack_acc=res["autoattack"]["robust_acc"] if "autoattack" in res else None, flags=flags, details=res,
                      outcomes=outcomes, index_offset=index_offset, accuracies=accuracies)


def _add_outcomes(outcomes: dict[str, torch.Tensor], r: AttackResult, attack: EvalAttack) -> None:
    taken = sorted(set(r.outcomes) & set(outcomes))
    if taken:
        raise ConfigError(f"attack {attack.title!r} returned the outcome {taken[0]!r}, which another attack wrote already; "
                          f"name its outcomes after it ({attack.key}/...)")
    outcomes.update(r.outcomes)


def _pgd_check(res: dict, r: AttackResult, attack: EvalAttack) -> list[str]:
    """PGD should not overestimate robustness much: ``attack``'s accuracy far below PGD's is flagged (``checks``)."""
    if "pgd_acc" not in res or r.robust_acc is None:
        return []
    chk = autoattack_check(res["pgd_acc"], r.robust_acc, res["n"], name=attack.title)
    res.setdefault("checks", []).append(chk)
    return [f"{chk['title']}: {chk['message']}"] if chk["flag"] else []


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
    for a in p.get("attacks", []):
        own = res.get(a["key"])
        if a["key"] not in ("", "apgd_ce", "autoattack", "eps_sweep", "sanity") and isinstance(own, dict) and "robust_acc" in own:
            took = f" ({own['time_s']:.0f} s)" if isinstance(own.get("time_s"), (int, float)) else ""
            lines.append(f"{a.get('title', a['name'])} {100 * own['robust_acc']:.2f}%{took}")
    if "eps_sweep" in res:
        norm = p["threat"]["norm"]
        lines.append("ε sweep: " + "  ".join(f"{eps_str(q['eps'], norm) if q['eps'] else 0}: {100 * q['acc']:.1f}%"
                                             for q in res["eps_sweep"]["points"]))
    if "sanity" in res:
        san = res["sanity"]
        lines.append(f"sanity checks: {len(san['checks']) - len(san['flags'])}/{len(san['checks'])} passed ({san['time_s']:.0f} s)")
    return lines


__all__ = ["EvalProtocol", "EvalResult", "flag_attacks", "run_protocol", "summary_lines"]
