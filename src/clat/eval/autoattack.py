"""Evaluation by the independent ``pyautoattack`` package (Croce & Hein's code), so that our own
PGD is never the only judge of a model it may have been trained against:

- :func:`autoattack`: APGD-CE or the full standard AutoAttack, robust accuracy and each stage's.
- :func:`autoattack_outcomes`: the same run with per-example outcomes, read off the library's own attack
  objects (one record per stage: who was still robust after it).
- :func:`square_correct`: the Square attack alone (score-based, black-box), for the gradient-masking checks.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import time
import warnings
from typing import Literal, Sequence

import torch
from torch import nn

from clat.attacks.threat import DEFAULT_THREAT, ThreatModel
from clat.base.errors import ClatError, ConfigError
from clat.data.loader import to_unit_float
from clat.eval.accuracy import batches, check_inputs, progress_bar
from clat.layers.freezing import eval_mode

AutoAttackVersion = Literal["standard", "plus", "rand", "apgd-ce"]


_AA_NORM = {"linf": "Linf", "l2": "L2"}
_AA_ACC = re.compile(r"robust accuracy after ([A-Z0-9-]+): ([0-9.]+)%")


class _Capture(logging.Handler):
    """Collects pyautoattack's log records (its progress and its own reliability checks)."""

    def __init__(self, bar=None) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.bar = bar

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if self.bar is not None:
            msg = record.getMessage()
            if msg.startswith("running "):
                self.bar.set_postfix_str(msg[len("running ") :])
            elif _AA_ACC.search(msg):
                self.bar.update(1)


class _StageRecorder:
    """Which images each AutoAttack stage fooled, read off the library's own run (nothing is attacked twice).

    pyautoattack runs its attacks in order, each on the images still robust, in batches of ``batch_size`` taken in
    index order. Each attack object's ``perturb`` is wrapped: a call belongs to the attack named by the object's
    state (``apgd``'s loss, ``fab``'s ``targeted``), and covers the next images of that attack's robust list. An
    image counts as fooled when the model misclassifies the returned example, exactly as the library decides it."""

    def __init__(self, aa, model: nn.Module, clean_ok: torch.Tensor, x: torch.Tensor) -> None:
        self.model, self.x = model, x
        self.robust = clean_ok.clone()
        self.stages: dict[str, torch.Tensor] = {}
        self.current: str | None = None
        self.order = torch.empty(0, dtype=torch.long)
        self.pos = 0
        self.ok = True  # False if a batch did not match the images expected: the stage records are then not kept
        self.seconds: dict[str, float] = {}  # wall time in each attack's perturb calls (and their record), in run order
        for attr, name in (("apgd", lambda o: "apgd-ce" if o.loss == "ce" else "apgd-dlr"), ("apgd_targeted", lambda o: "apgd-t"),
                           ("fab", lambda o: "fab-t" if o.targeted else "fab"), ("square", lambda o: "square")):
            obj = getattr(aa, attr)
            obj.perturb = self._wrap(obj, obj.perturb, name)

    def _wrap(self, obj, perturb, name):
        def perturb_and_record(x, y, *args, **kwargs):
            t0 = time.perf_counter()
            adv = perturb(x, y, *args, **kwargs)
            self._record(name(obj), x, y, adv)
            self.seconds[name(obj)] = self.seconds.get(name(obj), 0.0) + time.perf_counter() - t0
            return adv

        return perturb_and_record

    def _record(self, name: str, x: torch.Tensor, y: torch.Tensor, adv: torch.Tensor) -> None:
        if name != self.current:
            if self.current is not None:
                self.stages[self.current] = self.robust.clone()
            self.current, self.order, self.pos = name, self.robust.nonzero().flatten(), 0
        idx = self.order[self.pos : self.pos + len(x)]
        self.pos += len(x)
        if len(idx) != len(x) or not torch.equal(self.x[idx.to(self.x.device)], x.to(self.x.device)):
            self.ok = False
            return
        with torch.no_grad():
            fooled = (self.model(adv).max(dim=1)[1] != y).cpu()
        self.robust[idx[fooled]] = False

    def finish(self, attacks: list[str]) -> dict[str, torch.Tensor]:
        """``aa/<attack>``: robust after each attack of the run, cumulative (an attack the library skipped because
        nothing was left to attack keeps the previous state)."""
        if self.current is not None:
            self.stages[self.current] = self.robust.clone()
        if not self.ok:
            return {}
        out, last = {}, None
        for a in attacks:
            last = self.stages.get(a, last if last is not None else self.robust)
            out[f"aa/{a}"] = last
        return out


def autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel = DEFAULT_THREAT,
    *,
    version: AutoAttackVersion = "standard",
    apgd_restarts: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
    attacks: Sequence[str] | None = None,
) -> dict:
    """Robust accuracy under AutoAttack (Croce & Hein 2020) from the ``pyautoattack`` package, in ``threat``'s
    ball (its norm and ε; AutoAttack chooses its own steps).

    ``version="standard"`` runs APGD-CE, APGD-T, FAB-T and Square (the RobustBench
    protocol); ``"apgd-ce"`` runs APGD-CE alone (paper Table 8; ``apgd_restarts``
    defaults to 1 there, as in the paper, and to the library's setting otherwise).
    ``attacks``: run only the first attacks of ``version`` (e.g. ``["apgd-ce", "apgd-t"]``), with the version's
    settings: the result equals the full version's robust accuracy after those stages, image for image.
    The library's printing is captured and its own reliability warnings (zero
    gradients, randomized or dynamic defenses, Square beating the white-box attacks)
    are returned under ``warnings``. The returned adversarial examples are checked
    independently: accuracy is recomputed from them, and their perturbation size is
    verified against ε. The global RNG is left as it was. :func:`autoattack_outcomes` also returns
    which images each stage fooled.
    """
    return autoattack_outcomes(model, x, y, threat, version=version, apgd_restarts=apgd_restarts, batch_size=batch_size, seed=seed,
                               device=device, progress=progress, attacks=attacks)[0]


def _autoattack_object(AutoAttack, model: nn.Module, threat: ThreatModel, dev: torch.device, *, version: str, seed: int,
                       apgd_restarts: int | None, attacks: Sequence[str] | None):
    """The library's attack object for ``version``, its APGD restarts set, cut to the first ``attacks``."""
    eps, norm = threat.eps, threat.norm
    if version == "apgd-ce":
        aa = AutoAttack(model, attacks=["apgd-ce"], device=dev, eps=eps, norm=_AA_NORM[norm], seed=seed, version="custom")
        aa.apgd.n_restarts = 1 if apgd_restarts is None else apgd_restarts
    else:
        aa = AutoAttack(model, device=dev, eps=eps, norm=_AA_NORM[norm], seed=seed, version=version)
        if apgd_restarts is not None:
            aa.apgd.n_restarts = apgd_restarts
    if attacks is not None:
        full = list(aa.attacks_to_run)
        if not attacks or list(attacks) != full[: len(attacks)]:
            raise ConfigError(f"attacks must be the first attacks of AutoAttack {version} in order ({', '.join(full)}), got "
                              f"{list(attacks)}")
        aa.attacks_to_run = list(attacks)
    return aa


def _logged_per_attack(messages: list[str], attacks: list[str], clean_acc: float) -> dict[str, float]:
    """Robust accuracy after each attack as the library logged it (cumulative)."""
    logged = {}
    for m in messages:
        hit = _AA_ACC.search(m)
        if hit:
            logged[hit.group(1).lower()] = float(hit.group(2)) / 100
    per_attack, last = {}, clean_acc
    for a in attacks:  # the library skips the remaining attacks once no example is left to attack
        last = per_attack[a] = logged.get(a, last)
    return per_attack


def autoattack_outcomes(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel = DEFAULT_THREAT,
    *,
    version: AutoAttackVersion = "standard",
    apgd_restarts: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
    attacks: Sequence[str] | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """:func:`autoattack`'s dict and the per-image outcomes behind it (bool, CPU; True = correct): ``aa/clean``,
    ``aa/<attack>`` after each stage (cumulative) and ``aa`` (the final verdict, recomputed from the returned
    examples), in the order of ``x``."""
    AutoAttack, aa_version = _pyautoattack()
    if version not in ("standard", "plus", "rand", "apgd-ce"):
        raise ConfigError(f"unknown AutoAttack version {version!r}; use standard, plus, rand or apgd-ce")
    check_inputs(x, y, batch_size)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    xf = to_unit_float(x).to(dev)
    yd = y.to(dev)
    t0 = time.time()
    aa = _autoattack_object(AutoAttack, model, threat, dev, version=version, seed=seed, apgd_restarts=apgd_restarts, attacks=attacks)
    attacks = list(aa.attacks_to_run)
    with eval_mode(model), progress_bar(len(attacks), f"AutoAttack ({version})", progress) as bar:
        clean_ok = _correct(model, xf, yd, batch_size, dev)
        rec = _StageRecorder(aa, model, clean_ok, xf)
        x_adv, records, caught, stdout = _run_quietly(aa, xf, yd, batch_size, dev, bar)
        adv_ok = _correct(model, x_adv.to(dev), yd, batch_size, dev)
    final = clean_ok & adv_ok
    outcomes = {"aa/clean": clean_ok, **rec.finish(attacks), "aa": final}
    stage_last = outcomes.get(f"aa/{attacks[-1]}")
    delta = (x_adv.to(dev) - xf).flatten(1)
    size = delta.abs().amax(1) if threat.norm == "linf" else delta.norm(dim=1)
    n = len(x)
    out = {
        "n": n, "library": f"pyautoattack {aa_version}", "version": version, "attacks": attacks, "norm": threat.norm, "eps": threat.eps,
        "seed": seed, "apgd_restarts": aa.apgd.n_restarts, "clean_acc": clean_ok.sum().item() / n, "robust_acc": final.sum().item() / n,
        # cumulative, as logged by the library (2 decimals of a percent)
        "robust_acc_after": _logged_per_attack([r.getMessage() for r in records], attacks, clean_ok.sum().item() / len(x)),
        "max_perturbation": size.max().item(),
        "within_eps": bool((size <= threat.eps * (1 + 1e-4) + 1e-6).all().item()),
        "warnings": [r.getMessage() for r in records if r.levelno >= logging.WARNING] + [str(w.message) for w in caught],
        "time_s": time.time() - t0,
        # seconds in each attack (those that ran: the library skips one when no image is left); the rest of time_s is the
        # clean pass and the checks. What a screening with the first stages saves is the time of the others.
        "time_s_by_attack": {a: round(rec.seconds[a], 3) for a in attacks if a in rec.seconds},
        # images whose final verdict (re-evaluated from the returned examples) differs from the stage record's (None: no record)
        "stage_record_mismatch": None if stage_last is None else int((stage_last != final).sum()),
    }
    if stdout.strip():
        out["stdout"] = stdout[-2000:]
    return out, outcomes


def _pyautoattack():
    """The library's ``AutoAttack`` class and its version."""
    try:
        from pyautoattack import AutoAttack
        from pyautoattack import __version__ as aa_version
    except ImportError:
        raise ClatError("AutoAttack needs the pyautoattack package (pip install 'pyautoattack>=0.2')") from None
    return AutoAttack, aa_version


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, dev: torch.device) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([(model(xb).argmax(1) == yb).cpu() for xb, yb in batches(x, y, batch_size, dev)])


def _run_quietly(aa, x: torch.Tensor, y: torch.Tensor, batch_size: int, dev: torch.device, bar):
    """The library's run with its log (its progress and its own checks' warnings), its prints and its warnings captured
    and the global RNG restored: ``(x_adv, log records, warnings, stdout)``."""
    logger = logging.getLogger("auto-attack")
    old = (logger.level, logger.propagate, list(logger.handlers))
    stdout = io.StringIO()
    cap = _Capture(bar)
    logger.handlers, logger.propagate = [cap], False  # its log (and its checks' warnings) go to the result, not the console
    logger.setLevel(logging.DEBUG)
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), contextlib.redirect_stdout(stdout), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    finally:
        logger.setLevel(old[0])
        logger.propagate = old[1]
        logger.handlers = old[2]
    return x_adv, cap.records, caught, stdout.getvalue()


def square_correct(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel = DEFAULT_THREAT,
    *,
    n_queries: int = 1000,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Per-example correctness (bool, CPU) under the Square attack (Andriushchenko et al.
    2020) of ``pyautoattack`` in ``threat``'s ball: a score-based black-box attack (random search on the
    margin of the model's outputs; it never uses a gradient)."""
    try:
        from pyautoattack.square import SquareAttack
    except ImportError:
        raise ClatError("the Square attack needs the pyautoattack package (pip install 'pyautoattack>=0.2')") from None
    check_inputs(x, y, batch_size)
    dev = next(model.parameters()).device
    sq = SquareAttack(model, p_init=0.8, n_queries=n_queries, eps=threat.eps, norm=_AA_NORM[threat.norm], n_restarts=1, seed=seed,
                      verbose=False, device=dev, resc_schedule=False)
    out = torch.zeros(len(x), dtype=torch.bool)
    with eval_mode(model), progress_bar(math.ceil(len(x) / batch_size), "Square (black-box)", progress) as bar:
        for b, (xb, yb) in enumerate(batches(x, y, batch_size, dev)):
            with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), \
                    contextlib.redirect_stdout(io.StringIO()):
                x_adv = sq.perturb(xb, yb)
                ok = (model(xb).argmax(1) == yb) & (model(x_adv).argmax(1) == yb)
            out[b * batch_size : b * batch_size + len(xb)] = ok.cpu()
            if bar is not None:
                bar.update(1)
    return out
