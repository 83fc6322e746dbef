"""Evaluation attacks as objects: what judges a model in ``clat eval``, :func:`clat.benchmark`, the sanity checks
and the stability analysis, behind one interface (:class:`EvalAttack`) and one registry (:data:`ATTACKS`).

An attack's :meth:`~EvalAttack.run` takes the model, the images, their labels, the threat model and what the attacks
of one evaluation share (:class:`AttackContext`: seed, batch size, device, ...) and returns an :class:`AttackResult`:
the numbers behind it (JSON-able, stored under the attack's ``key`` of ``eval.json``), the per-image outcomes (True =
still correct; they go into the evaluation's :class:`~clat.eval.records.EvalRecord`), its headline accuracy and its
flags. Attacks that make adversarial examples also give them (:meth:`~EvalAttack.examples`): the transfer check
crafts them on a surrogate, the stability analysis measures criticality on them.

Built in (``clat list attacks``): ``pgd`` (clat's PGD, restarts, per-example worst case), ``apgd_ce``,
``autoattack`` / ``autoattack_plus`` / ``autoattack_rand`` (pyautoattack), ``eps_sweep``, ``square``
(black-box), ``noise`` (uniform noise of ε) and ``sanity`` (the gradient-masking checks, :mod:`clat.eval.sanity`);
:class:`Transfer` (examples crafted on another model) is built in Python. Your own is a subclass in your file,
named as ``package.module:Class`` (``clat eval --attack mymod:MyAttack``, ``clat.benchmark(attacks=[...])``)::

    @dataclass(frozen=True)
    class MyAttack(EvalAttack):
        name = "fgsm"

        def run(self, model, x, y, threat, ctx):
            ok = ...  # bool per image: still classified correctly
            return AttackResult({"robust_acc": ok.float().mean().item()}, {"fgsm": ok}, robust_acc=ok.float().mean().item())
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn

from clat.attacks.threat import ThreatModel
from clat.base.errors import ConfigError
from clat.base.registry import Registry, is_spec
from clat.eval.accuracy import batches, check_inputs, eps_sweep, evaluate_outcomes, pgd_examples, progress_bar, seeded_start
from clat.eval.autoattack import autoattack_outcomes, square_correct
from clat.layers.freezing import eval_mode

ATTACKS = Registry("attack", "clat eval --attack NAME, clat.benchmark(attacks=[NAME])")


@dataclass(frozen=True)
class AttackContext:
    """What the attacks of one evaluation share. ``seed``: every random start (None: the global RNG); ``stream``:
    which seeded starts (two streams draw independent ones); ``index_offset``: the position of ``x[0]`` in a larger
    set (seeded starts follow the image); ``surrogates``: models that transfer attacks craft their examples on;
    ``desc``: the progress bar's label (default: the attack's)."""

    seed: int | None = 0
    batch_size: int = 256
    device: torch.device | str | None = None
    progress: bool = False
    index_offset: int = 0
    stream: object = 0
    surrogates: Mapping[str, nn.Module] | None = None
    desc: str | None = None

    def replace(self, **changes: Any) -> "AttackContext":
        return dataclasses.replace(self, **changes)


@dataclass
class AttackResult:
    """What one attack found. ``details``: its numbers (JSON-able); ``outcomes``: name -> bool per image, True =
    still correct (keys unique in an evaluation: prefix them with the attack's name); ``robust_acc``: the accuracy
    under the attack (None when it has no single one, e.g. a sweep); ``flags``: lines a reader must see."""

    details: dict
    outcomes: dict[str, torch.Tensor] = field(default_factory=dict)
    robust_acc: float | None = None
    flags: list[str] = field(default_factory=list)


class EvalAttack:
    """One evaluation attack. A subclass sets ``name`` and defines :meth:`run` (and :meth:`examples` if it makes
    adversarial examples); a frozen dataclass of its settings is the easy way. ``key``: where ``eval.json`` keeps
    its details (default: ``name``); ``flags_first``: its flags lead the list (they question every other number)."""

    name: ClassVar[str] = ""
    flags_first: ClassVar[bool] = False

    @property
    def key(self) -> str:
        return self.name or type(self).__name__

    @property
    def title(self) -> str:
        """How flags and summaries name it."""
        return self.name or type(self).__name__

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, ctx: AttackContext) -> AttackResult:
        raise NotImplementedError(f"{type(self).__name__} must define run(model, x, y, threat, ctx) -> AttackResult")

    def examples(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, *, seed: int | None = None,
                 indices: Sequence[int] | None = None, stream: object = 0) -> torch.Tensor:
        """Adversarial examples of the batch ``x`` (float in [0, 1], on the model's device); ``seed`` with ``indices``
        (the images' positions): per-image seeded starts of ``stream``; without: the global RNG."""
        raise ConfigError(f"the attack {self.title!r} gives per-image outcomes but no adversarial examples; use one that does "
                          "(e.g. pgd)")

    def settings(self) -> dict:
        """Its settings, JSON-able (a dataclass's fields by default)."""
        if not dataclasses.is_dataclass(self):
            return {}
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def describe(self) -> dict:
        return {"name": self.name or type(self).__name__, "key": self.key, "title": self.title, "settings": self.settings()}


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(e) for e in v]
    return repr(v)


def resolve_attack(attack: EvalAttack | str, *, where: str = "") -> EvalAttack:
    """An attack object from an object, a registered name (``pgd``, ``apgd-ce``) or ``package.module:Class``
    (a class or function called without arguments, or an attack object)."""
    if isinstance(attack, EvalAttack):
        return attack
    if not isinstance(attack, str):
        raise ConfigError(f"an attack is an EvalAttack or its name, got {type(attack).__name__}{where}")
    name = attack if is_spec(attack) else attack.lower().replace("-", "_")
    obj = ATTACKS.get(name)
    if not isinstance(obj, EvalAttack) and callable(obj):
        obj = obj()
    if not isinstance(obj, EvalAttack):
        raise ConfigError(f"attack {attack!r}{where} is a {type(obj).__name__}, not a clat.eval.attacks.EvalAttack: subclass it "
                          "and define run(model, x, y, threat, ctx)")
    return obj


def _acc(ok: torch.Tensor) -> float:
    return ok.sum().item() / len(ok)


# -- clat's PGD ------------------------------------------------------------------------
@dataclass(frozen=True)
class PGD(EvalAttack):
    """clat's white-box PGD (:func:`clat.attacks.threat.perturb` on the cross-entropy), ``threat.steps`` steps of
    ``threat.alpha``, ``restarts`` runs: an image counts as robust only if no run fools it. It also measures the clean
    accuracy, and its numbers are the top level of ``eval.json`` (``pgd_acc``, ``pgd_acc_per_restart``, ...)."""

    restarts: int = 1
    name: ClassVar[str] = "pgd"

    def __post_init__(self) -> None:
        if isinstance(self.restarts, bool) or not isinstance(self.restarts, int) or self.restarts < 1:
            raise ConfigError(f"restarts must be >= 1, got {self.restarts}")

    @property
    def key(self) -> str:
        return ""  # the top level of eval.json

    @property
    def title(self) -> str:
        return "PGD"

    def run(self, model, x, y, threat, ctx):
        res, outcomes = evaluate_outcomes(model, x, y, threat, restarts=self.restarts, batch_size=ctx.batch_size, seed=ctx.seed,
                                          progress=ctx.progress, desc=ctx.desc or f"PGD-{threat.steps}", index_offset=ctx.index_offset,
                                          stream=ctx.stream)
        return AttackResult(res, outcomes, robust_acc=res["pgd_acc"])

    def examples(self, model, x, y, threat, *, seed=None, indices=None, stream=0):
        return pgd_examples(model, x, y, indices, threat, seed=seed, stream=stream)


# -- pyautoattack --------------------------------------------------------------------------
def _library_flags(aa: dict, name: str, threat: ThreatModel) -> list[str]:
    """pyautoattack's own reliability warnings, and perturbations outside ε."""
    flags = [f"{name} (pyautoattack's own check): {w}" for w in aa["warnings"]]
    if not aa["within_eps"]:
        flags.append(f"{name} returned perturbations of size {aa['max_perturbation']:.4g} > ε = {threat.eps:.4g}")
    return flags


@dataclass(frozen=True)
class AutoAttack(EvalAttack):
    """AutoAttack (Croce & Hein 2020) from the independent ``pyautoattack``: ``version`` standard (APGD-CE, APGD-T,
    FAB-T, Square), plus or rand; ``stages``: only its first stages (a screening whose verdict equals the full
    version's after them, image for image); ``apgd_restarts``: None = the library's. Outcomes ``aa/<stage>``, ``aa``."""

    version: str = "standard"
    stages: tuple[str, ...] | None = None
    apgd_restarts: int | None = None
    name: ClassVar[str] = "autoattack"

    def __post_init__(self) -> None:
        if self.version not in ("standard", "plus", "rand"):
            raise ConfigError(f"unknown AutoAttack version {self.version!r}; use standard, plus or rand (apgd_ce=True for APGD-CE alone)")
        if self.stages is not None:
            object.__setattr__(self, "stages", tuple(self.stages))

    @property
    def title(self) -> str:
        return f"AutoAttack ({self.version})"

    def run(self, model, x, y, threat, ctx):
        aa, per_image = autoattack_outcomes(model, x, y, threat, version=self.version, apgd_restarts=self.apgd_restarts,
                                            batch_size=ctx.batch_size, seed=0 if ctx.seed is None else ctx.seed, device=ctx.device,
                                            progress=ctx.progress, attacks=self.stages)
        return AttackResult(aa, {k: v for k, v in per_image.items() if k != "aa/clean"}, aa["robust_acc"],
                            _library_flags(aa, self.title, threat))


@dataclass(frozen=True)
class APGDCE(EvalAttack):
    """APGD-CE alone from ``pyautoattack`` (paper Table 8), ``apgd_restarts`` restarts (1 by default, as the paper's).
    Outcome ``apgd-ce``."""

    apgd_restarts: int | None = None
    name: ClassVar[str] = "apgd_ce"

    @property
    def title(self) -> str:
        return "APGD-CE"

    def run(self, model, x, y, threat, ctx):
        aa, per_image = autoattack_outcomes(model, x, y, threat, version="apgd-ce", apgd_restarts=self.apgd_restarts,
                                            batch_size=ctx.batch_size, seed=0 if ctx.seed is None else ctx.seed, device=ctx.device,
                                            progress=ctx.progress)
        return AttackResult(aa, {"apgd-ce": per_image["aa"]}, aa["robust_acc"], _library_flags(aa, self.title, threat))


@dataclass(frozen=True)
class Square(EvalAttack):
    """The Square attack (Andriushchenko et al. 2020) of ``pyautoattack`` alone: score-based, black-box (it never uses
    a gradient), ``n_queries`` queries. Outcome ``square``."""

    n_queries: int = 1000
    name: ClassVar[str] = "square"

    @property
    def title(self) -> str:
        return f"Square, {self.n_queries} queries"

    def run(self, model, x, y, threat, ctx):
        t0 = time.time()
        seed = 0 if ctx.seed is None else ctx.seed
        ok = square_correct(model, x, y, threat, n_queries=self.n_queries, batch_size=ctx.batch_size, seed=seed, progress=ctx.progress)
        acc = _acc(ok)
        return AttackResult({"n": len(ok), "robust_acc": acc, "n_queries": self.n_queries, "seed": seed, "time_s": time.time() - t0},
                            {"square": ok}, acc)


# -- what the sanity checks compare with -------------------------------------------------
@dataclass(frozen=True)
class EpsSweep(EvalAttack):
    """PGD accuracy at each radius of ``eps`` (paper Figure 4; the step keeps the threat's ratio to ε; ε = 0 is the
    clean accuracy); ``eps=None``: the threat's ε × ``(0, 1/4, 1/2, 1, 2)``. No headline accuracy, no outcomes."""

    eps: tuple[float, ...] | None = None
    restarts: int = 1
    name: ClassVar[str] = "eps_sweep"

    def __post_init__(self) -> None:
        if self.eps is not None:
            object.__setattr__(self, "eps", tuple(self.eps))
            if not self.eps or any(not e >= 0 or not math.isfinite(e) for e in self.eps):
                raise ConfigError(f"the ε sweep needs one or more finite radii >= 0, got {list(self.eps)}")

    def run(self, model, x, y, threat, ctx):
        radii = self.eps if self.eps is not None else tuple(m * threat.eps for m in (0, 0.25, 0.5, 1, 2))
        return AttackResult(eps_sweep(model, x, y, radii, threat, restarts=self.restarts, batch_size=ctx.batch_size, seed=ctx.seed,
                                      progress=ctx.progress))


@dataclass(frozen=True)
class Noise(EvalAttack):
    """Uniform noise of the threat's ε: PGD's own random start of its first run (seeded as PGD seeds it), so a PGD whose
    steps achieve nothing scores exactly this. Outcome ``noise``."""

    name: ClassVar[str] = "noise"

    @property
    def title(self) -> str:
        return "uniform noise"

    def run(self, model, x, y, threat, ctx):
        check_inputs(x, y, ctx.batch_size)
        t0, n, bs = time.time(), len(x), ctx.batch_size
        ok = torch.zeros(n, dtype=torch.bool)
        with eval_mode(model), torch.no_grad():
            for b, (xb, yb) in enumerate(batches(x, y, bs, next(model.parameters()).device)):
                sl = slice(b * bs, b * bs + len(xb))
                idx = range(ctx.index_offset + sl.start, ctx.index_offset + sl.stop)
                delta = (seeded_start(xb.shape[1:], idx, threat, seed=ctx.seed, stream=(ctx.stream, 0)).to(xb) if ctx.seed is not None
                         else threat.sample(xb))
                ok[sl] = ((model(xb).argmax(1) == yb) & (model((xb + delta).clamp(0, 1)).argmax(1) == yb)).cpu()
        return AttackResult({"n": n, "robust_acc": _acc(ok), "seed": ctx.seed, "time_s": time.time() - t0}, {"noise": ok}, _acc(ok))


@dataclass(frozen=True)
class Transfer(EvalAttack):
    """Black-box transfer: ``attack``'s examples crafted on ``source`` (another model), evaluated on the model; seeded
    starts of the context's ``stream``. Outcome ``transfer/<source_name>``."""

    source: nn.Module  # compared by identity
    source_name: str = "surrogate"
    attack: EvalAttack = PGD()
    name: ClassVar[str] = "transfer"

    @property
    def key(self) -> str:
        return f"transfer/{self.source_name}"

    @property
    def title(self) -> str:
        return f"transfer from {self.source_name}"

    def settings(self) -> dict:
        return {"source_name": self.source_name, "attack": self.attack.describe()}

    def run(self, model, x, y, threat, ctx):
        check_inputs(x, y, ctx.batch_size)
        t0, n, bs = time.time(), len(x), ctx.batch_size
        src_dev, dev = next(self.source.parameters()).device, next(model.parameters()).device
        ok = torch.zeros(n, dtype=torch.bool)
        with eval_mode(model, self.source), progress_bar(math.ceil(n / bs), ctx.desc or self.title, ctx.progress) as bar:
            for b, (xb, yb) in enumerate(batches(x, y, bs, src_dev)):
                sl = slice(b * bs, b * bs + len(xb))
                x_adv = self.attack.examples(self.source, xb, yb, threat, seed=ctx.seed, stream=ctx.stream,
                                             indices=range(ctx.index_offset + sl.start, ctx.index_offset + sl.stop))
                with torch.no_grad():
                    xd, yd = xb.to(dev), yb.to(dev)
                    ok[sl] = ((model(xd).argmax(1) == yd) & (model(x_adv.to(dev)).argmax(1) == yd)).cpu()
                if bar is not None:
                    bar.update(1)
        return AttackResult({"n": n, "robust_acc": _acc(ok), "source": self.source_name, "seed": ctx.seed, "time_s": time.time() - t0},
                            {self.key: ok}, _acc(ok))


ATTACKS.add("pgd", PGD, description="clat's PGD (threat.steps steps, restarts, per-example worst case); also clean accuracy")
ATTACKS.add("apgd_ce", APGDCE, description="APGD-CE alone from pyautoattack, 1 restart (paper Table 8)")
ATTACKS.add("autoattack", AutoAttack, description="standard AutoAttack from pyautoattack (APGD-CE, APGD-T, FAB-T, Square)")
ATTACKS.add("autoattack_plus", functools.partial(AutoAttack, "plus"), description="AutoAttack plus from pyautoattack")
ATTACKS.add("autoattack_rand", functools.partial(AutoAttack, "rand"), description="AutoAttack rand (randomized defenses) from pyautoattack")
ATTACKS.add("eps_sweep", EpsSweep, description="PGD accuracy over ε (paper Figure 4); default ε × 0, 1/4, 1/2, 1, 2")
ATTACKS.add("square", Square, description="the Square attack alone (black-box, 1000 queries) from pyautoattack")
ATTACKS.add("noise", Noise, description="uniform noise of ε (PGD's random start): the floor any attack must beat")

__all__ = ["APGDCE", "ATTACKS", "AttackContext", "AttackResult", "AutoAttack", "EpsSweep", "EvalAttack", "Noise", "PGD", "Square",
           "Transfer", "resolve_attack"]
