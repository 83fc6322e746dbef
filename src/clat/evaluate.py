"""Evaluation as data: every function here returns a JSON-able dict.

- :func:`evaluate`: clean and white-box PGD accuracy (clat's own attack,
  :func:`clat.attacks.perturb`) with restarts: each restart's own accuracy, the
  lowest of them (what the paper reports: "the lowest of >= 10 runs") and the
  per-example worst case (an example counts as robust only if no run fools it).
- :func:`autoattack`: APGD-CE or the full standard AutoAttack from the independent
  ``pyautoattack`` package (Croce & Hein's code), so that our own PGD is never the
  only judge of a model it may have been trained against.
- :func:`transfer_matrix`: black-box transfer (paper Table 2), :func:`eps_sweep`
  (Figure 4). The stability of the criticality ranking (Table 7) is :mod:`clat.stability`.

Models are evaluated in eval mode (their mode is restored). With ``seed`` given,
the random start of example ``i`` in run ``r`` is drawn from its own generator,
seeded from ``(seed, r, i)``: results do not depend on the batch size or on the
order in which batches are processed, and never touch the global RNG.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import re
import time
import warnings
from typing import Iterable, Literal, Mapping, Sequence

import torch
from torch import nn

from clat.attacks import ce_objective, DEFAULT_THREAT, perturb, ThreatModel
from clat.data import to_unit_float
from clat.trainable import eval_mode
from clat.errors import ClatError, ConfigError

AutoAttackVersion = Literal["standard", "plus", "rand", "apgd-ce"]


# -- batching and seeded random starts ------------------------------------------------
def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(x), batch_size):
        yield to_unit_float(x[i : i + batch_size].to(device)), y[i : i + batch_size].to(device)


def _key(*parts: object) -> int:
    """A 63-bit seed from a tuple (stable across runs and platforms, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def seeded_start(shape: Sequence[int], indices: Sequence[int], threat: ThreatModel, *, seed: int, stream: object = 0) -> torch.Tensor:
    """Random starts ``δ`` (CPU, float32) for the examples ``indices``, drawn by
    :meth:`clat.attacks.ThreatModel.sample` with one generator per example."""
    out = torch.empty(len(indices), *shape)
    g = torch.Generator()
    for j, i in enumerate(indices):
        g.manual_seed(_key(seed, stream, int(i)))
        out[j] = threat.sample(out[j : j + 1], generator=g)[0]
    return out


def pgd_examples(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    indices: Sequence[int] | None,
    threat: ThreatModel,
    *,
    seed: int | None,
    stream: object = 0,
) -> torch.Tensor:
    """One PGD run on a batch (clat's one attack loop, :func:`clat.attacks.perturb`).
    With ``seed``, the random start of each example comes from :func:`seeded_start`."""
    delta0 = None
    if seed is not None:
        assert indices is not None
        delta0 = seeded_start(x.shape[1:], indices, threat, seed=seed, stream=stream).to(x)
    try:
        return perturb(ce_objective(model, y), x, threat, delta0=delta0)
    except RuntimeError as e:
        if "does not require grad" in str(e):
            raise ClatError(
                "the model's output does not depend differentiably on its input, so gradient attacks cannot run: "
                "this is gradient masking; evaluate it with --autoattack (Square is gradient-free) or a transfer attack"
            ) from None
        raise


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over ``total`` steps, or a context yielding None when not ``enabled``."""
    if not enabled:
        return contextlib.nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def check_inputs(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
    if len(x) == 0:
        raise ConfigError("nothing to evaluate: the evaluation set is empty")
    if len(x) != len(y):
        raise ConfigError(f"{len(x)} images but {len(y)} labels")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")


# -- white-box PGD ---------------------------------------------------------------------
def pgd_correct(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel | None = DEFAULT_THREAT,
    *,
    restarts: int = 1,
    batch_size: int = 256,
    seed: int | None = None,
    stream: object = 0,
    progress: bool = False,
    desc: str = "PGD",
    index_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example correctness: ``clean [n]`` and ``runs [restarts, n]`` (bool, CPU).

    ``runs[r, i]`` is True when example i is classified correctly both clean and after
    run r's attack. ``threat=None`` means no attack (``runs`` repeats ``clean``). ``index_offset``
    is the position of ``x[0]`` in a larger set (seeded starts follow the example, so a
    set split into shards gives the same result as the whole)."""
    check_inputs(x, y, batch_size)
    if restarts < 1:
        raise ConfigError(f"restarts must be >= 1, got {restarts}")
    device = next(model.parameters()).device
    clean = torch.zeros(len(x), dtype=torch.bool)
    runs = torch.zeros(restarts, len(x), dtype=torch.bool)
    n_batches = math.ceil(len(x) / batch_size)
    with eval_mode(model), progress_bar(n_batches * (restarts if threat is not None else 1), desc, progress) as bar:
        for b, (xb, yb) in enumerate(batches(x, y, batch_size, device)):
            sl = slice(b * batch_size, b * batch_size + len(xb))
            idx = range(index_offset + sl.start, index_offset + sl.stop)
            with torch.no_grad():
                ok = (model(xb).argmax(1) == yb).cpu()
            clean[sl] = ok
            if threat is None:
                runs[:, sl] = ok
                if bar is not None:
                    bar.update(1)
                continue
            for r in range(restarts):
                x_adv = pgd_examples(model, xb, yb, idx, threat, seed=seed, stream=(stream, r))
                with torch.no_grad():
                    runs[r, sl] = ok & (model(x_adv).argmax(1) == yb).cpu()
                if bar is not None:
                    bar.update(1)
    return clean, runs


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel = DEFAULT_THREAT,
    *,
    restarts: int = 1,
    batch_size: int = 256,
    attack: bool = True,
    progress: bool = False,
    desc: str = "eval",
    seed: int | None = None,
    index_offset: int = 0,
) -> dict:
    """Clean and PGD accuracy of ``model`` on images ``x`` (uint8 or float in [0, 1]) under ``threat``.

    Returns ``n``, ``clean_acc`` and, with ``attack``: ``pgd_acc`` (per-example worst
    case over the ``restarts`` runs), ``pgd_acc_per_restart`` (each run's accuracy),
    ``pgd_acc_lowest_run`` (the paper's "lowest of N runs"), ``pgd_acc_mean_run`` and
    the attack settings. ``seed`` makes the result independent of ``batch_size``;
    without it the random starts come from the global RNG. :func:`evaluate_outcomes` also
    returns which images each run fooled.
    """
    return evaluate_outcomes(model, x, y, threat, restarts=restarts, batch_size=batch_size, attack=attack, progress=progress, desc=desc,
                             seed=seed, index_offset=index_offset)[0]


def evaluate_outcomes(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel = DEFAULT_THREAT,
    *,
    restarts: int = 1,
    batch_size: int = 256,
    attack: bool = True,
    progress: bool = False,
    desc: str = "eval",
    seed: int | None = None,
    index_offset: int = 0,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """:func:`evaluate`'s dict and the per-image outcomes behind it (bool, CPU; True = correct): ``clean``,
    ``pgd/run<r>`` for each restart and ``pgd`` (correct under every run), in the order of ``x``."""
    check_inputs(x, y, batch_size)
    if restarts < 1:
        raise ConfigError(f"restarts must be >= 1, got {restarts}")
    t0 = time.time()
    clean, runs = pgd_correct(
        model, x, y, threat if attack else None, restarts=restarts if attack else 1, batch_size=batch_size, seed=seed, progress=progress, desc=desc, index_offset=index_offset,
    )
    n = len(x)
    out: dict = {"n": n, "clean_acc": clean.sum().item() / n, "clean_correct": int(clean.sum())}
    outcomes = {"clean": clean}
    if attack:
        per_run = [c / n for c in runs.sum(1).tolist()]
        out.update(
            {
                "pgd_acc": runs.all(0).sum().item() / n,
                "pgd_correct": int(runs.all(0).sum()),
                "pgd_acc_per_restart": per_run,
                "pgd_acc_lowest_run": min(per_run),
                "pgd_acc_mean_run": sum(per_run) / len(per_run),
                "attack": {
                    "name": "pgd", "norm": threat.norm, "eps": threat.eps, "alpha": threat.alpha, "steps": threat.steps, "restarts": restarts,
                    "random_start": "per-example, seeded" if seed is not None else "global RNG", "seed": seed,
                },
            }
        )
        outcomes.update({f"pgd/run{r}": runs[r] for r in range(restarts)})
        outcomes["pgd"] = runs.all(0)
    out["time_s"] = time.time() - t0
    return out, outcomes


def eps_sweep(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_values: Sequence[float],
    threat: ThreatModel = DEFAULT_THREAT,
    *,
    restarts: int = 1,
    batch_size: int = 256,
    seed: int | None = 0,
    progress: bool = False,
) -> dict:
    """PGD accuracy for each ε in ``eps_values`` (paper Figure 4) under ``threat`` with its radius
    changed: the step keeps ``threat``'s ratio to ε (2/255 at 8/255 by default). ε = 0 gives the clean accuracy."""
    if not eps_values:
        raise ConfigError("the ε sweep needs at least one ε")
    if any(e < 0 for e in eps_values):
        raise ConfigError(f"ε must be >= 0, got {list(eps_values)}")
    points = []
    t0 = time.time()
    alpha_ratio = threat.alpha / threat.eps
    for e in sorted(eps_values):
        clean, runs = pgd_correct(
            model, x, y, threat.replace(eps=e, alpha=alpha_ratio * e) if e > 0 else None, restarts=restarts,
            batch_size=batch_size, seed=seed, progress=progress, desc=f"ε={e:.4g}",
        )
        points.append({"eps": e, "alpha": alpha_ratio * e, "acc": runs.all(0).sum().item() / len(x)})
    return {
        "n": len(x), "norm": threat.norm, "steps": threat.steps, "restarts": restarts, "alpha_ratio": alpha_ratio, "seed": seed,
        "clean_acc": clean.sum().item() / len(x), "points": points, "time_s": time.time() - t0,
    }


# -- black-box transfer ----------------------------------------------------------------
def transfer_matrix(
    models: Mapping[str, nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel = DEFAULT_THREAT,
    *,
    restarts: int = 1,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Accuracy of every model (column, the victim) on PGD examples crafted on every
    model (row, the attacker), paper Table 2.

    An example counts as robust for a victim only if it is classified correctly clean
    and under every restart's example. The diagonal is therefore exactly the
    white-box ``evaluate(..., seed=seed)["pgd_acc"]`` of each model.
    """
    names = list(models)
    if not names:
        raise ConfigError("the transfer matrix needs at least one model")
    check_inputs(x, y, batch_size)
    mods = [models[n] for n in names]
    k = len(mods)
    robust = torch.zeros(k, k, dtype=torch.long)
    clean_n = torch.zeros(k, dtype=torch.long)
    t0 = time.time()
    n_batches = math.ceil(len(x) / batch_size)
    with eval_mode(*mods), progress_bar(n_batches * k * restarts, "transfer", progress) as bar:
        for b, (xb, yb) in enumerate(batches(x, y, batch_size, torch.device("cpu"))):
            idx = range(b * batch_size, b * batch_size + len(xb))
            clean_ok = []
            for j, m in enumerate(mods):
                dev = next(m.parameters()).device
                with torch.no_grad():
                    clean_ok.append((m(xb.to(dev)).argmax(1) == yb.to(dev)).cpu())
                clean_n[j] += clean_ok[j].sum()
            for i, src in enumerate(mods):
                dev = next(src.parameters()).device
                ok = [c.clone() for c in clean_ok]
                for r in range(restarts):
                    x_adv = pgd_examples(src, xb.to(dev), yb.to(dev), idx, threat, seed=seed, stream=(0, r))
                    for j, tgt in enumerate(mods):
                        tdev = next(tgt.parameters()).device
                        with torch.no_grad():
                            ok[j] &= (tgt(x_adv.to(tdev)).argmax(1) == yb.to(tdev)).cpu()
                    if bar is not None:
                        bar.update(1)
                for j in range(k):
                    robust[i, j] += ok[j].sum()
    n = len(x)
    return {
        "names": names,
        "n": n,
        "matrix": [[robust[i, j].item() / n for j in range(k)] for i in range(k)],
        "rows": "attacker (source of the PGD examples)",
        "columns": "victim (evaluated model)",
        "clean_acc": {names[j]: clean_n[j].item() / n for j in range(k)},
        "attack": {"name": "pgd", "norm": threat.norm, "eps": threat.eps, "alpha": threat.alpha, "steps": threat.steps, "restarts": restarts, "seed": seed},
        "time_s": time.time() - t0,
    }


# -- AutoAttack (pyautoattack) -------------------------------------------------------------
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
        for attr, name in (("apgd", lambda o: "apgd-ce" if o.loss == "ce" else "apgd-dlr"), ("apgd_targeted", lambda o: "apgd-t"),
                           ("fab", lambda o: "fab-t" if o.targeted else "fab"), ("square", lambda o: "square")):
            obj = getattr(aa, attr)
            obj.perturb = self._wrap(obj, obj.perturb, name)

    def _wrap(self, obj, perturb, name):
        def perturb_and_record(x, y, *args, **kwargs):
            adv = perturb(x, y, *args, **kwargs)
            self._record(name(obj), x, y, adv)
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
    try:
        from pyautoattack import AutoAttack
        from pyautoattack import __version__ as aa_version
    except ImportError:
        raise ClatError("AutoAttack needs the pyautoattack package (pip install 'pyautoattack>=0.2')") from None
    if version not in ("standard", "plus", "rand", "apgd-ce"):
        raise ConfigError(f"unknown AutoAttack version {version!r}; use standard, plus, rand or apgd-ce")
    check_inputs(x, y, batch_size)
    eps, norm = threat.eps, threat.norm
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    xf = to_unit_float(x).to(dev)
    yd = y.to(dev)
    t0 = time.time()
    logger = logging.getLogger("auto-attack")
    old = (logger.level, logger.propagate, list(logger.handlers))
    stdout = io.StringIO()
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
            raise ConfigError(f"attacks must be the first attacks of AutoAttack {version} in order ({', '.join(full)}), got {list(attacks)}")
        aa.attacks_to_run = list(attacks)
    attacks = list(aa.attacks_to_run)
    with eval_mode(model), progress_bar(len(attacks), f"AutoAttack ({version})", progress) as bar:
        with torch.no_grad():
            clean_ok = torch.cat([(model(xb).argmax(1) == yb).cpu() for xb, yb in batches(xf, yd, batch_size, dev)])
        rec = _StageRecorder(aa, model, clean_ok, xf)
        cap = _Capture(bar)
        logger.handlers, logger.propagate = [cap], False  # its log (and its checks' warnings) go to the result, not the console
        logger.setLevel(logging.DEBUG)
        try:
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), contextlib.redirect_stdout(stdout), \
                    warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                x_adv, _ = aa.run_standard_evaluation(xf, yd, batch_size=batch_size)
        finally:
            logger.setLevel(old[0])
            logger.propagate = old[1]
            logger.handlers = old[2]
        with torch.no_grad():
            adv_ok = torch.cat([(model(xb).argmax(1) == yb).cpu() for xb, yb in batches(x_adv.to(dev), yd, batch_size, dev)])
    delta = (x_adv.to(dev) - xf).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    messages = [r.getMessage() for r in cap.records]
    lib_warnings = [r.getMessage() for r in cap.records if r.levelno >= logging.WARNING] + [str(w.message) for w in caught]
    n = len(x)
    logged = {}
    for m in messages:
        hit = _AA_ACC.search(m)
        if hit:
            logged[hit.group(1).lower()] = float(hit.group(2)) / 100
    per_attack, last = {}, clean_ok.sum().item() / len(x)
    for a in attacks:  # the library skips the remaining attacks once no example is left to attack
        last = per_attack[a] = logged.get(a, last)
    final = clean_ok & adv_ok
    outcomes = {"aa/clean": clean_ok, **rec.finish(attacks), "aa": final}
    stage_last = outcomes.get(f"aa/{attacks[-1]}")
    out = {
        "n": n,
        "library": f"pyautoattack {aa_version}",
        "version": version,
        "attacks": attacks,
        "norm": norm,
        "eps": eps,
        "seed": seed,
        "apgd_restarts": aa.apgd.n_restarts,
        "clean_acc": clean_ok.sum().item() / n,
        "robust_acc": final.sum().item() / n,
        "robust_acc_after": per_attack,  # cumulative, as logged by the library (2 decimals of a percent)
        "max_perturbation": size.max().item(),
        "within_eps": bool((size <= eps * (1 + 1e-4) + 1e-6).all().item()),
        "warnings": lib_warnings,
        "time_s": time.time() - t0,
        # images whose final verdict (re-evaluated from the returned examples) differs from the stage record's (None: no record)
        "stage_record_mismatch": None if stage_last is None else int((stage_last != final).sum()),
    }
    if stdout.getvalue().strip():
        out["stdout"] = stdout.getvalue()[-2000:]
    return out, outcomes


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
