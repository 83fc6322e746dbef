"""A run's best epoch and early stopping, both decided on the held-out PGD accuracy.

The metric is ``val.pgd_acc`` of ``metrics.jsonl``: the PGD-``eval.steps`` accuracy on the first
``eval.n_examples`` validation images, measured every ``eval.every`` epochs and at the last one. It is
always measured with the clean accuracy, so there is no fallback: a run without held-out evaluation
(``data.val_size`` or ``eval.n_examples`` 0) keeps no best weights, and its summary says so.

Both decisions are a function of the rows alone (:class:`ValHistory`), rebuilt from ``metrics.jsonl``
when a run resumes, so a resumed run takes the same ones as an uninterrupted run. ``best/`` is written
before the epoch's checkpoint: a run killed in between redoes the epoch, and writes it again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from clat.base.errors import ClatError
from clat.runs.checkpoint import atomic_write_text, save_weights, sha256

if TYPE_CHECKING:
    from torch import nn

    from clat.runs.folder import RunDir

METRIC = "val.pgd_acc"
NO_BEST = "no held-out evaluation (data.val_size or eval.n_examples is 0): no best epoch was tracked"


@dataclass
class ValHistory:
    """The held-out evaluations seen so far: the best one (ties keep the earlier epoch) and early stopping's count."""

    patience: int | None = None
    min_delta: float = 0.0
    best: dict | None = None  # {"epoch" (1-based), "metric", "value", "clean_acc", "stage", "method"}
    ref: float | None = None  # early stopping's reference: the last value that beat the one before it by more than min_delta
    wait: int = 0  # evaluations since ``ref``

    @classmethod
    def of(cls, rows: list[dict], early_stop=None) -> "ValHistory":
        h = cls(early_stop.patience, early_stop.min_delta) if early_stop is not None else cls()
        for r in rows:
            h.add(r)
        return h

    def add(self, row: dict) -> bool:
        """Take an epoch's metrics row; True when it is the new best."""
        v = row.get("val")
        if not v:
            return False
        acc = v["pgd_acc"]
        if self.ref is None or acc > self.ref + self.min_delta:
            self.ref, self.wait = acc, 0
        else:
            self.wait += 1
        if self.best is not None and acc <= self.best["value"]:
            return False
        self.best = {"epoch": row["epoch"], "metric": METRIC, "value": acc, "clean_acc": v["clean_acc"], "stage": row["stage"],
                     "method": row["method"]}
        return True

    @property
    def stopped(self) -> bool:
        """Early stopping's verdict: ``patience`` evaluations in a row without an improvement by more than ``min_delta``."""
        return self.patience is not None and self.wait >= self.patience

    def summary(self, epochs_done: int, epochs: int) -> dict:
        """The fields ``summary.json`` gets: the best epoch, and where the run stopped if that was early."""
        b = self.best
        out = {"best_epoch": b and b["epoch"], "best_metric": METRIC, "best_value": b and b["value"],
               "best_clean_acc": b and b["clean_acc"]}
        if b is None:
            out["best_note"] = NO_BEST
        out["stopped_early"] = epochs_done < epochs
        if out["stopped_early"]:
            out.update(epochs_done=epochs_done, early_stop={"patience": self.patience, "min_delta": self.min_delta})
        return out


def save_best(rd: "RunDir", model: "nn.Module", meta: dict, best: dict) -> None:
    """``best/``: the weights (as the final ones are saved), then ``best.json``, each written atomically; the
    weights' SHA-256 in ``best.json`` tells a reader whether both are of one epoch (a kill may fall between them)."""

    rd.record(rd.best_dir.name)  # recorded before it exists: a crash in between leaves no file clat forgot it wrote
    save_weights(rd.best_weights, model, {**meta, "best_epoch": best["epoch"]})
    atomic_write_text(rd.best_info_path, json.dumps({**best, "weights": rd.best_weights.name, "sha256": sha256(rd.best_weights)}, indent=2))


def read_best(rd: "RunDir") -> dict:
    """``best.json`` of a run, checked against the weights beside it; a one-line ClatError when there is none."""

    if not rd.best_info_path.is_file():
        why = ((rd.summary() or {}).get("best_note")
               or "it was trained by a clat without best checkpoints, or has not evaluated an epoch yet")
        raise ClatError(f"{rd.path} holds no best/ ({why}); evaluate its final weights instead (--which last)")
    info = rd.read_json(str(rd.best_info_path.relative_to(rd.path)))
    if not isinstance(info, dict) or not rd.best_weights.is_file() or sha256(rd.best_weights) != info.get("sha256"):
        raise ClatError(f"{rd.best_dir} was interrupted while being written (its weights and best.json disagree); "
                        f"`clat train --resume {rd.path}` writes it again")
    return info
