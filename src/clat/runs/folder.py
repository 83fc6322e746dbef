"""The run folder: what clat wrote there, who is writing there now, and its config.

A run folder (``clat train --run-dir``, ``clat demo --out``) holds clat's files beside whatever
else a user keeps there. This module owns the rules that keep the user's files safe:

- **Manifest** (``.clat-manifest.json``, :mod:`clat.runs.manifest`): every file or folder clat writes into a
  run folder is recorded there when it is written, with the command that made the folder; ``--force``
  removes exactly those entries and nothing else, and never replaces another command's folder.
- **Lock** (``.clat.lock``, :mod:`clat.runs.lock`): one process at a time writes into a run folder; a
  second is refused with a message naming the holder.
- **Config**: ``read_config`` is the one reader of a run's ``config.yaml`` (one-line errors); ``owner_of`` says
  which run a weights file belongs to, so a ``config.yaml`` near a file is used only when the file is that run's.
- **Layout**: nothing outside this module builds a path inside a run folder. ``metrics()`` reads ``metrics.jsonl``,
  ``checkpoints()`` owns ``checkpoints/epoch_NNNN/`` (write, list, prune, latest valid), ``summary()`` ``summary.json``.
- **Metrics** (:mod:`clat.runs.metrics`): a line of ``metrics.jsonl`` that is not a row is named, never
  dropped silently. **Health** of a checkpoint (:mod:`clat.runs.soundness`, recorded in its ``meta.json``):
  whether its loss and weights are sane, so that the advice after a divergence names a fix that works.

Run folder::

    config.yaml          resolved config
    metrics.jsonl        one JSON line per epoch
    checkpoints/epoch_NNNN/{model.safetensors, state.pt, meta.json}   (NNNN: the epoch, from 1, as in metrics.jsonl;
                         runs written before record schema 2 named them from 0: clat.base.run_records)
    model.safetensors    final weights (with model metadata)
    best/{model.safetensors, best.json}   weights of the best held-out PGD accuracy (clat.training.early_stop)
    summary.json         final metrics, selection history, best epoch, early stop
    metrics.csv, tensorboard/, wandb/     the loggers of ``log:`` (clat.training.callbacks)
    report.md, plots/    the report (``clat report``, and ``clat train`` at the end)
    eval*.json, criticality.json/.png, stability.json, transfer*.json/.png   results of the other commands
    .clat-manifest.json  what clat wrote here, and which command made the folder;  .clat.lock  the lock
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from clat.base.errors import ClatError, ConfigError
from clat.base.run_records import LEGACY, SCHEMA, checkpoint_epoch, current_summary, schema_of
from clat.base.versions import header
from clat.config.load import config_from_dict, dump_yaml, read_yaml
from clat.runs.checkpoint import atomic_write_text, save_state, save_weights, sha256
from clat.runs.lock import FolderLock, RunLocked  # noqa: F401  (RunLocked: re-exported for the clat.runs facade)
from clat.runs.manifest import MANIFEST, REPORT_FILES, RUN_FILES, Manifest
from clat.runs.metrics import MetricsFile

log = logging.getLogger("clat")

_TMP = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")  # clat.base.files.atomic_write's temporary names


class Checkpoints:
    """Epoch checkpoints in ``RUN/checkpoints``; ``meta.json`` (written last) holds the other files'
    SHA-256, so a partial or corrupted checkpoint is recognised. Epochs count from 1, as in metrics.jsonl: ``epoch_0002``
    holds the weights after epoch 2. A checkpoint written before record schema 2 is named from 0 (its ``meta.json`` has no
    ``schema``): it is found by its epoch all the same (:func:`clat.base.run_records.checkpoint_epoch`)."""

    def __init__(self, run_dir: Path, keep: int = 1) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def dir(self, *, epoch: int) -> Path:
        """The checkpoint folder of ``epoch`` (from 1): the one there (named from 0 in an older run), else ``epoch_NNNN``."""
        return next((d for d in self.list() if _epoch_of(d) == epoch), self.root / f"epoch_{epoch:04d}")

    def weights(self, *, epoch: int) -> Path:
        """The model weights saved after ``epoch`` (from 1)."""
        return self.dir(epoch=epoch) / "model.safetensors"

    def state(self, epoch_dir: Path) -> Path:
        return epoch_dir / "state.pt"

    def save(self, epoch: int, model, state: dict, meta: dict, health: dict | None = None) -> Path:
        """Write the checkpoint after ``epoch`` (from 1). ``meta.json`` also records the CPU thread count (a resume at another
        count is not bit-identical: ``--resume`` says so) and, given, the checkpoint's :func:`health`, with the
        epoch since which the checkpoints have been unsound (``unsound_since``)."""


        d = self.root / f"epoch_{epoch:04d}"
        for later in [x for x in self.list() if _epoch_of(x) >= epoch and x != d]:  # an abandoned future: resume skipped them (unloadable)
            shutil.rmtree(later)
        if health is not None:
            health = {**health, "unsound_since": None if health["sound"] else self._unsound_since(epoch, meta.get("stage"))}
        d.mkdir(parents=True, exist_ok=True)
        save_weights(d / "model.safetensors", model, meta)
        save_state(d / "state.pt", state)
        files = {n: sha256(d / n) for n in ("model.safetensors", "state.pt")}
        extra = {"cpu_threads": torch.get_num_threads(), **({"health": health} if health is not None else {})}
        atomic_write_text(d / "meta.json", json.dumps({"schema": SCHEMA, "epoch": epoch, "sha256": files, **meta, **extra}))
        for old in self.list()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return d

    def _unsound_since(self, epoch: int, stage: str | None) -> dict:
        """Where an unsound run of checkpoints began: the previous checkpoint's record if it was unsound too, else here."""
        prev = [d for d in self.list() if _epoch_of(d) < epoch]
        m = (self.meta(prev[-1]) or {}) if prev else {}
        h = m.get("health")
        if isinstance(h, dict) and h.get("sound") is False and isinstance(h.get("unsound_since"), dict):
            since = h["unsound_since"]
            return {**since, "epoch": since.get("epoch", 0) + 1} if schema_of(m, "checkpoint") == LEGACY else since
        return {"epoch": epoch, "stage": stage}

    def meta(self, d: Path) -> dict | None:
        """A checkpoint's ``meta.json`` (None if unreadable)."""
        try:
            m = json.loads((d / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        return m if isinstance(m, dict) else None

    def list(self) -> list[Path]:
        """The checkpoint folders, oldest epoch first."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.glob("epoch_*") if p.is_dir()), key=lambda p: (_epoch_of(p), p.name))

    def epochs(self) -> list[int]:
        """The epochs (from 1) that have a checkpoint folder."""
        return [e for e in map(_epoch_of, self.list()) if e >= 0]

    def prune(self, *, keep: set[int]) -> None:
        """Remove every epoch checkpoint but those of the epochs in ``keep`` (from 1)."""
        for d in self.list():
            if _epoch_of(d) >= 0 and _epoch_of(d) not in keep:
                shutil.rmtree(d)

    def latest_valid(self) -> Path | None:
        return next(self.valid(), None)

    def valid(self) -> Iterator[Path]:
        """The checkpoints whose files match their ``meta.json``, newest first; each one skipped is named in a warning."""

        for d in reversed(self.list()):
            try:
                meta = json.loads((d / "meta.json").read_text())
                if all(sha256(d / n) == h for n, h in meta["sha256"].items()):
                    yield d
                    continue
                problem = "checksum mismatch"
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                problem = type(e).__name__
            warnings.warn(f"checkpoint {d} is incomplete or corrupted ({problem}); falling back to the previous one", stacklevel=2)

    def loadable(self, load) -> tuple[Path, Any] | None:
        """The newest valid checkpoint that ``load(dir)`` reads (a ``ClatError`` says it cannot), with what it read. A
        checkpoint whose files match its checksums but cannot be loaded (written by another torch, or altered along
        with its meta.json) is skipped like a corrupted one: with a warning, for the previous one."""

        for d in self.valid():
            try:
                return d, load(d)
            except ClatError as e:
                warnings.warn(f"checkpoint {d} cannot be loaded ({e}); falling back to the previous one", stacklevel=2)
        return None


def _epoch_of(d: Path) -> int:
    """The epoch (from 1) of checkpoint folder ``d``: its ``meta.json``'s (schema 1: named and numbered from 0), else its
    name's (a folder without a readable meta.json: a partial write, or the weights alone that ``RunDir.export`` copies);
    -1 for a name that is not ``epoch_NNNN``."""
    if not d.name[6:].isdigit():
        return -1
    try:
        return checkpoint_epoch(json.loads((d / "meta.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ClatError):
        return int(d.name[6:])


class RunDir(Manifest, MetricsFile, FolderLock):
    """A run folder. It owns its layout (every path inside it: ``*_path``, ``*_dir``, :meth:`checkpoints`), its config
    (:meth:`read_config`, :meth:`owner_of`), the start of a run (:meth:`check_new`, :meth:`prepare`), its summary and
    :meth:`export`; the manifest (:class:`clat.runs.manifest.Manifest`), ``metrics.jsonl``
    (:class:`clat.runs.metrics.MetricsFile`) and the lock (:class:`clat.runs.lock.FolderLock`) are mixed in."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def checkpoints(self, keep: int = 1) -> Checkpoints:
        return Checkpoints(self.path, keep)

    def finished(self) -> bool:
        return self.summary_path.is_file()

    def summary(self) -> dict | None:
        """``summary.json`` in today's record schema (:func:`clat.base.run_records.current_summary`), None before the run finished."""
        return current_summary(self.read_json("summary.json")) if self.finished() else None

    def latest_weights(self) -> Path | None:
        """The final weights, else those of the latest epoch checkpoint."""
        if self.weights_path.is_file():
            return self.weights_path
        found = [d / "model.safetensors" for d in self.checkpoints().list() if (d / "model.safetensors").is_file()]
        return found[-1] if found else None

    def export(self, dst: str | Path, *, weights_of_epochs: set[int] = frozenset(), extra: tuple[str, ...] = ()) -> str:
        """A portable copy of this run in ``dst`` (replaced), to continue it in another session or on another
        machine: config, metrics, manifest and the ``extra`` files that exist; a finished run's summary and final
        weights, else its latest valid checkpoint, plus the weights alone of the epochs (from 1) in ``weights_of_epochs``.
        Returns what was copied: "finished", "checkpoint" or "" (nothing to copy yet)."""
        dst = Path(dst)
        ck = self.checkpoints()
        latest = None if self.finished() else ck.latest_valid()
        if not self.finished() and latest is None:
            return ""
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        names = ["config.yaml", "metrics.jsonl", "metrics.csv", MANIFEST,
                 *extra] + (["summary.json", "model.safetensors"] if self.finished() else [])
        for n in names:
            if (self.path / n).is_file():
                shutil.copy(self.path / n, dst / n)
        if self.best_dir.is_dir():  # the best epoch so far: a continued run compares with it
            shutil.copytree(self.best_dir, dst / self.best_dir.name)
        if latest is None:
            return "finished"
        out = Checkpoints(dst)
        shutil.copytree(latest, out.root / latest.name)  # its name and meta.json as they are (an older run's numbering too)
        for e in weights_of_epochs:
            if ck.dir(epoch=e) != latest and ck.weights(epoch=e).is_file():
                d = out.root / f"epoch_{e:04d}"  # no meta.json: its name says its epoch
                d.mkdir(parents=True, exist_ok=True)
                shutil.copy(ck.weights(epoch=e), d / "model.safetensors")
        return "checkpoint"

    # -- starting or continuing a run -------------------------------------------------------------
    def check_new(self, force: bool) -> None:
        """A new run may start here: nothing there yet, or (``force``) only what clat wrote. Checks only:
        nothing is removed before the whole configuration has been validated (then :meth:`prepare`)."""
        maker = self.made_by()
        if maker not in (None, "train"):
            raise ConfigError(f"{self.path} holds {self.describe()}, not a training run; clat train never replaces it"
                              f"{', --force or not' if force else ''}: choose another --run-dir")
        present = [f for f in (*RUN_FILES, *REPORT_FILES) if (self.path / f).exists()]
        if present:
            foreign = self.foreign(present)
            if foreign:
                raise ConfigError(f"run folder {self.path} holds {', '.join(foreign)} that clat did not write"
                                  f"{' (it is not a clat run)' if not self.holds_run() else ''}; "
                                  "clat never replaces files it did not write: move them, or choose another --run-dir")
            if not force:
                state = "a finished run" if self.finished() else "an unfinished run (continue it with --resume)"
                raise ConfigError(f"run folder {self.path} already holds {state}; choose another --run-dir or pass --force to overwrite it")
        self.check_writable("train")

    def prepare(self, cfg, *, resume: bool, force: bool, changed: dict) -> None:
        """The folder made ready for the epochs, once everything is validated: a new run's config written (``force``:
        what clat wrote there before removed, nothing else); a resumed run's manifest completed, stale temporary
        files removed and ``--resume`` overrides recorded in its config."""

        self.path.mkdir(parents=True, exist_ok=True)
        if not resume:
            if force:
                gone = self.clear()
                if gone:
                    log.info("--force: removed %s from %s (what clat wrote there; nothing else)", ", ".join(gone), self.path)
            self.record(*RUN_FILES, made_by="train")
            atomic_write_text(self.config_path, header() + dump_yaml(cfg))
            return
        if not self.has_manifest():  # a run of clat 0.1: its own files, as they are now
            self.record(*[p.name for p in self.removable()], *RUN_FILES, made_by="train")
        elif "made_by" not in self._manifest():  # a manifest from before made_by: it did not list the report either
            self.record(*[p.name for p in self.removable()], made_by="train")
        stale = self.remove_stale_tmp()
        if stale:
            log.info("removed %d half-written temporary file(s) of an interrupted write", stale)
        if changed:
            atomic_write_text(self.config_path, header() + dump_yaml(cfg))
            log.info("--resume with %s (recorded in config.yaml and metrics.jsonl)",
                     ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()))

    # -- layout -------------------------------------------------------------------------------
    @property
    def weights_path(self) -> Path:
        """The final weights (written when the run finishes)."""
        return self.path / "model.safetensors"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def best_dir(self) -> Path:
        """The weights of the best epoch (``model.safetensors``) and which epoch it was (``best.json``)."""
        return self.path / "best"

    @property
    def best_weights(self) -> Path:
        return self.best_dir / "model.safetensors"

    @property
    def best_info_path(self) -> Path:
        return self.best_dir / "best.json"

    @property
    def csv_path(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    @property
    def wandb_dir(self) -> Path:
        """Where ``wandb.init(dir=RUN)`` keeps its files, and clat the run's W&B id."""
        return self.path / "wandb"

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def has_manifest(self) -> bool:
        return self.manifest_path.is_file()

    def holds_run(self) -> bool:
        """A run (finished or not) of clat lives here."""
        return self.config_path.is_file() and (self.has_manifest() or self.is_legacy_run())

    def is_legacy_run(self) -> bool:
        """A run folder of clat 0.1 (no manifest): its config.yaml is a clat config and it has metrics."""
        if self.has_manifest() or not self.metrics_path.is_file():
            return False
        try:
            self.read_config()
        except ConfigError:
            return False
        return True

    def remove_stale_tmp(self) -> int:
        """Half-written temporary files of an interrupted write (``.name.XXXX.tmp``), anywhere in the run."""
        n = 0
        if self.path.is_dir():
            for p in self.path.rglob(".*.tmp"):
                if p.is_file() and _TMP.match(p.name):
                    p.unlink()
                    n += 1
        return n

    def read_json(self, name: str):
        """A JSON file of the run (``summary.json``, ...), with a one-line error when it is damaged."""
        p = self.path / name
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"could not read {p} ({type(e).__name__}: {str(e)[:120]}); the file is damaged") from None

    # -- config -------------------------------------------------------------------------------
    def read_config(self):
        """The run's config, validated; a ConfigError (one line) for anything else."""

        p = self.config_path
        data = read_yaml(p, missing=f"{self.path} holds no run (no config.yaml)", what=f"{p} is not a valid clat config: ")
        if not isinstance(data, dict):
            raise ConfigError(f"{p} is not a valid clat config: it must be a mapping of keys to values")
        try:
            return config_from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{p} is not a valid clat config: {e}") from None

    @staticmethod
    def owner_of(path: str | Path) -> "RunDir | None":
        """The run a weights file (or run folder) belongs to: ``RUN``, ``RUN/model.safetensors`` or
        ``RUN/checkpoints/epoch_N/model.safetensors`` or ``RUN/best/model.safetensors`` where RUN holds a clat run; else None."""
        p = Path(path)
        cands = [p] if p.is_dir() else []
        if p.is_file() and p.name == "model.safetensors":
            cands.append(p.parent)
            if p.parent.name == "best":
                cands.append(p.parent.parent)
            if p.parent.parent.name == "checkpoints" and re.fullmatch(r"epoch_\d+", p.parent.name):
                cands.append(p.parent.parent.parent)
        for c in cands:
            r = RunDir(c)
            if r.holds_run():
                return r
        return None


def record_output(path: str | Path) -> None:
    """Record a file a clat command wrote, in the manifest of the run folder it lies in (if any)."""
    p = Path(path).resolve()
    r = RunDir(p.parent)
    if r.holds_run():
        r.record(p)
