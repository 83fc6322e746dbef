"""Layer selectors: one rule, one function, used twice. A selector scores every layer (higher: "fine-tune this one"):
CLAT trains the ``clat.k`` eligible layers it scores highest (``clat.selection=NAME``), and the layer oracle scores
it against what fine-tuning each layer alone really bought (``clat layer-sweep --estimators NAME``,
:func:`clat.criticality.estimators.compute_estimates`). ``clat list selectors`` shows them.

A new rule is one registered function of a :class:`LayerScoring`::

    from clat.criticality.selectors import register_selector

    @register_selector("widest", label="output size")
    def widest(s):
        return [float(layer.numel) for layer in s.layers]

and ``clat.selection=widest`` trains the widest layers; in a file of your own, ``clat.selection=mymodule:widest``
(registered or not). The built-in rules: ``critical`` (CLAT's criticality index with the run's
``clat.criticality`` settings, the default), ``random`` (k eligible layers drawn with the run's generator) and
``deepest`` (the k last eligible layers; the oracle calls it ``depth``); the oracle's other estimators (``paper``,
``input``, ``fisher``, ...) live in :mod:`clat.criticality.estimators` and CLAT can select by them too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from clat.attacks.threat import ThreatModel, pgd
from clat.base.errors import ConfigError
from clat.base.registry import Registry
from clat.criticality.index import CriticalityConfig, CriticalityResult, compute_criticality, select_random
from clat.layers.discovery import Layer
from clat.layers.freezing import eval_mode

SELECTORS = Registry("selector", "clat.selection, clat layer-sweep --estimators")


@dataclass
class LayerScoring:
    """What a selector may look at: the model, its layers, a batch of training images and the threat model, the
    eligible layers and how many are chosen (CLAT's; the oracle: 1 and every layer), a seeded generator, and
    measurements made once and shared by the selectors (:meth:`criticality`, :meth:`x_adv`)."""

    model: nn.Module
    layers: Sequence[Layer]
    x: torch.Tensor
    y: torch.Tensor
    threat: ThreatModel
    eligible: list[bool]
    k: int = 1
    generator: torch.Generator | None = None
    settings: CriticalityConfig = field(default_factory=CriticalityConfig)
    exclude: Sequence[str | int] = ()
    chunk_size: int | None = None
    measured: dict = field(default_factory=dict)  # criticality settings -> CriticalityResult (CLAT passes the one it logs)
    adversarial: torch.Tensor | None = None  # x under a PGD attack of the model, once :meth:`x_adv` made it
    options: dict = field(default_factory=dict)  # settings of particular selectors (the oracle's rift_eps, rift_steps)

    def x_adv(self) -> torch.Tensor:
        """``x`` under PGD (``threat``) with the model in eval mode, made once (the oracle makes it first)."""
        if self.adversarial is None:
            with eval_mode(self.model):
                self.adversarial = pgd(self.model, self.x, self.y, self.threat)
        return self.adversarial

    def criticality(self, **changes: Any) -> CriticalityResult:
        """The criticality index (Eq. 6) with ``settings`` and the given ``changes`` of them (``denominator="input"``,
        ``scaling="sqrt_n"``), measured once per distinct setting; a setting not measured yet is measured on
        :meth:`x_adv`."""
        kw = {**self.settings.measure_kwargs(), **changes}
        key = tuple(sorted(kw.items()))
        if key not in self.measured:
            self.measured[key] = compute_criticality(self.model, self.layers, self.x, self.y, self.threat, **kw, x_adv=self.x_adv(),
                                                     exclude=self.exclude, chunk_size=self.chunk_size)
        return self.measured[key]


def measured_key(settings: CriticalityConfig) -> tuple:
    """The key of :attr:`LayerScoring.measured` under which a measurement with ``settings`` is found."""
    return tuple(sorted(settings.measure_kwargs().items()))


def register_selector(name: str, *, label: str = "", description: str = "", aliases: tuple[str, ...] = (),
                      order: str = "score") -> Callable:
    """A decorator above ``fn(scoring: LayerScoring) -> one score per layer``. ``label``: the oracle's name of it;
    ``order="depth"``: CLAT records the layers it chose shallowest first (else highest score first)."""
    if order not in ("score", "depth"):
        raise ValueError(f"order must be score or depth, got {order!r}")
    return SELECTORS.register(name, description=description or label, aliases=aliases, label=label or name, order=order)


def scores(name: str, scoring: LayerScoring) -> list[float]:
    """The scores of selector ``name`` (registered, an alias, or ``package.module:function``), one per layer."""
    out = [float(v) for v in SELECTORS.get(name)(scoring)]
    if len(out) != len(scoring.layers):
        raise ConfigError(f"selector {name} returned {len(out)} scores for {len(scoring.layers)} layers: give one score per layer")
    return out


def choose(name: str, scoring: LayerScoring) -> list[Layer]:
    """CLAT's choice: the ``scoring.k`` eligible layers that selector ``name`` scores highest (ties: the shallower
    first), highest first, or shallowest first for a selector registered with ``order="depth"``."""
    s = scores(name, scoring)
    pool = [i for i, ok in enumerate(scoring.eligible) if ok]
    if not 1 <= scoring.k <= len(pool):
        raise ConfigError(f"k={scoring.k} layers requested but {len(pool)} layers are eligible for selection; choose k between 1 and "
                          f"{len(pool)}")
    chosen = [scoring.layers[i] for i in sorted(pool, key=lambda i: -s[i])[: scoring.k]]
    entry = SELECTORS.entry(name)
    return sorted(chosen, key=lambda layer: layer.index) if entry.extra.get("order") == "depth" else chosen


def label(name: str) -> str:
    """How the oracle's table names selector ``name`` (a name it does not know, as it is)."""
    return SELECTORS.entry(name).extra.get("label", name) if name in SELECTORS else name


# -- the rules of clat.selection ------------------------------------------------------------------------------
@register_selector("critical", label="Eq. 6 with the run's clat.criticality settings",
                   description="the criticality index, Eq. 6, with the run's clat.criticality settings (CLAT's default)")
def critical(s: LayerScoring) -> list[float]:
    return s.criticality().criticality


@register_selector("random", label="random (expectation)", order="depth",
                   description="k eligible layers drawn uniformly with the run's seeded generator (the random-layers ablation)")
def random_layers(s: LayerScoring) -> list[float]:
    drawn = {layer.index for layer in select_random(s.layers, s.eligible, s.k, s.generator or torch.Generator().manual_seed(0))}
    return [1.0 if layer.index in drawn else 0.0 for layer in s.layers]


@register_selector("deepest", aliases=("depth",), label="depth (layer index)", order="depth",
                   description="the k last eligible layers (score: the layer's index; the oracle's `depth`)")
def deepest(s: LayerScoring) -> list[float]:
    return [float(layer.index) for layer in s.layers]
