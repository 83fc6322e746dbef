"""Evaluation as data: every function here returns a JSON-able dict.

- :func:`evaluate`: clean and white-box PGD accuracy (clat's own attack,
  :func:`clat.attacks.perturb`) with restarts: each restart's own accuracy, the
  lowest of them (what the paper reports: "the lowest of >= 10 runs") and the
  per-example worst case (an example counts as robust only if no run fools it).
- :func:`autoattack`: APGD-CE or the full standard AutoAttack from the independent
  ``pyautoattack`` package (Croce & Hein's code), so that our own PGD is never the
  only judge of a model it may have been trained against.
- :func:`transfer_matrix`: black-box transfer (paper Table 2), :func:`eps_sweep`
  (Figure 4), :func:`criticality_stability` (Table 7).

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
from typing import Iterable, Iterator, Literal, Mapping, Sequence

import torch
from torch import nn

from clat.attacks import Norm, Threat, ce_objective, perturb
from clat.errors import ClatError, ConfigError

AutoAttackVersion = Literal["standard", "plus", "rand", "apgd-ce"]


# -- batching and seeded random starts ------------------------------------------------
def _as_float(xb: torch.Tensor) -> torch.Tensor:
    return xb.float().div_(255) if xb.dtype == torch.uint8 else xb


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(x), batch_size):
        yield _as_float(x[i : i + batch_size].to(device)), y[i : i + batch_size].to(device)


def _key(*parts: object) -> int:
    """A 63-bit seed from a tuple (stable across runs and platforms, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def seeded_start(shape: Sequence[int], indices: Sequence[int], *, eps: float, norm: Norm, seed: int, stream: object = 0) -> torch.Tensor:
    """Random starts ``δ`` (CPU, float32) for the examples ``indices``: uniform in the
    ℓ∞ ball, or uniform direction and radius in the ℓ2 ball (the distributions of
    :meth:`clat.attacks.Threat.random_init`), one generator per example."""
    out = torch.empty(len(indices), *shape)
    g = torch.Generator()
    for j, i in enumerate(indices):
        g.manual_seed(_key(seed, stream, int(i)))
        if norm == "linf":
            out[j].uniform_(-eps, eps, generator=g)
        else:
            d = torch.randn(tuple(shape), generator=g)
            r = torch.rand((), generator=g)
            out[j] = d / d.norm().clamp_min(1e-12) * r * eps
    return out


def pgd_examples(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    indices: Sequence[int] | None,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: Norm,
    seed: int | None,
    stream: object = 0,
) -> torch.Tensor:
    """One PGD run on a batch (clat's one attack loop, :func:`clat.attacks.perturb`).
    With ``seed``, the random start of each example comes from :func:`seeded_start`."""
    delta0 = None
    if seed is not None:
        assert indices is not None
        delta0 = seeded_start(x.shape[1:], indices, eps=eps, norm=norm, seed=seed, stream=stream).to(x)
    try:
        return perturb(ce_objective(model, y), x, eps=eps, alpha=alpha, steps=steps, norm=norm, delta0=delta0)
    except RuntimeError as e:
        if "does not require grad" in str(e):
            raise ClatError(
                "the model's output does not depend differentiably on its input, so gradient attacks cannot run: "
                "this is gradient masking; evaluate it with --autoattack (Square is gradient-free) or a transfer attack"
            ) from None
        raise


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


@contextlib.contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, t in zip(models, modes):
            m.train(t)


def _check(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
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
    *,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 10,
    restarts: int = 1,
    norm: Norm = "linf",
    batch_size: int = 256,
    seed: int | None = None,
    stream: object = 0,
    progress: bool = False,
    desc: str = "PGD",
    index_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example correctness: ``clean [n]`` and ``runs [restarts, n]`` (bool, CPU).

    ``runs[r, i]`` is True when example i is classified correctly both clean and after
    run r's attack. ``eps == 0`` means no attack (``runs`` repeats ``clean``). ``index_offset``
    is the position of ``x[0]`` in a larger set (seeded starts follow the example, so a
    set split into shards gives the same result as the whole)."""
    _check(x, y, batch_size)
    if restarts < 1:
        raise ConfigError(f"restarts must be >= 1, got {restarts}")
    device = next(model.parameters()).device
    clean = torch.zeros(len(x), dtype=torch.bool)
    runs = torch.zeros(restarts, len(x), dtype=torch.bool)
    n_batches = math.ceil(len(x) / batch_size)
    with _eval_mode(model), _progress(n_batches * (restarts if eps > 0 else 1), desc, progress) as bar:
        for b, (xb, yb) in enumerate(_batches(x, y, batch_size, device)):
            sl = slice(b * batch_size, b * batch_size + len(xb))
            idx = range(index_offset + sl.start, index_offset + sl.stop)
            with torch.no_grad():
                ok = (model(xb).argmax(1) == yb).cpu()
            clean[sl] = ok
            if eps <= 0:
                runs[:, sl] = ok
                if bar is not None:
                    bar.update(1)
                continue
            for r in range(restarts):
                x_adv = pgd_examples(model, xb, yb, idx, eps=eps, alpha=alpha, steps=steps, norm=norm, seed=seed, stream=(stream, r))
                with torch.no_grad():
                    runs[r, sl] = ok & (model(x_adv).argmax(1) == yb).cpu()
                if bar is not None:
                    bar.update(1)
    return clean, runs


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 10,
    restarts: int = 1,
    norm: Norm = "linf",
    batch_size: int = 256,
    attack: bool = True,
    progress: bool = False,
    desc: str = "eval",
    seed: int | None = None,
    index_offset: int = 0,
) -> dict:
    """Clean and PGD-``steps`` accuracy of ``model`` on images ``x`` (uint8 or float in [0, 1]).

    Returns ``n``, ``clean_acc`` and, with ``attack``: ``pgd_acc`` (per-example worst
    case over the ``restarts`` runs), ``pgd_acc_per_restart`` (each run's accuracy),
    ``pgd_acc_lowest_run`` (the paper's "lowest of N runs"), ``pgd_acc_mean_run`` and
    the attack settings. ``seed`` makes the result independent of ``batch_size``;
    without it the random starts come from the global RNG.
    """
    _check(x, y, batch_size)
    if restarts < 1:
        raise ConfigError(f"restarts must be >= 1, got {restarts}")
    if attack:
        Threat(eps, norm)  # validates eps and norm before any work
    t0 = time.time()
    clean, runs = pgd_correct(
        model, x, y, eps=eps if attack else 0.0, alpha=alpha, steps=steps, restarts=restarts if attack else 1, norm=norm,
        batch_size=batch_size, seed=seed, progress=progress, desc=desc, index_offset=index_offset,
    )
    n = len(x)
    out: dict = {"n": n, "clean_acc": clean.sum().item() / n, "clean_correct": int(clean.sum())}
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
                    "name": "pgd", "norm": norm, "eps": eps, "alpha": alpha, "steps": steps, "restarts": restarts,
                    "random_start": "per-example, seeded" if seed is not None else "global RNG", "seed": seed,
                },
            }
        )
    out["time_s"] = time.time() - t0
    return out


def eps_sweep(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_values: Sequence[float],
    *,
    alpha_ratio: float = 0.25,
    steps: int = 10,
    restarts: int = 1,
    norm: Norm = "linf",
    batch_size: int = 256,
    seed: int | None = 0,
    progress: bool = False,
) -> dict:
    """PGD accuracy for each ε in ``eps_values`` (paper Figure 4); the step size is
    ``alpha_ratio · ε`` (2/255 at 8/255 by default). ε = 0 gives the clean accuracy."""
    if not eps_values:
        raise ConfigError("the ε sweep needs at least one ε")
    if any(e < 0 for e in eps_values):
        raise ConfigError(f"ε must be >= 0, got {list(eps_values)}")
    points = []
    t0 = time.time()
    for e in sorted(eps_values):
        clean, runs = pgd_correct(
            model, x, y, eps=e, alpha=max(alpha_ratio * e, 1e-12), steps=steps, restarts=restarts, norm=norm,
            batch_size=batch_size, seed=seed, progress=progress, desc=f"ε={e:.4g}",
        )
        points.append({"eps": e, "alpha": alpha_ratio * e, "acc": runs.all(0).sum().item() / len(x)})
    return {
        "n": len(x), "norm": norm, "steps": steps, "restarts": restarts, "alpha_ratio": alpha_ratio, "seed": seed,
        "clean_acc": clean.sum().item() / len(x), "points": points, "time_s": time.time() - t0,
    }


# -- black-box transfer ----------------------------------------------------------------
def transfer_matrix(
    models: Mapping[str, nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 10,
    restarts: int = 1,
    norm: Norm = "linf",
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
    _check(x, y, batch_size)
    Threat(eps, norm)
    mods = [models[n] for n in names]
    k = len(mods)
    robust = torch.zeros(k, k, dtype=torch.long)
    clean_n = torch.zeros(k, dtype=torch.long)
    t0 = time.time()
    n_batches = math.ceil(len(x) / batch_size)
    with _eval_mode(*mods), _progress(n_batches * k * restarts, "transfer", progress) as bar:
        for b, (xb, yb) in enumerate(_batches(x, y, batch_size, torch.device("cpu"))):
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
                    x_adv = pgd_examples(src, xb.to(dev), yb.to(dev), idx, eps=eps, alpha=alpha, steps=steps, norm=norm, seed=seed, stream=(0, r))
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
        "attack": {"name": "pgd", "norm": norm, "eps": eps, "alpha": alpha, "steps": steps, "restarts": restarts, "seed": seed},
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


def autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float = 8 / 255,
    norm: Norm = "linf",
    version: AutoAttackVersion = "standard",
    apgd_restarts: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict:
    """Robust accuracy under AutoAttack (Croce & Hein 2020) from the ``pyautoattack`` package.

    ``version="standard"`` runs APGD-CE, APGD-T, FAB-T and Square (the RobustBench
    protocol); ``"apgd-ce"`` runs APGD-CE alone (paper Table 8; ``apgd_restarts``
    defaults to 1 there, as in the paper, and to the library's setting otherwise).
    The library's printing is captured and its own reliability warnings (zero
    gradients, randomized or dynamic defenses, Square beating the white-box attacks)
    are returned under ``warnings``. The returned adversarial examples are checked
    independently: accuracy is recomputed from them, and their perturbation size is
    verified against ε. The global RNG is left as it was.
    """
    try:
        from pyautoattack import AutoAttack
        from pyautoattack import __version__ as aa_version
    except ImportError:
        raise ClatError("AutoAttack needs the pyautoattack package (pip install 'pyautoattack>=0.2')") from None
    if version not in ("standard", "plus", "rand", "apgd-ce"):
        raise ConfigError(f"unknown AutoAttack version {version!r}; use standard, plus, rand or apgd-ce")
    _check(x, y, batch_size)
    Threat(eps, norm)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    xf = _as_float(x).to(dev)
    yd = y.to(dev)
    t0 = time.time()
    n_attacks = {"apgd-ce": 1, "standard": 4, "plus": 6, "rand": 2}[version]
    logger = logging.getLogger("auto-attack")
    old = (logger.level, logger.propagate, list(logger.handlers))
    stdout = io.StringIO()
    with _eval_mode(model), _progress(n_attacks, f"AutoAttack ({version})", progress) as bar:
        cap = _Capture(bar)
        logger.handlers, logger.propagate = [cap], False  # its log (and its checks' warnings) go to the result, not the console
        logger.setLevel(logging.DEBUG)
        try:
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), contextlib.redirect_stdout(stdout), \
                    warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if version == "apgd-ce":
                    aa = AutoAttack(model, attacks=["apgd-ce"], device=dev, eps=eps, norm=_AA_NORM[norm], seed=seed, version="custom")
                    aa.apgd.n_restarts = 1 if apgd_restarts is None else apgd_restarts
                else:
                    aa = AutoAttack(model, device=dev, eps=eps, norm=_AA_NORM[norm], seed=seed, version=version)
                    if apgd_restarts is not None:
                        aa.apgd.n_restarts = apgd_restarts
                attacks = list(aa.attacks_to_run)
                x_adv, _ = aa.run_standard_evaluation(xf, yd, batch_size=batch_size)
        finally:
            logger.setLevel(old[0])
            logger.propagate = old[1]
            logger.handlers = old[2]
        with torch.no_grad():
            clean_ok = torch.cat([(model(xb).argmax(1) == yb).cpu() for xb, yb in _batches(xf, yd, batch_size, dev)])
            adv_ok = torch.cat([(model(xb).argmax(1) == yb).cpu() for xb, yb in _batches(x_adv.to(dev), yd, batch_size, dev)])
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
        "robust_acc": (clean_ok & adv_ok).sum().item() / n,
        "robust_acc_after": per_attack,  # cumulative, as logged by the library (2 decimals of a percent)
        "max_perturbation": size.max().item(),
        "within_eps": bool((size <= eps * (1 + 1e-4) + 1e-6).all().item()),
        "warnings": lib_warnings,
        "time_s": time.time() - t0,
    }
    if stdout.getvalue().strip():
        out["stdout"] = stdout.getvalue()[-2000:]
    return out


def square_correct(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float = 8 / 255,
    norm: Norm = "linf",
    n_queries: int = 1000,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Per-example correctness (bool, CPU) under the Square attack (Andriushchenko et al.
    2020) of ``pyautoattack``: a score-based black-box attack (random search on the
    margin of the model's outputs; it never uses a gradient)."""
    try:
        from pyautoattack.square import SquareAttack
    except ImportError:
        raise ClatError("the Square attack needs the pyautoattack package (pip install 'pyautoattack>=0.2')") from None
    _check(x, y, batch_size)
    Threat(eps, norm)
    dev = next(model.parameters()).device
    sq = SquareAttack(model, p_init=0.8, n_queries=n_queries, eps=eps, norm=_AA_NORM[norm], n_restarts=1, seed=seed,
                      verbose=False, device=dev, resc_schedule=False)
    out = torch.zeros(len(x), dtype=torch.bool)
    with _eval_mode(model), _progress(math.ceil(len(x) / batch_size), "Square (black-box)", progress) as bar:
        for b, (xb, yb) in enumerate(_batches(x, y, batch_size, dev)):
            with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), \
                    contextlib.redirect_stdout(io.StringIO()):
                x_adv = sq.perturb(xb, yb)
                ok = (model(xb).argmax(1) == yb) & (model(x_adv).argmax(1) == yb)
            out[b * batch_size : b * batch_size + len(xb)] = ok.cpu()
            if bar is not None:
                bar.update(1)
    return out


# -- criticality stability (Table 7) ------------------------------------------------------
def measure_pgd_at_epoch_time(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    n_train: int | None = None,
    batch_size: int = 128,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 10,
    n_batches: int = 3,
) -> float:
    """Seconds for one PGD-AT training epoch over ``n_train`` images (default ``len(x)``),
    extrapolated from ``n_batches`` timed SGD steps of clat's PGD-AT method on a copy
    of the model (the model itself is not changed)."""
    import copy

    from clat.config import AttackConfig
    from clat.methods import PGDAT

    m = copy.deepcopy(model)
    m.train()
    method = PGDAT(AttackConfig(eps=eps, alpha=alpha, steps=steps))
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    device = next(m.parameters()).device
    xb, yb = _as_float(x[:batch_size].to(device)), y[:batch_size].to(device)
    loss, _ = method.loss(m, xb, yb)  # warm-up (allocations, kernel selection)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    t0 = time.perf_counter()
    for _ in range(n_batches):
        loss, _ = method.loss(m, xb, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    per_batch = (time.perf_counter() - t0) / n_batches
    return per_batch * math.ceil((n_train or len(x)) / len(xb))


def _ranks(v: Sequence[float]) -> list[float]:
    order = sorted(range(len(v)), key=lambda i: v[i])
    r = [0.0] * len(v)
    for pos, i in enumerate(order):
        r[i] = float(pos)
    return r


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Rank correlation of two rankings (no ties: ranks are positions)."""
    n = len(a)
    if n < 2:
        return 1.0
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(a, b)) / (n * (n * n - 1))


def criticality_stability(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_sizes: Sequence[int] = (10, 30, 50, 100),
    repeats: int = 5,
    reference_size: int = 500,
    k: int = 5,
    attack: "AttackConfig | None" = None,
    steps: int | None = None,
    denominator: str = "upstream",
    seed: int = 0,
    epoch_time_s: float | None = None,
    progress: bool = False,
) -> dict:
    """How stable the top-k critical layers are over random batches (paper Table 7).

    ``attack`` is the threat model of the criticality perturbation (default ℓ∞ 8/255, step
    2/255) and ``steps`` its PGD steps (default ``attack.steps``).

    A reference ranking comes from ``reference_size`` images; for each batch size,
    ``repeats`` random batches (drawn from the rest of ``x``, so they never overlap
    the reference) give a top-k each: its overlap with the reference top-k, whether
    it is the same set and in the same order, the Spearman correlation of the whole
    ranking of eligible layers with the reference one, and the time taken, also as
    a fraction of ``epoch_time_s`` (one PGD-AT training epoch) when given. ``k`` is
    lowered to (eligible layers − 1) when it would cover every eligible layer.
    """
    from clat.config import AttackConfig
    from clat.criticality import compute_criticality
    from clat.layers import find_layers

    attack = attack if attack is not None else AttackConfig()
    steps = attack.steps if steps is None else steps
    if repeats < 1 or reference_size < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ConfigError("criticality stability needs repeats >= 1, reference_size >= 1 and batch sizes >= 1")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    ref_idx, pool = perm[:reference_size], perm[reference_size:]
    if len(pool) < max(batch_sizes):
        raise ConfigError(f"{len(x)} images leave {len(pool)} beside the {reference_size}-image reference, fewer than the batch size {max(batch_sizes)}")
    device = next(model.parameters()).device

    def crit(idx: torch.Tensor):
        xb, yb = _as_float(x[idx].to(device)), y[idx].to(device)
        t0 = time.perf_counter()
        res = compute_criticality(model, layers, xb, yb, attack=attack, steps=steps, denominator=denominator)
        return res, time.perf_counter() - t0

    layers = find_layers(model, _as_float(x[:2].to(device)))
    crit(ref_idx[: min(batch_sizes)])  # warm-up: the first call pays for allocations and kernel selection
    ref, ref_time = crit(ref_idx)
    n_eligible = sum(ref.eligible)
    if k >= n_eligible:  # the top-k of all eligible layers is always the same set: compare fewer
        k = max(1, n_eligible - 1)
    ref_top = [l.index for l in ref.top_k(k)]
    ref_rank = _ranks([ref.criticality[i] for i in ref.ranking])
    rows = []
    with _progress(len(batch_sizes) * repeats, "criticality stability", progress) as bar:
        for bs in batch_sizes:
            tops, times, rhos = [], [], []
            for _ in range(repeats):
                idx = pool[torch.randperm(len(pool), generator=g)[:bs]]
                res, dt = crit(idx)
                tops.append([l.index for l in res.top_k(k)])
                times.append(dt)
                rhos.append(_spearman(ref_rank, _ranks([res.criticality[i] for i in ref.ranking])))
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
            rows.append(row)
    return {
        "k": k,
        "eligible_layers": n_eligible,
        "layers": [l.name for l in layers],
        "reference": {"size": len(ref_idx), "top_k": ref_top, "names": [layers[i].name for i in ref_top], "time_s": ref_time},
        "repeats": repeats,
        "attack": {"eps": attack.eps, "alpha": attack.alpha, "steps": steps, "norm": attack.norm, "denominator": denominator},
        "seed": seed,
        "epoch_time_s": epoch_time_s,
        "rows": rows,
    }
