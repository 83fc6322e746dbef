"""Training methods, one file each, behind one interface (:class:`Method`)."""

from __future__ import annotations

from typing import Callable

from torch import nn

from clat.config import Config
from clat.errors import ConfigError
from clat.layers import Layer
from clat.methods.base import EpochContext, Method
from clat.methods.clat import CLAT
from clat.methods.fast_at import FastAT
from clat.methods.pgd_at import PGDAT
from clat.methods.standard import Standard

# Baselines: full-model methods usable alone or as the "X" of "X + CLAT".
BASE_METHODS: dict[str, type[Method]] = {"standard": Standard, "pgd_at": PGDAT, "fast_at": FastAT}
METHODS: list[str] = [*BASE_METHODS, "clat"]


def list_methods() -> list[str]:
    return list(METHODS)


def create_method(name: str, cfg: Config, layers: list[Layer] | None = None, *, default_k: int = 1) -> Method:
    """Build a method by name from the run config. CLAT needs the model's ``layers``."""
    if name in BASE_METHODS:
        return BASE_METHODS[name](cfg.attack)
    if name == "clat":
        if layers is None:
            raise ValueError("CLAT needs the model's layers")
        base_name = cfg.clat.base or (cfg.pretrain.method if cfg.pretrain.method != "clat" else None)
        base = None
        if cfg.clat.ce_on == "base":
            if base_name not in BASE_METHODS:
                raise ConfigError(f"clat.base must be one of {', '.join(BASE_METHODS)}, got {base_name!r}")
            base = BASE_METHODS[base_name](cfg.attack)
        return CLAT(cfg.attack, cfg.clat, layers, default_k=default_k, base=base)
    raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")


__all__ = ["CLAT", "EpochContext", "FastAT", "Method", "PGDAT", "Standard", "create_method", "list_methods", "METHODS", "BASE_METHODS"]
