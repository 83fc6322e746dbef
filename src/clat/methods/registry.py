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

and it trains (``finetune.method=my_at``), is listed by ``clat methods`` (and ``clat list methods``) and labelled in
reports. In a file of your own (``mymethods.py``), name it as ``finetune.method=mymethods:MyAT``: the config imports the
module before it reads the keys, so its section (``my_at.beta=2``) is known. ``tests/test_methods.py`` registers one
from the test itself, ``tests/test_extensions.py`` from a file of its own.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from clat.base.errors import ConfigError
from clat.base.registry import Entry, Registry, is_spec, load_spec
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
        return describe(self.cls, self.label)


def describe(cls: type, label: str) -> str:
    """A method's description: the first line of its class's docstring, else of its module's (one file per method)."""
    doc = cls.__dict__.get("__doc__") or getattr(sys.modules.get(cls.__module__), "__doc__", None) or ""
    return doc.strip().splitlines()[0] if doc.strip() else label


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

        info = _info(name)
        return dataclasses.asdict(getattr(self.cfg, name)) if info is not None and info.section is not None else {}

    def baseline(self, name: str, needed_by: str) -> Method:
        """The full-model baseline ``name`` built from the same config (the X that AWP or CLAT wraps)."""
        info = _info(name)
        if info is None or not info.baseline or name == "standard":
            raise ConfigError(f"{needed_by} needs an adversarial baseline: {', '.join(adversarial_baselines())}; got {name!r}")
        return info.cls.from_config(BuildContext(self.cfg, None, self.zoo_model, self.default_k))


# The training methods (:class:`clat.base.registry.Registry`), in the order they were registered: the order of
# `clat methods` and of the method sections in a saved config.
METHODS = Registry("method", "pretrain.method, finetune.method")


def register_method(name: str, *, label: str, section: type | None = None, baseline: bool = False,
                    needs_layers: bool = False) -> Callable[[type], type]:
    """Class decorator: the method ``name`` (see the module docstring)."""

    def deco(cls: type) -> type:
        if section is not None:
            register_section(name, section)
        METHODS.add(name, cls, description=describe(cls, label), label=label, section=section, baseline=baseline, needs_layers=needs_layers)
        cls.name = name
        return cls

    return deco


def _as_info(e: Entry) -> MethodInfo:
    x = e.extra
    return MethodInfo(e.name, e.obj, x["label"], x["section"], x["baseline"], x["needs_layers"])


def _info(name: str) -> MethodInfo | None:
    if is_spec(name):
        return method_info(name)
    return _as_info(METHODS.entry(name)) if name in METHODS else None


def method_info(name: str) -> MethodInfo:
    """The method ``name``: a registered one, or ``package.module:Class`` (a :class:`Method` of the user's, imported
    here; registered with :func:`register_method` in its file, it is that entry, else its class attributes ``label``,
    ``baseline`` and ``needs_layers`` say what :func:`register_method` would)."""
    if not is_spec(name):
        if name not in METHODS:
            raise METHODS.unknown(name)
        return _as_info(METHODS.entry(name))
    cls = load_spec(name, what=f"method {name}")  # its file's own registrations happen now
    if not (isinstance(cls, type) and hasattr(cls, "from_config")):
        raise ConfigError(f"method {name}: {name.partition(':')[2]} is not a training method; name a subclass of clat.Method")
    known = [e for e in METHODS if e.obj is cls and not is_spec(e.name)]
    if known:  # registered by its file: the same method under its own name
        return _as_info(known[0])
    lab = getattr(cls, "label", cls.__name__)
    if "name" not in cls.__dict__:  # (not a baseline's name inherited: its config section is not this method's)
        cls.name = name
    return _as_info(METHODS.record(name, cls, description=describe(cls, lab), label=lab, section=None,
                                  baseline=getattr(cls, "baseline", False), needs_layers=getattr(cls, "needs_layers", False)))


def list_methods() -> list[str]:
    """The registered methods, in the order they were registered."""
    return [n for n in METHODS.names() if not is_spec(n)]


def adversarial_baselines() -> list[str]:
    return [n for n in list_methods() if _as_info(METHODS.entry(n)).baseline and n != "standard"]


def label(name: str) -> str:
    """A method's label for reports; an unknown name (a run of another version) as it is."""
    info = _info(name)
    return info.label if info is not None else name
