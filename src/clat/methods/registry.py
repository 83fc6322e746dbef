"""The method registry: each method's file registers its class, label and config section here.

Adding a method is one file::

    @dataclass
    class MyConfig:                         # its section of the run config: cfg.my_at.beta, `my_at.beta=2`
        beta: float = 1.0

        def check(self, need):              # optional range checks, run by config.validate
            need(self.beta >= 0, f"my_at.beta must be >= 0, got {self.beta}")

    @register_method("my_at", label="My-AT", section=MyConfig, baseline=True)
    class MyAT(PGDAT):
        def __init__(self, attack, beta=1.0):   # built from the config: the attack section, then MyConfig's fields
            super().__init__(attack)            # as keywords (override from_config(cls, ctx) to build it otherwise)
            self.beta = beta

and it trains (``finetune.method=my_at``), is listed by ``clat methods`` and labelled in reports.
``tests/test_methods.py`` registers one from the test itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from clat.base.errors import ConfigError
from clat.config.schema import register_section

if TYPE_CHECKING:
    from clat.config.schema import Config
    from clat.layers.discovery import Layer
    from clat.methods.base import Method


@dataclass(frozen=True)
class MethodInfo:
    name: str
    cls: type
    label: str  # how reports and tables name it
    section: type | None  # its config dataclass (cfg.<name>), if it has settings
    baseline: bool  # a full-model method, usable alone and as the X of "X + CLAT" (clat.base) or of AWP
    needs_layers: bool  # works on the model's layers (CLAT, RiFT, LoRA)

    @property
    def description(self) -> str:
        """The first line of the class's docstring, else of its module's (one file per method)."""
        doc = self.cls.__dict__.get("__doc__") or sys.modules[self.cls.__module__].__doc__ or ""
        return doc.strip().splitlines()[0] if doc.strip() else self.label


@dataclass
class BuildContext:
    """What a method's ``from_config`` may use: the run config, the model's layers (None for a baseline
    built alone), the zoo model's name (None: a model of the user's) and an explicit default k."""

    cfg: Config
    layers: list[Layer] | None = None
    zoo_model: str | None = None
    default_k: int | None = None

    def options(self, name: str) -> dict:
        """The config section of method ``name`` as keyword arguments (empty when it has none)."""

        info = _REGISTRY.get(name)
        return dataclasses.asdict(getattr(self.cfg, name)) if info is not None and info.section is not None else {}

    def baseline(self, name: str, needed_by: str) -> Method:
        """The full-model baseline ``name`` built from the same config (the X that AWP or CLAT wraps)."""
        info = _REGISTRY.get(name)
        if info is None or not info.baseline or name == "standard":
            raise ConfigError(f"{needed_by} needs an adversarial baseline: {', '.join(adversarial_baselines())}; got {name!r}")
        return info.cls.from_config(BuildContext(self.cfg, None, self.zoo_model, self.default_k))


_REGISTRY: dict[str, MethodInfo] = {}


def register_method(name: str, *, label: str, section: type | None = None, baseline: bool = False,
                    needs_layers: bool = False) -> Callable[[type], type]:
    """Class decorator: the method ``name`` (see the module docstring)."""

    def deco(cls: type) -> type:
        old = _REGISTRY.get(name)
        if old is not None and old.cls.__qualname__ != cls.__qualname__:
            raise ValueError(f"method {name!r} is registered already ({old.cls.__module__}.{old.cls.__qualname__})")
        if section is not None:
            register_section(name, section)
        cls.name = name
        _REGISTRY[name] = MethodInfo(name, cls, label, section, baseline, needs_layers)
        return cls

    return deco


def method_info(name: str) -> MethodInfo:
    info = _REGISTRY.get(name)
    if info is None:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=2)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ConfigError(f"unknown method {name!r}; {hint}known methods: {', '.join(_REGISTRY)}")
    return info


def list_methods() -> list[str]:
    return list(_REGISTRY)


def adversarial_baselines() -> list[str]:
    return [n for n, i in _REGISTRY.items() if i.baseline and n != "standard"]


def label(name: str) -> str:
    """A method's label for reports; an unknown name (a run of another version) as it is."""
    info = _REGISTRY.get(name)
    return info.label if info is not None else name
