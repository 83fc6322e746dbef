"""Training methods, one file each, behind one interface (:class:`Method`), registered by name
(:mod:`clat.methods.registry`: adding a method is one new file)."""

from __future__ import annotations

from clat.config.schema import Config
from clat.base.errors import ConfigError
from clat.layers.discovery import Layer
# Imported in the order of the docs, which is the order they register in: the order of `clat methods` and of the
# method sections in a saved config (each method's file imports only methods before it).
from clat.methods.standard import Standard
from clat.methods.pgd_at import PGDAT
from clat.methods.trades import TRADES
from clat.methods.mart import MART
from clat.methods.awp import AWP
from clat.methods.fast_at import FastAT
from clat.methods.score import SCORE
from clat.methods.clat import CLAT
from clat.methods.rift import RiFT
from clat.methods.lora import LoRA
from clat.methods.base import AdversarialMethod, EpochContext, Method
from clat.methods.registry import (METHODS as REGISTRY, BuildContext, MethodInfo, adversarial_baselines, label, list_methods, method_info,
                                   register_method)

# The methods of this release, in the order of the docs (a method registered later is in list_methods()).
METHODS: list[str] = list_methods()


def method_class(name: str) -> type[Method]:
    """The class behind a method name (its module's docstring describes it)."""
    return method_info(name).cls


def create_method(name: str, cfg: Config, layers: list[Layer] | None = None, *, zoo_model: str | None = None,
                  default_k: int | None = None) -> Method:
    """Build a method by name from the run config. CLAT, RiFT and LoRA need the model's ``layers``; CLAT's
    number of layers when ``clat.k`` is not set is ``default_k``, else the paper's for the ``zoo_model``
    (None: a model of the user's), see :func:`clat.methods.clat.default_k`."""
    info = method_info(name)
    if info.needs_layers and layers is None:
        raise ValueError(f"{info.label} needs the model's layers")
    return info.cls.from_config(BuildContext(cfg, layers, zoo_model, default_k))


__all__ = ["AWP", "AdversarialMethod", "BuildContext", "CLAT", "ConfigError", "EpochContext", "FastAT", "LoRA", "MART", "Method",
           "MethodInfo", "PGDAT", "RiFT", "SCORE", "Standard", "TRADES", "adversarial_baselines", "create_method", "label", "list_methods",
           "method_class", "method_info", "register_method", "METHODS", "REGISTRY"]
