"""Whether a checkpoint can be continued, and the advice after a divergence that names a fix that works.

A checkpoint is *sound* when its epoch's training loss is finite and every parameter is finite and at most
``WEIGHT_GROWTH_LIMIT`` times the largest magnitude at the start of the run (or 1, if that is smaller). The loss alone
cannot tell: BatchNorm makes the loss blind to the scale of the weights before it, so a learning rate far too high can
explode the weights (to ~1e17) while the loss stays finite, and only a later stage's loss becomes NaN. Each
checkpoint's ``meta.json`` records its health (:func:`health`, written by :class:`clat.runs.folder.Checkpoints`) and the
epoch and stage since which the checkpoints have been unsound; :func:`divergence_advice` reads them.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from clat.base.run_records import LEGACY, schema_of

if TYPE_CHECKING:
    from clat.runs.folder import RunDir

log = logging.getLogger("clat")

# Training keeps weights within a small factor of their initial scale (a trained model's largest |w| here is 1.0-1.1
# from 1.0 at initialization); a run whose learning rate is 100x too high reaches 5e4-2e15 within an epoch.
WEIGHT_GROWTH_LIMIT = 1000.0


def weight_scale(model) -> float:
    """The largest parameter magnitude of ``model`` (inf or nan when a parameter is not finite): one read-back."""
    with torch.no_grad():
        peaks = [p.detach().abs().max().float().cpu() for p in model.parameters() if p.numel()]
        return float(torch.stack(peaks).max()) if peaks else 0.0


def health(model, loss: float | None, start_scale: float) -> dict:
    """Whether a checkpoint can be continued: the epoch's training loss is finite and every parameter is finite and
    at most ``WEIGHT_GROWTH_LIMIT`` times the run's largest magnitude at its start (``start_scale``, at least 1)."""
    peak, limit = weight_scale(model), WEIGHT_GROWTH_LIMIT * max(1.0, start_scale)
    sound = loss is not None and math.isfinite(loss) and math.isfinite(peak) and peak <= limit
    return {"loss": loss, "max_abs_param": peak, "limit": limit, "sound": sound}


def lower_lr(lr: float) -> str:
    """The learning rate to suggest after a divergence: a tenth, and at most 0.1 (the usual SGD rate of these models,
    the paper's), so that a rate far too high is not lowered ten times over."""
    return f"{min(lr / 10, 0.1):g}"


def divergence_advice(rd: "RunDir", cfg, epoch: int, name: str, loss: object) -> str:
    """The message after the loss of ``epoch`` (from 1; stage ``name``) became ``loss``: continue from the last
    checkpoint only if it is sound; else start again with a lower learning rate for the stage where the weights
    exploded (an earlier stage's, where it began there)."""
    lr = getattr(cfg, name).lr
    head = f"the training loss became {loss} in epoch {epoch} ({name} stage, {name}.lr={lr:g})"
    ck = rd.checkpoints()
    latest = ck.latest_valid()
    if latest is None:
        return (f"{head}; no checkpoint was written yet: start again with a lower learning rate, {name}.lr={lower_lr(lr)}, "
                "and --force (it replaces this run)")
    meta = ck.meta(latest) or {}
    h = meta.get("health")
    if not isinstance(h, dict) or h.get("sound") is not False:  # sound, or written before clat recorded it
        return (f"{head}; the last checkpoint ({latest.name}) is sound (finite loss and weights). Lower the learning rate and "
                f"continue from it: clat train --resume {rd.path} {name}.lr={lower_lr(lr)}")
    since = h.get("unsound_since") if isinstance(h.get("unsound_since"), dict) else {}
    stage = since.get("stage") if since.get("stage") in ("pretrain", "finetune") else name
    began = int(since["epoch"]) + (1 if schema_of(meta, "checkpoint") == LEGACY else 0) if "epoch" in since else epoch  # schema 1: from 0
    return (f"{head}; the weights had already exploded in epoch {began} ({stage} stage; largest magnitude "
            f"{h.get('max_abs_param', float('nan')):.3g} in {latest.name}, over the sound limit {h.get('limit', float('nan')):.3g}), so no "
            f"kept checkpoint can be continued: start again with a lower {stage}.lr and --force (it replaces this run), e.g. "
            f"clat train CONFIG {stage}.lr={lower_lr(getattr(cfg, stage).lr)} --force --run-dir {rd.path}")


def note_thread_count(rd: "RunDir", d: Path, device: torch.device | None) -> None:
    """A CPU run resumed at another thread count than its checkpoint's is exact only up to float rounding: say so
    (README, "Runs you can kill")."""
    then, now = (rd.checkpoints().meta(d) or {}).get("cpu_threads"), torch.get_num_threads()
    if device is not None and device.type == "cpu" and isinstance(then, int) and then != now:
        log.warning("%s was written with %d CPU threads and this process uses %d: the resumed run is not bit-identical to an uninterrupted "
                    "one (torch's CPU kernels split sums by thread count: float rounding, which training amplifies). "
                    "For a bit-identical resume, set OMP_NUM_THREADS=%d", d, then, now, then)
