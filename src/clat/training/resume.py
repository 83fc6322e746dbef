"""Where a resumed run continues: the newest checkpoint that loads, and the run's epoch it was written after (from 1, in
any record schema: :func:`clat.base.run_records.checkpoint_epoch`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from clat.base.run_records import checkpoint_epoch
from clat.runs.checkpoint import load_training_state, read_state_dict
from clat.runs.folder import RunDir
from clat.runs.soundness import note_thread_count

log = logging.getLogger("clat")


@dataclass
class Resumed:
    """The checkpoint a resumed run continues from, until the stage it belongs to has taken it."""

    weights: dict | None = None
    state: dict | None = None
    source: str = ""

    @property
    def epoch(self) -> int:
        """The run's epoch (from 1) the checkpoint was written after; 0 without one."""
        return checkpoint_epoch(self.state) if self.state is not None else 0

    @classmethod
    def latest(cls, rd: RunDir, device: torch.device | None = None) -> tuple["Resumed", int]:
        """The newest checkpoint that loads, and how many epochs are done (0: none, start from the beginning)."""
        ck = rd.checkpoints()
        found = ck.loadable(lambda d: (load_training_state(ck.state(d)), read_state_dict(d / "model.safetensors")))
        if found is None:
            log.warning("no valid checkpoint in %s: starting from the beginning", rd.path)
            return cls(), 0
        d, (state, weights) = found
        out = cls(weights, state, str(d))
        log.info("resuming %s after epoch %d", rd.path, out.epoch)
        note_thread_count(rd, d, device)
        return out, out.epoch
