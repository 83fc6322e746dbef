"""One call that scores any PyTorch model the way ``clat eval`` does: :func:`benchmark` (RobustBench's
``benchmark``, with clat's evaluation protocol).

Example::

    import clat
    from clat.data.loader import load_bundled

    _, _, x_test, y_test = load_bundled()
    res = clat.benchmark(model, x_test, y_test, attacks=["pgd", "autoattack"], n_examples=200)
    res.clean_acc, res.pgd_acc, res.autoattack_acc, res.robust_acc, res.flags

It checks the images and labels (uint8 or float [0, 1] images as tensors ``[N, C, H, W]`` or numpy arrays of
either layout), draws the ``n_examples`` subset exactly as ``clat eval --n-examples`` does, and runs
:func:`clat.eval.protocol.run_protocol` with an :class:`clat.eval.protocol.EvalProtocol` built from ``attacks``. Every flag
(AutoAttack far below PGD, perturbations outside ε, a failed gradient-masking check) is also issued as a
warning, so a result that must not be believed cannot pass unseen.
"""

from __future__ import annotations

import difflib
import warnings
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from clat.attacks.threat import DEFAULT_THREAT, ThreatModel
from clat.base.distributed import resolve_device
from clat.base.errors import ConfigError, DataError
from clat.base.registry import is_spec
from clat.data.loader import check_images, to_unit_float
from clat.data.readers import check_labels, images_from_numpy, labels_from_numpy
from clat.eval.attacks import ATTACKS, PGD, EvalAttack, resolve_attack
from clat.eval.protocol import EvalProtocol, EvalResult, flag_attacks, run_protocol
from clat.layers.freezing import eval_mode


def _protocol(threat: ThreatModel, attacks: str | EvalAttack | Sequence[str | EvalAttack], *, restarts: int, eps_sweep: Sequence[float],
              sanity: bool, **settings) -> EvalProtocol:
    """``attacks`` (names or attack objects) as attack objects: ``restarts`` goes to the PGD named ``pgd``;
    ``eps_sweep`` and ``sanity`` add theirs."""
    given = [attacks] if isinstance(attacks, (str, EvalAttack)) else list(attacks)
    chosen: list[EvalAttack] = []
    for raw in given:
        if isinstance(raw, str) and not is_spec(raw) and raw.lower().replace("-", "_") not in ATTACKS:
            name = raw.lower().replace("-", "_")
            close = difflib.get_close_matches(name, ATTACKS.names(), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0].replace('_', '-')}?" if close else ""
            raise ConfigError(f"unknown attack {raw!r} for clat.benchmark{hint} (attacks: {', '.join(ATTACKS.names())}, "
                              "or your own as package.module:Class)")
        named_pgd = isinstance(raw, str) and raw.lower() == "pgd"
        chosen.append(PGD(restarts) if named_pgd else resolve_attack(raw, where=" (clat.benchmark attacks)"))
    extra = flag_attacks(pgd=False, restarts=restarts, eps_sweep=tuple(eps_sweep), sanity=sanity)  # checks restarts first
    if restarts != 1 and not any(isinstance(raw, str) and raw.lower() == "pgd" for raw in given):
        raise ConfigError(f"restarts={restarts} sets the runs of the attack named 'pgd', which attacks= does not name: add 'pgd', "
                          f"or give PGD(restarts={restarts}) as an attack")
    return EvalProtocol(threat, chosen + extra, **settings)


def _images_and_labels(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(x, np.ndarray):
        x = images_from_numpy(x, "x")
    if isinstance(y, np.ndarray):
        y = labels_from_numpy(y, "y")
    check_images(x, "x")
    if len(x) == 0:
        raise DataError("x holds no images: nothing to evaluate")
    return x, check_labels(y, len(x), "y", "x")


def _check_outputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> None:
    """One image through the model: it returns logits ``[1, K]`` and every label is a class below K."""

    with eval_mode(model), torch.no_grad():
        out = model(to_unit_float(x[:1]).to(device))
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"the model must return logits [N, classes] for images [N, C, H, W], got {got}")
    if int(y.max()) >= out.shape[1]:
        raise DataError(f"y holds the label {int(y.max())} but the model has {out.shape[1]} outputs (classes 0..{out.shape[1] - 1})")


def benchmark(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    *,
    threat: ThreatModel = DEFAULT_THREAT,
    attacks: str | EvalAttack | Sequence[str | EvalAttack] = ("pgd", "autoattack"),
    restarts: int = 1,
    n_examples: int | None = None,
    eps_sweep: Sequence[float] = (),
    sanity: bool = False,
    surrogates: Mapping[str, nn.Module] | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> EvalResult:
    """Score ``model`` (any ``nn.Module`` mapping [0, 1] images to logits) on images ``x`` and labels ``y``
    under ``threat``, with clat's evaluation protocol; returns the typed :class:`clat.eval.protocol.EvalResult`
    (``clean_acc``, ``pgd_acc``, ``apgd_ce_acc``, ``autoattack_acc``, ``robust_acc``: the lowest of them,
    ``flags``, and ``to_dict()``: every number, as ``clat eval`` writes it to ``eval.json``).

    ``attacks``: names or attack objects (:mod:`clat.eval.attacks`): ``pgd`` (clat's PGD, ``threat.steps`` steps,
    ``restarts`` runs, per-example worst case), ``apgd-ce``, ``autoattack`` (standard: APGD-CE, APGD-T, FAB-T, Square),
    ``autoattack-plus`` or ``autoattack-rand`` (pyautoattack, in ``threat``'s ball), ``square``, ``noise``, any other
    name of ``clat list attacks``, your own as ``package.module:Class``, or an object such as ``PGD(restarts=5)``;
    clean accuracy is always measured.
    ``n_examples``: a random subset drawn with ``seed`` (the images ``clat eval --n-examples N --seed S``
    takes); ``eps_sweep``, ``sanity``, ``surrogates``: as ``clat eval``'s options. ``device``: where to run;
    the model is moved there (None: where its parameters are). Results do not depend on ``batch_size``
    (per-example seeded random starts), and the model's train/eval modes are left as they were.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"clat.benchmark scores an nn.Module, got {type(model).__name__}")
    protocol = _protocol(threat, attacks, restarts=restarts, eps_sweep=tuple(eps_sweep), sanity=sanity, seed=seed, batch_size=batch_size)
    x, y = _images_and_labels(x, y)
    if n_examples is not None:
        if isinstance(n_examples, bool) or not isinstance(n_examples, int) or not 1 <= n_examples <= len(x):
            raise ConfigError(f"n_examples must be an integer from 1 to the {len(x)} images given, got {n_examples!r}")
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n_examples]  # as clat eval draws it
        x, y = x[idx], y[idx]
    if device is not None:
        model.to(resolve_device(str(device), option="device="))
    params = next(model.parameters(), None)
    if params is None:
        raise ConfigError("the model has no parameters: clat.benchmark attacks its input gradient and runs where its parameters are")
    _check_outputs(model, x, y, params.device)
    result = run_protocol(model, x, y, protocol, surrogates=surrogates, device=params.device, progress=progress)
    for flag in result.flags:
        warnings.warn(flag, stacklevel=2)
    return result


__all__ = ["ATTACKS", "benchmark"]  # ATTACKS: clat.eval.attacks.ATTACKS, the registry of evaluation attacks
