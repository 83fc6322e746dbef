"""Evaluation as data: every function here returns a JSON-able dict.

- :func:`evaluate`: clean and white-box PGD accuracy (clat's own attack,
  :func:`clat.attacks.threat.perturb`) with restarts: each restart's own accuracy, the
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
import math
import time
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from clat.attacks.threat import DEFAULT_THREAT, ThreatModel, ce_objective, perturb
from clat.base.errors import ClatError, ConfigError
from clat.data.loader import to_unit_float
from clat.layers.freezing import eval_mode


# -- batching and seeded random starts ------------------------------------------------
def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(x), batch_size):
        yield to_unit_float(x[i : i + batch_size].to(device)), y[i : i + batch_size].to(device)


def _key(*parts: object) -> int:
    """A 63-bit seed from a tuple (stable across runs and platforms, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def seeded_start(shape: Sequence[int], indices: Sequence[int], threat: ThreatModel, *, seed: int, stream: object = 0) -> torch.Tensor:
    """Random starts ``δ`` (CPU, float32) for the examples ``indices``, drawn by
    :meth:`clat.attacks.threat.ThreatModel.sample` with one generator per example."""
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
    """One PGD run on a batch (clat's one attack loop, :func:`clat.attacks.threat.perturb`).
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
    stream: object = 0,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """:func:`evaluate`'s dict and the per-image outcomes behind it (bool, CPU; True = correct): ``clean``,
    ``pgd/run<r>`` for each restart and ``pgd`` (correct under every run), in the order of ``x``. ``stream``: which
    seeded starts (another stream draws independent ones, as :func:`pgd_correct`'s)."""
    check_inputs(x, y, batch_size)
    if restarts < 1:
        raise ConfigError(f"restarts must be >= 1, got {restarts}")
    t0 = time.time()
    clean, runs = pgd_correct(
        model, x, y, threat if attack else None, restarts=restarts if attack else 1, batch_size=batch_size, seed=seed, stream=stream,
        progress=progress, desc=desc, index_offset=index_offset,
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
                    "name": "pgd", "norm": threat.norm, "eps": threat.eps, "alpha": threat.alpha, "steps": threat.steps,
                    "restarts": restarts,
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
        "attack": {"name": "pgd", "norm": threat.norm, "eps": threat.eps, "alpha": threat.alpha, "steps": threat.steps,
                   "restarts": restarts, "seed": seed},
        "time_s": time.time() - t0,
    }


# -- AutoAttack (pyautoattack) -------------------------------------------------------------

