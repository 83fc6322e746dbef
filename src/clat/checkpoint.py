"""Saving and loading weights and training state, safely and atomically.

- Weights: safetensors, with the model's name, classes and normalization in the
  file's metadata, so ``clat eval model.safetensors`` needs nothing else.
- Training state (optimizer, schedule, RNG, method state): ``torch.save`` of plain
  containers, read back with ``weights_only=True``: loading never executes code.
- Every file is written to a temporary name, flushed, fsync'ed and renamed.
- Third-party ``.pt``/``.pth`` state dicts load with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import nn

from clat.errors import CheckpointError


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write ``path`` via a temporary file in the same folder, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), "w")


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(path: str | Path, model: nn.Module, meta: dict | None = None) -> None:
    """Model weights (parameters and persistent buffers) as safetensors, ``meta`` in its header."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"clat": json.dumps(meta or {})}
    atomic_write(path, lambda f: f.write(_safetensors_bytes(state, metadata)))


def _safetensors_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save(state, metadata=metadata)


def read_metadata(path: str | Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); is it truncated or of another format?") from None
    try:
        return json.loads(meta.get("clat", "{}"))
    except json.JSONDecodeError:
        return {}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a ``.pt``/``.pth`` file (``weights_only=True``).

    Common wrappers are unwrapped (``{"state_dict": ...}``, ``{"model": ...}``) and a
    ``module.`` prefix left by DataParallel is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); was the write interrupted?")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); is it truncated?") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it holds objects other than tensors and plain containers ({str(e).splitlines()[0][:200]}). "
            "clat never runs code from a checkpoint; re-save its state_dict() with torch.save or safetensors"
        ) from None
    except Exception as e:  # corrupted zip, wrong format
        raise CheckpointError(f"could not read checkpoint {path} ({type(e).__name__}: {str(e)[:200]}); is it a PyTorch or safetensors file?") from None
    for key in ("state_dict", "model_state_dict", "model", "net"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """``model.load_state_dict(state)`` with an error that says what does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[0]})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise CheckpointError(
            f"{source} does not fit this model: {'; '.join(parts)}. Check the model name and num_classes it was saved with"
        )
    model.load_state_dict(state)


def save_state(path: str | Path, state: dict) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load_state(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"could not read training state {path} ({type(e).__name__}); the checkpoint is corrupted") from None


def find_weights(path: str | Path) -> Path:
    """The weights file of a run folder (final, else its latest checkpoint) or the file itself."""
    path = Path(path)
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            return path / "model.safetensors"
        ckpts = sorted((path / "checkpoints").glob("epoch_*/model.safetensors"))
        if ckpts:
            return ckpts[-1]
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
    """Build the model a checkpoint was saved for and load it. Returns ``(model, meta)``.

    clat's safetensors files carry the model name and classes; for a plain state dict
    (``.pt``/``.pth``) give ``model_name`` (and ``num_classes`` if not 10).
    """
    from clat.models import create_model

    weights = find_weights(path)
    meta = read_metadata(weights) if weights.suffix == ".safetensors" else {}
    name = model_name or meta.get("model")
    if not name or meta.get("custom") and not model_name:
        raise CheckpointError(f"{weights} does not say which model it holds; pass --model NAME (see `clat models`)")
    n_cls = num_classes or meta.get("num_classes") or 10
    norm = normalize if normalize is not None else meta.get("normalize", True)
    model = create_model(name, n_cls, normalize=norm)
    load_into(model, read_state_dict(weights), source=str(weights))
    meta = {**meta, "model": name, "num_classes": n_cls, "normalize": norm, "path": str(weights)}
    return model.to(device), meta
