"""Saving and loading weights and training state, safely and atomically.

- Weights: safetensors, with the model's name, classes and normalization in the
  file's metadata, so ``clat eval model.safetensors`` needs nothing else.
- Training state (optimizer, schedule, RNG, method state): ``torch.save`` of plain
  containers, read back with ``weights_only=True``: loading never executes code.
- Every file is written to a temporary name, flushed, fsync'ed and renamed.
- Third-party ``.pt``/``.pth`` state dicts load with ``weights_only=True``.
- Public checkpoints in other layouts (RobustBench, DataParallel, ``torch.compile``)
  are adapted by :func:`adapt_state_dict`: wrappers and key prefixes are removed,
  the input normalization they carry as buffers (``mu``/``sigma``, ``mean``/``std``,
  ``normalize.mean``/``normalize.std``) is moved into the model's ``Normalize``
  module, and keys the model declares unused are dropped; anything else that does
  not fit is an error naming it.
"""

from __future__ import annotations

import io
import json
import logging
import math
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save
from torch import nn

from clat.base.errors import CheckpointError
from clat.base.files import atomic_write, atomic_write_text, sha256  # noqa: F401  (part of this module's interface)
from clat.models.registry import Normalize

log = logging.getLogger("clat")


def _normalizers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, Normalize)]


def save_weights(path: str | Path, model: nn.Module, meta: dict | None = None) -> None:
    """Model weights (parameters and persistent buffers) as safetensors, ``meta`` in its header.

    The input normalization of the model's ``Normalize`` module (non-persistent
    buffers, so not among the weights) is recorded in the metadata as ``mean`` and
    ``std``, so that a model fine-tuned from a checkpoint with its own normalization
    (e.g. a RobustBench model) loads back with it."""
    state, aliases = _unshare(model.state_dict())
    meta = dict(meta or {})
    if aliases:
        meta["aliases"] = aliases
    norms = _normalizers(model)
    if len(norms) == 1 and "mean" not in meta:
        meta["mean"] = [float(v) for v in norms[0].mean.flatten()]
        meta["std"] = [float(v) for v in norms[0].std.flatten()]
    metadata = {"clat": json.dumps(meta)}
    atomic_write(path, lambda f: f.write(_safetensors_bytes(state, metadata)))


def _unshare(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors stores no two names for one tensor: a module kept under two attribute names
    (weight sharing) is saved once and its other names recorded as aliases; tensors that
    share memory otherwise (views of one another) are saved as copies."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for k, v in state.items():
        v = v.detach()
        if v.device.type != "meta" and v.numel():
            ptr = v.untyped_storage().data_ptr()
            ident = (ptr, v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
            if ident in seen:
                aliases[k] = seen[ident]
                continue
            seen[ident] = k
            if ptr in storages:
                v = v.clone()
            storages.add(ptr)
        out[k] = v.contiguous().cpu()
    return out, aliases


def _safetensors_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    return save(state, metadata=metadata)


def read_metadata(path: str | Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); is it truncated or of another format?") from None
    try:
        d = json.loads(meta.get("clat", "{}"))
    except json.JSONDecodeError:
        return {}
    return d if isinstance(d, dict) else {}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a ``.pt``/``.pth`` file (``weights_only=True``).

    Common wrappers are unwrapped (``{"state_dict": ...}``, ``{"model": ...}``, RobustBench's
    ``{"last": ...}``, nested at most twice) and a
    ``module.`` prefix left by DataParallel is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); was the write interrupted?")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); is it truncated?") from None
        aliases = read_metadata(path).get("aliases") or {}
        if not isinstance(aliases, dict) or not all(isinstance(a, str) and isinstance(t, str) and t in state for a, t in aliases.items()):
            raise CheckpointError(f"{path} has malformed 'aliases' metadata (names of shared tensors); re-save the model")
        return {**state, **{a: state[t] for a, t in aliases.items()}}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason, refused = _weights_only_refusal(e)
        what = f"the global {refused}, which is not a tensor or plain container" if refused else \
            "objects other than tensors and plain containers"
        raise CheckpointError(
            f"refused to load {path}: it holds {what} (torch's weights-only loader: \"{reason}\"). "
            "clat never runs code from a checkpoint; re-save its state_dict() with torch.save or safetensors"
        ) from None
    except Exception as e:  # corrupted zip, wrong format
        raise CheckpointError(f"could not read checkpoint {path} ({type(e).__name__}: {str(e)[:200]}); is it a PyTorch or safetensors "
                              f"file?") from None
    for _ in range(2):  # e.g. {"last": {"state_dict": ...}}
        for key in ("state_dict", "model_state_dict", "model", "net", "last"):
            if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _weights_only_refusal(e: Exception) -> tuple[str, str | None]:
    """torch's reason for refusing a file under ``weights_only=True``, whole, on one line (its text after
    "WeightsUnpickler error:", without the advice to load with ``weights_only=False``), and the global it refused."""

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    reason = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else text
    reason = reason.split("Check the documentation of torch.load", 1)[0]
    reason = " ".join(reason.split()) or "no reason given"
    refused = re.search(r"GLOBAL (\S+)", text)
    return reason, refused.group(1) if refused else None


# names under which public checkpoints keep the input normalization (RobustBench: ``mu``/``sigma``
# or ``mean``/``std`` buffers, ``normalize.mean``; Madry's robustness: ``normalizer.new_mean``)
_MEAN_NAMES = ("mu", "mean", "new_mean")
_STD_NAMES = ("sigma", "std", "new_std")


def _best_prefix(own: set[str], keys: list[str]) -> str:
    """The key prefix (``module.``, ``model.``, ``_orig_mod.``, ``1.`` …) whose removal
    makes the most checkpoint keys name entries of the model; ``""`` if none beats none."""
    counts: dict[str, int] = {"": sum(k in own for k in keys)}
    for k in keys:
        for i, ch in enumerate(k):
            if ch == "." and k[i + 1 :] in own:
                counts[k[: i + 1]] = counts.get(k[: i + 1], 0) + 1
    return max(counts, key=lambda p: (counts[p], p == ""))


def adapt_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict]:
    """Fit a third-party state dict to ``model``; returns ``(state, notes)``.

    - a common key prefix is removed (``module.`` of DataParallel, ``model.``,
      ``_orig_mod.`` of ``torch.compile``, ``1.`` of ``nn.Sequential(normalizer, model)``);
    - normalization buffers the model does not have (``mu``/``sigma``, ``mean``/``std``,
      ``normalize.mean``/``normalize.std``, ``normalizer.new_mean``/``new_std``) are taken
      out and returned as ``notes["normalization"] = (mean, std)``;
    - keys under the model's ``unused_checkpoint_prefixes`` (e.g. the never-used
      ``sub_block1`` of TRADES' WideResNet) are dropped (``notes["dropped"]``);
    - ``num_batches_tracked`` entries missing from old (PyTorch < 0.4.1) files are
      filled from the model.
    What still does not fit is left for :func:`load_into` to report.
    """
    own = model.state_dict()
    notes: dict = {}
    if state.keys() == own.keys():
        return state, notes
    prefix = _best_prefix(set(own), list(state))
    if prefix:
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        state = {**{k: v for k, v in state.items() if not k.startswith(prefix)}, **stripped}
        notes["prefix"] = prefix
    extra = [k for k in state if k not in own]
    # input normalization kept as buffers
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k in extra:
        parent, _, leaf = k.rpartition(".")
        if leaf in _MEAN_NAMES + _STD_NAMES and state[k].numel() <= 4 and state[k].is_floating_point():
            pairs.setdefault(parent, {})["mean" if leaf in _MEAN_NAMES else "std"] = state[k]
    found = {p: v for p, v in pairs.items() if set(v) == {"mean", "std"}}
    if found:
        values = [(tuple(v["mean"].flatten().tolist()), tuple(v["std"].flatten().tolist())) for v in found.values()]
        if any(not _close(values[0], v) for v in values[1:]):
            where = ", ".join(p or "<top level>" for p in found)
            raise CheckpointError(f"{source} holds several different input normalizations ({where}): {values}")
        notes["normalization"] = values[0]
        notes["normalization_keys"] = sorted(
            k for k in extra if k.rpartition(".")[0] in found and k.rpartition(".")[2] in _MEAN_NAMES + _STD_NAMES
        )
        state = {k: v for k, v in state.items() if k not in notes["normalization_keys"]}
    unused = tuple(getattr(model, "unused_checkpoint_prefixes", ()))
    if unused:
        dropped = [k for k in state if k not in own and k.startswith(unused)]
        if dropped:
            notes["dropped"] = dropped
            state = {k: v for k, v in state.items() if k not in dropped}
    filled = [k for k in own if k not in state and k.endswith("num_batches_tracked")]
    if filled and len(filled) < len(own):
        state = {**state, **{k: own[k] for k in filled}}
        notes["filled"] = filled
    return state, notes


def _close(a: tuple, b: tuple) -> bool:
    return len(a[0]) == len(b[0]) and all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-7) for x, y in zip(a[0] + a[1], b[0] + b[1]))


def _apply_normalization(model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], source: str) -> None:
    norms = _normalizers(model)
    if len(norms) == 1:
        n = norms[0]
        if len(mean) != n.mean.numel() or len(std) != n.std.numel():
            raise CheckpointError(f"{source} normalizes {len(mean)} input channels but the model's Normalize has {n.mean.numel()}")
        if min(std) <= 0:
            raise CheckpointError(f"{source} holds an input normalization with a non-positive std {std}")
        with torch.no_grad():
            n.mean.copy_(torch.tensor(mean, dtype=n.mean.dtype).view_as(n.mean))
            n.std.copy_(torch.tensor(std, dtype=n.std.dtype).view_as(n.std))
        log.info("%s: input normalization mean=%s std=%s taken from the checkpoint", source, mean, std)
        return
    if _close((mean, std), (tuple(0.0 for _ in mean), tuple(1.0 for _ in std))):
        return  # the identity: nothing to apply
    what = "no Normalize module (built with normalize=False, or a custom model)" if not norms else f"{len(norms)} Normalize modules"
    raise CheckpointError(
        f"{source} carries an input normalization (mean={list(mean)}, std={list(std)}) that its weights were trained with, "
        f"but the model has {what} to take it. Build the model with normalization inside "
        "(create_model(..., normalize=True); drop --no-normalize / model.normalize=false), or normalize inputs yourself and "
        "remove those entries from the state dict"
    )


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint", keep: tuple[str, ...] = ()) -> None:
    """``model.load_state_dict(state)`` after :func:`adapt_state_dict`, with an error that says
    what does not fit. A normalization carried by the checkpoint replaces the model's. ``keep``: the model's
    entries that keep their own values (a classifier that starts fresh: ``clat.training.warmstart.load_init``)."""
    state, notes = adapt_state_dict(model, state, source)
    own = model.state_dict()
    state = {**{k: v for k, v in state.items() if k not in keep}, **{k: own[k] for k in keep}}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
                  if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[0]})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if notes.get("prefix"):
            parts.append(f"after removing the key prefix {notes['prefix']!r}")
        raise CheckpointError(
            f"{source} does not fit this model: {'; '.join(parts)}. Check the model name and num_classes it was saved with"
        )
    if "normalization" in notes:
        _apply_normalization(model, *notes["normalization"], source=source)
    if notes.get("dropped"):
        log.info("%s: dropped %d entries the model does not use (%s …)", source, len(notes["dropped"]), notes["dropped"][0])
    model.load_state_dict(state)


def save_state(path: str | Path, state: dict) -> None:
    # serialized in memory first: a full disk then fails in the plain write (an OSError, reported in one line)
    # rather than inside torch.save's zip writer (a RuntimeError)
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, lambda f: f.write(buf.getbuffer()))


def load_state(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"could not read training state {path} ({type(e).__name__}); the checkpoint is corrupted") from None


def load_training_state(path: str | Path) -> dict:
    """A checkpoint's training state; a one-line error for a file that is not one (even where its checksum matches)."""
    state = load_state(path)
    if not (isinstance(state, dict) and isinstance(state.get("epoch"), int) and isinstance(state.get("stage"), str) and "rng" in state):
        raise CheckpointError(f"{path} is not a clat training state (no epoch, stage and RNG); the checkpoint is damaged")
    return state
