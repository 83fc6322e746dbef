"""``metrics.jsonl``, one JSON row per epoch (:class:`clat.base.run_records.MetricsRow`): its one reader and writer (mixed
into :class:`clat.runs.folder.RunDir`). Rows of any record schema are read; the readers return today's
(:func:`clat.base.run_records.current_row`); a resume keeps the rows before its checkpoint as they were written.

A line that is not a row (cut by a crash, or damaged since) is never dropped silently: ``read_metrics`` names it,
``clat report`` says which epochs it shows, and ``--resume`` says what it does with it. A row that cannot be appended
(a full disk) leaves the file as it was and stops with a one-line error that names the file and the fix.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

from clat.base.errors import CheckpointError
from clat.base.run_records import MetricsRow, current_row
from clat.runs.checkpoint import atomic_write_text

log = logging.getLogger("clat")


class MetricsFile:
    """The metrics part of a run folder (uses the folder's ``path`` and ``metrics_path``)."""

    path: Path

    def metrics(self) -> list[dict[str, Any]]:
        """The epoch rows (dicts in today's schema); a line that is not a row (see :meth:`read_metrics`) is skipped, never
        the rows after it."""
        return self.read_metrics()[0]

    def metric_rows(self) -> list[MetricsRow]:
        """The epoch rows, typed."""
        return [MetricsRow.from_dict(r) for r in self._read_metrics()[0]]

    def read_metrics(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The epoch rows, and a description of each line that is not one: a line cut by a crash (the last one, only
        ever: a resume rewrites the file), or one damaged since. Each description names the line, what it holds and
        where it stood (after which epoch's row)."""
        rows, bad = self._read_metrics()
        return [current_row(r) for r in rows], [b for b, _ in bad]

    def _read_metrics(self) -> tuple[list[dict[str, Any]], list[tuple[str, int]]]:
        """Rows, and (description, epoch of the row before it or 0) of each line that is not a row."""
        if not self.metrics_path.is_file():
            return [], []
        rows: list[dict[str, Any]] = []
        bad: list[tuple[str, int]] = []
        lines = self.metrics_path.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("epoch"), int) and not isinstance(row["epoch"], bool):
                rows.append(row)
                continue
            where = f"after epoch {rows[-1]['epoch']}'s row" if rows else "before any row"
            what = "not a metrics row (no epoch)" if row is not None else "cut short" if i == len(lines) else "not valid JSON"
            text = f"{line[:60]!r}{'…' if len(line) > 60 else ''}"
            bad.append((f"{self.metrics_path} line {i} ({where}) is {what}: {text}", rows[-1]["epoch"] if rows else 0))
        return rows, bad

    def append_metrics(self, row: MetricsRow | dict) -> None:
        """One line more. A write that fails (a full disk) leaves the file as it was, with no partial line, and stops with
        a one-line error that names the file and the fix."""

        row = row.to_dict() if isinstance(row, MetricsRow) else row
        existed = self.metrics_path.is_file()
        size = self.metrics_path.stat().st_size if existed else 0
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
        except OSError as e:
            with contextlib.suppress(OSError):
                if existed:
                    os.truncate(self.metrics_path, size)
                else:
                    self.metrics_path.unlink()
            raise CheckpointError(f"could not append epoch {row.get('epoch')}'s row to {self.metrics_path} ({e.strerror or e}); free some "
                                  f"disk space and continue with `clat train --resume {self.path}` (the epochs before are kept)") from None

    def truncate_metrics(self, epochs: int) -> None:
        """Keep only the rows of the first ``epochs`` epochs (those that have a checkpoint; resume rewrites the rest). A
        line that is not a row is dropped, and said so: a warning when it may have held one of the kept epochs."""

        if not self.metrics_path.is_file() and epochs == 0:
            return  # a new run: the file appears with its first row (a failed first epoch leaves none, empty or not)
        rows, bad = self._read_metrics()
        for b, before in bad:
            if before >= epochs:
                log.info("%s; --resume drops it: it belongs to an epoch after the checkpoint, which is trained again", b)
            else:
                warnings.warn(f"{b}; --resume drops it, so the row it held (of an epoch up to {epochs}, before the checkpoint) is "
                              "missing from metrics.jsonl, summary.json and the report; the weights are not affected", stacklevel=2)
        rows = [r for r in rows if r["epoch"] <= epochs]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))


def epoch_ranges(epochs: Sequence[int]) -> str:
    """The epochs that rows hold, as a reader says them: ``1, 3-5`` for [1, 3, 4, 5]."""
    out: list[list[int]] = []
    for e in sorted(set(epochs)):
        if out and e == out[-1][1] + 1:
            out[-1][1] = e
        else:
            out.append([e, e])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)
