"""A small explicit model registry (timm's ``@register_model`` idea, without the magic)."""

from __future__ import annotations

import inspect
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from clat.base.errors import ConfigError
from clat.base.registry import Registry, is_spec, load_spec

# Channel statistics of the CIFAR training sets; used by the Normalize layer
# inside each model so that the model's input is plain [0, 1] pixels.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel. Buffers are not persistent, so state dicts
    stay compatible with the same architecture trained without it."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ConfigError(f"normalization needs one mean and one positive std per channel, got mean={mean}, std={std}")
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def default_normalization(num_classes: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return (CIFAR100_MEAN, CIFAR100_STD) if num_classes == 100 else (CIFAR10_MEAN, CIFAR10_STD)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Callable[..., nn.Module]
    default_k: int | None  # the paper's number of critical layers for this model (None: a model of the user's)
    description: str


# The model zoo (:class:`clat.base.registry.Registry`): ``@register_model`` in each model's file.
MODELS = Registry("model", "model.name")


def register_model(name: str, *, default_k: int, description: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """A decorator above a model's builder (``builder(num_classes=, normalize=)``): ``model.name=NAME`` builds it."""
    return MODELS.register(name, description=description, default_k=default_k)


def list_models() -> list[str]:
    """The zoo's models (and any registered with :func:`register_model`), sorted."""
    return sorted(n for n in MODELS.names() if not is_spec(n))


def is_factory(name: str) -> bool:
    """``package.module:factory``: a model the user's code builds (not the zoo's)."""
    return is_spec(name) and not name.startswith(PYTHON_MODEL)


# How a run records a model that was handed to ``clat.train(..., model=...)``: nothing can rebuild it from the name.
PYTHON_MODEL = "python:"


def model_info(name: str) -> ModelInfo:
    """The zoo's entry for ``name``, or one for a ``package.module:factory`` spec (imported here, so a typo fails now;
    the current folder is searched too, as ``python -m`` would, so ``model.name=mymodels:make_net`` finds
    ``./mymodels.py`` from the command line)."""
    if name.startswith(PYTHON_MODEL):
        raise ConfigError(f"model.name={name}: this run's model was handed to clat.train(model=...) from Python, so clat cannot rebuild "
                          f"it; "
                          f"pass the same model again (clat.train(None, RUN, resume=True, model=...)), or name it as "
                          f"model.name=package.module:factory "
                          "(docs/models.md)")
    if is_factory(name):
        factory = load_spec(name, what=f"model.name={name}", bad="neither a zoo model nor package.module:factory (e.g. mymodels:make_net)")
        if not callable(factory):
            raise ConfigError(f"model.name={name}: {name.partition(':')[2]} is not callable; "
                              "name a function or class that returns an nn.Module")
        MODELS.record(name, factory, description=f"built by {name}", default_k=None)  # (listed by `clat list`)
        return ModelInfo(name, factory, None, f"built by {name}")
    if name not in MODELS:
        raise MODELS.unknown(name)
    e = MODELS.entry(name)
    return ModelInfo(e.name, e.obj, e.extra["default_k"], e.description)


def _call_factory(name: str, factory: Callable[..., nn.Module], num_classes: int, norm: nn.Module,
                  user_kwargs: Mapping[str, Any]) -> nn.Module:
    """A user's factory is given ``num_classes`` (and clat's ``normalize`` module) if its signature takes them, and
    ``user_kwargs`` (``model.kwargs``). A TypeError from the call (a missing or unknown argument) is a one-line error."""

    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs: dict = dict(user_kwargs)
    if "num_classes" in params or var_kw:
        kwargs["num_classes"] = num_classes
    if "normalize" in params:
        kwargs["normalize"] = norm
    try:
        model = factory(**kwargs)
    except TypeError as e:
        frame = traceback.extract_tb(e.__traceback__)[-1]
        where = "" if frame.filename == __file__ else f" (raised at {Path(frame.filename).name}:{frame.lineno})"
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k != "normalize") or "no arguments"
        raise ConfigError(f"model.name={name}: {str(e).splitlines()[0] if str(e) else 'TypeError'}{where}; it was called with {given}: "
                          "give the factory's arguments as model.kwargs.NAME=VALUE (create_model(..., kwargs={...}) from Python)") from e
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name={name}: the factory returned {type(model).__name__}, not an nn.Module")
    return model


def create_model(
    name: str,
    num_classes: int = 10,
    *,
    normalize: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build a registered model, or call a ``package.module:factory`` (given ``num_classes=`` and ``normalize=``
    where its signature takes them; the model it returns must take [0, 1] images: put :class:`Normalize` first
    in it if it expects normalized ones). ``normalize=False`` gives a model that expects
    inputs already normalized by the caller (e.g. third-party checkpoints trained
    on raw [0, 1] pixels, such as the AutoAttack example ResNet-18). ``kwargs``: more keyword arguments of a
    ``package.module:factory`` (a run's ``model.kwargs``); the zoo's models take none."""
    info = model_info(name)
    if kwargs and not is_factory(name):
        raise ConfigError(f"model {name} takes no keyword arguments (got model.kwargs {', '.join(kwargs)}); "
                          "they are for package.module:factory models")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if normalize:
        dm, ds = default_normalization(num_classes)
        norm: nn.Module = Normalize(mean or dm, std or ds)
    else:
        norm = nn.Identity()
    if is_factory(name):
        return _call_factory(name, info.builder, num_classes, norm, kwargs or {})
    return info.builder(num_classes=num_classes, normalize=norm)
