"""Training methods, one file each, behind one interface (:class:`Method`)."""

from __future__ import annotations

from clat.config import Config
from clat.errors import ConfigError
from clat.layers import Layer
from clat.methods.awp import AWP
from clat.methods.base import AdversarialMethod, EpochContext, Method
from clat.methods.clat import CLAT
from clat.methods.clat import default_k as clat_default_k
from clat.methods.fast_at import FastAT
from clat.methods.lora import LoRA
from clat.methods.mart import MART
from clat.methods.pgd_at import PGDAT
from clat.methods.rift import RiFT
from clat.methods.score import SCORE
from clat.methods.standard import Standard
from clat.methods.trades import TRADES

# Baselines: full-model methods usable alone or as the "X" of "X + CLAT".
BASE_METHODS: dict[str, type[Method]] = {
    "standard": Standard, "pgd_at": PGDAT, "trades": TRADES, "mart": MART, "awp": AWP, "fast_at": FastAT, "score": SCORE,
}
# Fine-tuning methods that need the model's layers.
LAYER_METHODS: dict[str, type[Method]] = {"clat": CLAT, "rift": RiFT, "lora": LoRA}
METHODS: list[str] = [*BASE_METHODS, *LAYER_METHODS]


def method_class(name: str) -> type[Method]:
    """The class behind a method name (its module's docstring describes it)."""
    cls = BASE_METHODS.get(name) or LAYER_METHODS.get(name)
    if cls is None:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return cls


def list_methods() -> list[str]:
    return list(METHODS)


def _base(name: str, cfg: Config) -> Method:
    if name == "trades":
        return TRADES(cfg.attack, cfg.trades.beta, cfg.trades.attack_mode)
    if name == "mart":
        return MART(cfg.attack, cfg.mart.beta, cfg.mart.attack_mode)
    if name == "score":
        return SCORE(cfg.attack, cfg.score.beta)
    if name == "awp":
        inner = _base(cfg.awp.base, cfg)
        assert isinstance(inner, AdversarialMethod)
        return AWP(cfg.attack, inner, cfg.awp.gamma, cfg.awp.warmup)
    return BASE_METHODS[name](cfg.attack)


def create_method(name: str, cfg: Config, layers: list[Layer] | None = None, *, zoo_model: str | None = None,
                  default_k: int | None = None) -> Method:
    """Build a method by name from the run config. CLAT, RiFT and LoRA need the model's ``layers``; CLAT's
    number of layers when ``clat.k`` is not set is ``default_k``, else the paper's for the ``zoo_model``
    (None: a model of the user's), see :func:`clat.methods.clat.default_k`."""
    if name in BASE_METHODS:
        return _base(name, cfg)
    if name == "clat":
        if layers is None:
            raise ValueError("CLAT needs the model's layers")
        base = None
        if cfg.clat.ce_on == "base":
            base_name = cfg.clat.base or cfg.pretrain.method
            if base_name not in BASE_METHODS or base_name == "standard":
                raise ConfigError(f"clat.ce_on=base needs clat.base (or pretrain.method) to be an adversarial baseline: "
                                  f"{', '.join(b for b in BASE_METHODS if b != 'standard')}; got {base_name!r}")
            base = _base(base_name, cfg)
        k = default_k if default_k is not None else clat_default_k(layers, zoo_model)
        return CLAT(cfg.attack, cfg.clat, layers, default_k=k, base=base)
    if name == "lora":
        if layers is None:
            raise ValueError("LoRA needs the model's layers")
        return LoRA(cfg.attack, cfg.lora, layers)
    if name == "rift":
        if layers is None:
            raise ValueError("RiFT needs the model's layers")
        return RiFT(cfg.attack, cfg.rift, layers)
    raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")


__all__ = ["AWP", "AdversarialMethod", "CLAT", "EpochContext", "FastAT", "LoRA", "MART", "Method", "PGDAT", "RiFT", "SCORE", "Standard",
           "TRADES", "create_method", "list_methods", "method_class", "METHODS", "BASE_METHODS", "LAYER_METHODS"]
