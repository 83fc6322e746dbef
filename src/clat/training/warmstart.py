"""A run's ``init`` checkpoint: loaded into the model before training, its classifier started afresh on request
(``init_reset_head=true``: fine-tuning a model trained on another number of classes)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from clat.base.errors import ConfigError
from clat.data.loader import to_unit_float
from clat.layers.discovery import Layer, find_layers
from clat.models import create_model
from clat.runs.checkpoint import adapt_state_dict, load_into, read_state_dict

log = logging.getLogger("clat")


def classifier_name(model: nn.Module, num_classes: int) -> str | None:
    """The model's classifier: its last ``nn.Linear`` with ``num_classes`` outputs (None: it has none)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    return names[-1] if names else None


def load_init(model: nn.Module, path: str | Path, num_classes: int, reset_head: bool = False) -> None:
    """A run's ``init`` checkpoint loaded into ``model``. A classifier with another number of classes is an error that
    names ``init_reset_head``; with ``reset_head`` the classifier keeps the model's fresh initialisation (said in the
    log) and everything else is loaded."""
    source = f"init checkpoint {path}"
    state = read_state_dict(path)
    head = classifier_name(model, num_classes)
    if head is None:
        if reset_head:
            raise ConfigError(f"init_reset_head=true, but the model has no nn.Linear with {num_classes} outputs (its classifier) to reset")
        return load_into(model, state, source)
    own = model.state_dict()
    keys = tuple(k for k in (f"{head}.weight", f"{head}.bias") if k in own)
    adapted, _ = adapt_state_dict(model, state, source)
    theirs = adapted.get(f"{head}.weight")
    # only another number of outputs is another number of classes; any other difference (another architecture) is load_into's error
    if theirs is not None and theirs.dim() == 2 and theirs.shape[0] != num_classes and not reset_head:
        raise ConfigError(f"{source} has a classifier {head!r} with {theirs.shape[0]} outputs, the model {num_classes} classes: "
                          "set init_reset_head=true to start that layer fresh and load everything else")
    load_into(model, state, source, keep=keys if reset_head else ())
    if reset_head:
        was = f"{theirs.shape[0]} classes" if theirs is not None else "absent"
        log.info("%s: loaded all but the classifier %r (there %s), which starts freshly initialised for %d classes", source, head, was,
                 num_classes)


def build_model(cfg, num_classes: int, device="cpu"):
    """The zoo model a run config (:class:`clat.config.schema.Config`) names, with ``init=`` loaded, on ``device``."""
    if cfg.model.num_classes is not None and cfg.model.num_classes != num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the data set has {num_classes} classes; drop the override")
    model = create_model(cfg.model.name, num_classes, normalize=cfg.model.normalize, kwargs=cfg.model.kwargs)
    if cfg.init:
        load_init(model, cfg.init, num_classes, reset_head=cfg.init_reset_head)
    return model.to(device)


def run_layers(model: nn.Module, cfg, images: torch.Tensor) -> list[Layer]:
    """The layers of a run's model as its training found them: traced on two of ``images`` (the run's data, on the
    model's device) with the run's ``model.merge_norms``. Training, ``clat criticality`` and the layer oracle all
    find a run's layers here, so they rank the same layers."""
    return find_layers(model, to_unit_float(images[:2]), merge_norms=cfg.model.merge_norms)
