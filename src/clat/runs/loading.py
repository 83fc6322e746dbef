"""A model from a run folder (its final weights, else its latest checkpoint) or from a weights file: :func:`load_model`."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from torch import nn

from clat.base.errors import CheckpointError
from clat.models import create_model
from clat.runs.checkpoint import load_into, read_metadata, read_state_dict
from clat.runs.folder import RunDir


def find_weights(path: str | Path) -> Path:
    """The weights file of a run folder (final, else its latest checkpoint) or the file itself."""
    path = Path(path)
    if path.is_dir():
        found = RunDir(path).latest_weights()
        if found is not None:
            return found
        raise CheckpointError(f"{path} is a folder without model.safetensors or checkpoints/; point at a run folder or a weights file")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def load_model(
    path: str | Path,
    *,
    model_name: str | None = None,
    num_classes: int | None = None,
    normalize: bool | None = None,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, dict]:
    """Build the model a checkpoint was saved for and load it. Returns ``(model, meta)``, the model in eval
    mode (as RobustBench's ``load_model``; call ``model.train()`` to train it further).

    clat's safetensors files carry the model name and classes; for a plain state dict
    (``.pt``/``.pth``) give ``model_name`` (and ``num_classes`` if not 10).
    """
    weights = find_weights(path)
    meta = read_metadata(weights) if weights.suffix == ".safetensors" else {}
    _check_meta(meta, weights)
    name = model_name or meta.get("model")
    if not name or meta.get("custom") and not model_name:
        raise CheckpointError(f"{weights} does not say which model it holds; pass --model NAME (see `clat models`)")
    n_cls = num_classes or meta.get("num_classes") or 10
    norm = normalize if normalize is not None else meta.get("normalize", True)
    model = create_model(name, n_cls, normalize=norm, mean=meta.get("mean") if norm else None, std=meta.get("std") if norm else None,
                         kwargs=meta.get("kwargs"))
    load_into(model, read_state_dict(weights), source=str(weights))
    bad = [k for k, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        warnings.warn(f"{weights} holds non-finite weights (NaN or inf) in {len(bad)} tensor(s), e.g. {bad[0]}: every accuracy measured "
                      "on it is meaningless (did its training diverge?)", stacklevel=2)
    meta = {**meta, "model": name, "num_classes": n_cls, "normalize": norm, "path": str(weights)}
    return model.to(device).eval(), meta


def _check_meta(meta: dict, path: Path) -> None:
    """The fields clat reads from a safetensors header have the types it expects (a crafted header stops here)."""
    def bad(field: str, what: str) -> CheckpointError:
        return CheckpointError(f"{path}: metadata field {field!r} must be {what}, got {meta.get(field)!r}; the file was not written by "
                               f"clat "
                               "or was altered (pass --model NAME to load its weights alone)")

    if "model" in meta and not (isinstance(meta["model"], str) and meta["model"]):
        raise bad("model", "a model name")
    if "num_classes" in meta and not (isinstance(meta["num_classes"], int) and not isinstance(meta["num_classes"],
                                                                                              bool) and meta["num_classes"] >= 1):
        raise bad("num_classes", "a positive integer")
    if "normalize" in meta and not isinstance(meta["normalize"], bool):
        raise bad("normalize", "true or false")
    if "kwargs" in meta and not (isinstance(meta["kwargs"], dict) and all(isinstance(k, str) and k.isidentifier() for k in meta["kwargs"])):
        raise bad("kwargs", "a mapping of keyword arguments")
    for f in ("mean", "std"):
        v = meta.get(f)
        if v is not None and not (isinstance(v, list) and 1 <= len(v) <= 4 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                                                    and math.isfinite(x) for x in v)):
            raise bad(f, "a list of 1-4 finite numbers")
    if "std" in meta and meta["std"] is not None and min(meta["std"]) <= 0:
        raise bad("std", "positive")
