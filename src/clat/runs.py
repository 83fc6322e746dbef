"""The run folder: what clat wrote there, who is writing there now, and its config.

A run folder (``clat train --run-dir``, ``clat demo --out``) holds clat's files beside whatever
else a user keeps there. This module owns the rules that keep the user's files safe:

- **Manifest** (``.clat-manifest.json``): every file or folder clat writes into a run folder is
  recorded there when it is written (``record``, ``recording``): the run's files, its report
  and plots, evaluations, criticality, stability and transfer results. It also says which
  command made the folder (``made_by``: ``train``, ``demo``), so that ``--force`` of one command
  never replaces another's folder. ``--force`` removes exactly the recorded entries and nothing
  else (``clear``); a folder whose files clat did not write is never emptied. Folders written by
  clat 0.1, which kept no manifest, are recognised by their ``config.yaml`` (a valid clat
  config) and ``metrics.jsonl``, and only clat's own file names are removed from them; manifests
  written before ``made_by`` existed did not list the report that ``clat train`` renders, which is
  recognised by its first line.
- **Lock** (``.clat.lock``): one process at a time trains in, resumes or writes results into a
  run folder (``lock``): an exclusive ``flock`` held for the whole command, so the operating
  system releases it when the process ends, however it ends (kill -9 included: the next
  command finds the file unlocked and takes it over); a second process is refused with a
  message naming the holder. (On a platform without ``fcntl.flock`` there is no lock.)
- **Config**: ``read_config`` is the one reader of a run's ``config.yaml`` (one-line errors for
  invalid YAML, refused tags, unknown keys); ``owner_of`` says which run a weights file belongs
  to, so a ``config.yaml`` found near a file is used only when the file is that run's.
- **Layout**: nothing outside this module builds a path inside a run folder. ``metrics()`` is the
  one reader of ``metrics.jsonl``, ``checkpoints()`` owns ``checkpoints/epoch_NNNN/`` (write,
  list, prune, latest valid, the weights of an epoch), ``summary()`` reads ``summary.json``.
- **Metrics**: a line of ``metrics.jsonl`` that is not a row (cut by a crash, or damaged) is never
  dropped silently: ``read_metrics`` names it, ``clat report`` says which epochs it shows, and
  ``--resume`` says what it does with it.
- **Health** of a checkpoint (``meta.json``): the epoch's loss, the largest parameter magnitude,
  and whether both are sane (:func:`health`), so that the advice after a divergence names a
  checkpoint that can really be continued.

Run folder::

    config.yaml          resolved config
    metrics.jsonl        one JSON line per epoch
    checkpoints/epoch_NNNN/{model.safetensors, state.pt, meta.json}   (NNNN: 0-based epoch)
    model.safetensors    final weights (with model metadata)
    best/{model.safetensors, best.json}   weights of the best held-out PGD accuracy (clat.best)
    summary.json         final metrics, selection history, best epoch, early stop
    metrics.csv, tensorboard/, wandb/     the loggers of ``log:`` (clat.callbacks)
    report.md, plots/    the report (``clat report``, and ``clat train`` at the end)
    eval*.json, criticality.json/.png, stability.json, transfer*.json/.png   results of the other commands
    .clat-manifest.json  what clat wrote here, and which command made the folder;  .clat.lock  the lock
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from clat.errors import ConfigError

log = logging.getLogger("clat")

MANIFEST = ".clat-manifest.json"
LOCK = ".clat.lock"
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "model.safetensors", "summary.json")
REPORT_FILES = ("report.md", "plots")  # a run's report: rendered by `clat report` and at the end of `clat train`
# what clat 0.1 wrote into a run folder (it kept no manifest): removed by --force from such a folder only
LEGACY_OUTPUTS = ("report.md", "plots", "criticality.json", "criticality.png", "stability.json", "comparison")
LEGACY_PATTERNS = (r"eval.*\.json", r"transfer.*\.(json|png)")
_TMP = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")  # clat.checkpoint.atomic_write's temporary names
# A checkpoint is sound when its epoch's loss is finite and every parameter is finite and at most this many times
# the largest magnitude at the start of the run (or 1, if that is smaller). Training keeps weights within a small
# factor of their initial scale (a trained model's largest |w| here is 1.0-1.1 from 1.0 at initialization); a run
# whose learning rate is 100x too high reaches 5e4-2e15 within an epoch, while its loss can stay finite (BatchNorm
# makes the loss blind to the scale of the weights before it), so the loss alone cannot tell.
WEIGHT_GROWTH_LIMIT = 1000.0


def _plain_name(n: object) -> bool:
    return isinstance(n, str) and n not in ("", ".", "..") and "/" not in n and "\\" not in n and "\0" not in n


class RunLocked(ConfigError):
    """Another process holds the run folder."""


class Checkpoints:
    """Epoch checkpoints in ``RUN/checkpoints``; ``meta.json`` (written last) holds the other files'
    SHA-256, so a partial or corrupted checkpoint is recognised. Epochs are 0-based here."""

    def __init__(self, run_dir: Path, keep: int = 1) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def dir(self, epoch: int) -> Path:
        return self.root / f"epoch_{epoch:04d}"

    def weights(self, epoch: int) -> Path:
        """The model weights saved after (0-based) ``epoch``."""
        return self.dir(epoch) / "model.safetensors"

    def state(self, epoch_dir: Path) -> Path:
        return epoch_dir / "state.pt"

    def save(self, epoch: int, model, state: dict, meta: dict, health: dict | None = None) -> Path:
        """Write epoch ``epoch``'s checkpoint. ``meta.json`` also records the CPU thread count (a resume at another
        count is not bit-identical: ``--resume`` says so) and, given, the checkpoint's :func:`health`, with the
        epoch since which the checkpoints have been unsound (``unsound_since``)."""
        import torch

        from clat.checkpoint import atomic_write_text, save_state, save_weights, sha256

        for later in [d for d in self.list() if _epoch_of(d) > epoch]:  # an abandoned future: resume skipped them (unloadable)
            shutil.rmtree(later)
        if health is not None:
            health = {**health, "unsound_since": None if health["sound"] else self._unsound_since(epoch, meta.get("stage"))}
        d = self.dir(epoch)
        d.mkdir(parents=True, exist_ok=True)
        save_weights(d / "model.safetensors", model, meta)
        save_state(d / "state.pt", state)
        files = {n: sha256(d / n) for n in ("model.safetensors", "state.pt")}
        extra = {"cpu_threads": torch.get_num_threads(), **({"health": health} if health is not None else {})}
        atomic_write_text(d / "meta.json", json.dumps({"epoch": epoch, "sha256": files, **meta, **extra}))
        for old in self.list()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return d

    def _unsound_since(self, epoch: int, stage: str | None) -> dict:
        """Where an unsound run of checkpoints began: the previous checkpoint's record if it was unsound too, else here."""
        prev = [d for d in self.list() if _epoch_of(d) < epoch]
        h = (self.meta(prev[-1]) or {}).get("health") if prev else None
        if isinstance(h, dict) and h.get("sound") is False and isinstance(h.get("unsound_since"), dict):
            return h["unsound_since"]
        return {"epoch": epoch, "stage": stage}

    def meta(self, d: Path) -> dict | None:
        """A checkpoint's ``meta.json`` (None if unreadable)."""
        try:
            m = json.loads((d / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        return m if isinstance(m, dict) else None

    def list(self) -> list[Path]:
        return sorted(p for p in self.root.glob("epoch_*") if p.is_dir()) if self.root.is_dir() else []

    def epochs(self) -> list[int]:
        return [int(p.name[6:]) for p in self.list() if p.name[6:].isdigit()]

    def prune(self, keep_epochs: set[int]) -> None:
        """Remove every epoch checkpoint but those of ``keep_epochs`` (0-based)."""
        for d in self.list():
            if d.name[6:].isdigit() and int(d.name[6:]) not in keep_epochs:
                shutil.rmtree(d)

    def latest_valid(self) -> Path | None:
        return next(self.valid(), None)

    def valid(self) -> Iterator[Path]:
        """The checkpoints whose files match their ``meta.json``, newest first; each one skipped is named in a warning."""
        from clat.checkpoint import sha256

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
        from clat.errors import ClatError

        for d in self.valid():
            try:
                return d, load(d)
            except ClatError as e:
                warnings.warn(f"checkpoint {d} cannot be loaded ({e}); falling back to the previous one", stacklevel=2)
        return None


def _signature(p: Path) -> tuple | None:
    """What tells that a file or folder changed: size, mtime and inode; of a folder, those of its entries."""
    def one(q: Path) -> tuple:
        st = q.lstat()
        return (q.name, st.st_size, st.st_mtime_ns, st.st_ino)

    try:
        if p.is_dir() and not p.is_symlink():
            return tuple(sorted(one(c) for c in p.iterdir()))
        return one(p)
    except OSError:
        return None


def _epoch_of(d: Path) -> int:
    return int(d.name[6:]) if d.name[6:].isdigit() else -1


def weight_scale(model) -> float:
    """The largest parameter magnitude of ``model`` (inf or nan when a parameter is not finite): one read-back."""
    import torch

    with torch.no_grad():
        peaks = [p.detach().abs().max().float().cpu() for p in model.parameters() if p.numel()]
        return float(torch.stack(peaks).max()) if peaks else 0.0


def health(model, loss: float | None, start_scale: float) -> dict:
    """Whether a checkpoint can be continued: the epoch's training loss is finite and every parameter is finite and
    at most ``WEIGHT_GROWTH_LIMIT`` times the run's largest magnitude at its start (``start_scale``, at least 1)."""
    import math

    peak, limit = weight_scale(model), WEIGHT_GROWTH_LIMIT * max(1.0, start_scale)
    sound = loss is not None and math.isfinite(loss) and math.isfinite(peak) and peak <= limit
    return {"loss": loss, "max_abs_param": peak, "limit": limit, "sound": sound}


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def checkpoints(self, keep: int = 1) -> Checkpoints:
        return Checkpoints(self.path, keep)

    def finished(self) -> bool:
        return self.summary_path.is_file()

    def summary(self) -> dict | None:
        return self.read_json("summary.json") if self.finished() else None

    def latest_weights(self) -> Path | None:
        """The final weights, else those of the latest epoch checkpoint."""
        if self.weights_path.is_file():
            return self.weights_path
        found = [d / "model.safetensors" for d in self.checkpoints().list() if (d / "model.safetensors").is_file()]
        return found[-1] if found else None

    def export(self, dst: str | Path, *, weights_of: set[int] = frozenset(), extra: tuple[str, ...] = ()) -> str:
        """A portable copy of this run in ``dst`` (replaced), to continue it in another session or on another
        machine: config, metrics, manifest and the ``extra`` files that exist; a finished run's summary and final
        weights, else its latest valid checkpoint, plus the weights alone of the 0-based epochs in ``weights_of``.
        Returns what was copied: "finished", "checkpoint" or "" (nothing to copy yet)."""
        dst = Path(dst)
        ck = self.checkpoints()
        latest = None if self.finished() else ck.latest_valid()
        if not self.finished() and latest is None:
            return ""
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        names = ["config.yaml", "metrics.jsonl", "metrics.csv", MANIFEST, *extra] + (["summary.json", "model.safetensors"] if self.finished() else [])
        for n in names:
            if (self.path / n).is_file():
                shutil.copy(self.path / n, dst / n)
        if self.best_dir.is_dir():  # the best epoch so far: a continued run compares with it
            shutil.copytree(self.best_dir, dst / self.best_dir.name)
        if latest is None:
            return "finished"
        out = Checkpoints(dst)
        shutil.copytree(latest, out.dir(int(latest.name[6:])))
        for e in weights_of:
            if ck.dir(e) != latest and ck.weights(e).is_file():
                out.dir(e).mkdir(parents=True, exist_ok=True)
                shutil.copy(ck.weights(e), out.weights(e))
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
        from clat.checkpoint import atomic_write_text
        from clat.config import dump_yaml
        from clat.provenance import header

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
            log.info("--resume with %s (recorded in config.yaml and metrics.jsonl)", ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()))

    # -- metrics.jsonl: the one reader and writer ----------------------------------------------
    def metrics(self) -> list[dict[str, Any]]:
        """The epoch rows; a line that is not a row (see :meth:`read_metrics`) is skipped, never the rows after it."""
        return self.read_metrics()[0]

    def read_metrics(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The epoch rows, and a description of each line that is not one: a line cut by a crash (the last one, only
        ever: a resume rewrites the file), or one damaged since. Each description names the line, what it holds and
        where it stood (after which epoch's row)."""
        rows, bad = self._read_metrics()
        return rows, [b for b, _ in bad]

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

    def append_metrics(self, row: dict) -> None:
        """One line more. A write that fails (a full disk) leaves the file as it was, with no partial line, and stops with
        a one-line error that names the file and the fix."""
        from clat.errors import CheckpointError

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
        from clat.checkpoint import atomic_write_text

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

    # -- manifest -----------------------------------------------------------------------------
    def _manifest(self) -> dict:
        """The manifest's content ({} where there is none); a one-line error when it is damaged."""
        if not self.has_manifest():
            return {}
        try:
            data = json.loads(self.manifest_path.read_text())
            names = data["written"]
            if not isinstance(names, list) or not all(_plain_name(n) for n in names):
                raise ValueError  # entries are names of this folder, never paths out of it
            if not isinstance(data.get("made_by", ""), str):
                raise ValueError
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"{self.manifest_path} is damaged (it lists what clat wrote here); remove it by hand if the folder holds no run") from None
        return data

    def written(self) -> list[str]:
        """Names (relative to the folder) that clat wrote here, per the manifest."""
        return list(self._manifest().get("written", []))

    def made_by(self) -> str | None:
        """The clat command that made this folder (``train``, ``demo``), per the manifest; for a manifest written before
        it said so, what its entries show; None for a folder without a manifest."""
        data = self._manifest()
        if not data:
            return "train" if self.is_legacy_run() else None
        if data.get("made_by"):
            return data["made_by"]
        names = set(data["written"])
        return "train" if "config.yaml" in names else "demo" if {"results.json", "pretrain"} & names else None

    def describe(self) -> str:
        """What this folder holds, in words, for messages that refuse to replace it."""
        maker = self.made_by()
        if maker == "train":
            state = "finished" if self.finished() else "unfinished"
            return f"a{'n' if state == 'unfinished' else ''} {state} training run (made by `clat train`{'' if self.has_manifest() else ' of clat 0.1'})"
        if maker == "demo":
            return "a demo (made by `clat demo`)"
        if maker:
            return f"the output of `clat {maker}`"
        return "files of your own (clat did not make this folder)"

    def record(self, *names: str | Path, made_by: str | None = None) -> None:
        """Add entries (files or folders, relative to the run folder, or paths inside it) to the manifest; ``made_by``:
        the command that makes the folder (kept from the first command that says so)."""
        from clat.checkpoint import atomic_write_text

        data = self._manifest()
        have = list(data.get("written", []))
        new = []
        for n in names:
            p = Path(n)
            try:
                rel = p.resolve().relative_to(self.path.resolve()) if p.is_absolute() else p
            except ValueError:
                continue  # not inside this folder
            parts = rel.parts
            if not parts or not _plain_name(parts[0]) or parts[0] in (MANIFEST, LOCK):
                continue
            new.append(parts[0])
        merged = list(dict.fromkeys([*have, *new]))
        maker = data.get("made_by") or made_by
        if merged != have or maker != data.get("made_by"):
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.manifest_path, json.dumps({"written": merged, "by": "clat", **({"made_by": maker} if maker else {})}, indent=1))

    @contextlib.contextmanager
    def recording(self, *paths: str | Path) -> Iterator[None]:
        """Record ``paths`` (inside this run folder) in its manifest as the block that writes them ends, however it ends
        (an error or Ctrl-C included): each one the block created or changed. Nothing is recorded where no run lives."""
        paths_ = [Path(p) if Path(p).is_absolute() else self.path / p for p in paths]
        before = [_signature(p) for p in paths_]
        try:
            yield
        finally:
            changed = [p.resolve() for p, b in zip(paths_, before) if p.exists() and _signature(p) != b]
            if changed and self.holds_run():
                self.record(*changed)

    def removable(self) -> list[Path]:
        """What ``clear`` would remove: the manifest's entries (or clat 0.1's file names in a legacy run)."""
        if self.has_manifest():
            names = self.written()
            if "made_by" not in self._manifest() and "config.yaml" in names:
                names += self._unlisted_report()
        elif self.is_legacy_run():
            names = [*RUN_FILES, *LEGACY_OUTPUTS]
            names += [p.name for p in self.path.iterdir() if any(re.fullmatch(pat, p.name) for pat in LEGACY_PATTERNS)]
        else:
            names = []
        return [self.path / n for n in dict.fromkeys(names) if (self.path / n).exists()]

    def _unlisted_report(self) -> list[str]:
        """The report that ``clat train`` rendered into a run folder before the manifest listed it: ``report.md`` that
        begins as clat's run reports do, and ``plots/`` holding PNG files only, beside it."""
        rep, plots = self.path / "report.md", self.path / "plots"
        try:
            ours = rep.is_file() and not rep.is_symlink() and rep.read_text(errors="replace").startswith("# Run report: `")
        except OSError:
            ours = False
        if not ours:
            return []
        pngs = plots.is_dir() and not plots.is_symlink() and all(f.is_file() and f.suffix == ".png" for f in plots.iterdir())
        return ["report.md", *(["plots"] if pngs else [])]

    def foreign(self, names: tuple[str, ...] | list[str] = RUN_FILES) -> list[str]:
        """Which of ``names`` exist here without clat having written them (a user's own files)."""
        mine = {p.name for p in self.removable()}
        return [n for n in names if (self.path / n).exists() and n not in mine]

    def clear(self) -> list[str]:
        """Remove what clat wrote here (``--force``), keeping everything else; returns the names removed."""
        gone = []
        for p in self.removable():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            gone.append(p.name)
        if self.manifest_path.is_file():
            self.manifest_path.unlink()
        return gone

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
        from clat.config import config_from_dict, read_yaml

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

    def check_writable(self, command: str) -> None:
        """A one-line error, before anything is written, where ``command`` could not write into this folder."""
        parent = next((p for p in (self.path, *self.path.parents) if p.exists()), Path("."))
        if not os.access(parent, os.W_OK):
            raise ConfigError(f"cannot write into {self.path}: {parent} is not writable; {_elsewhere(command)}")

    # -- lock ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, command: str) -> Iterator[None]:
        """Hold the run folder exclusively for the block (see the module docstring). A folder this
        call had to create is removed again if nothing but the lock was written into it."""
        self.check_writable(command)  # before the lock, which is the first thing written
        created = not self.path.exists()
        lock_path = self.path / LOCK
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"cannot write into {self.path} ({e.strerror or e}); {_elsewhere(command)}") from None
        try:
            import fcntl
        except ImportError:  # no flock on this platform: no lock (documented)
            fcntl = None
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
                    raise RunLocked(f"run folder {self.path} is in use by {holder}; wait for it to finish (or stop it) and try again") from None
        except BaseException:
            os.close(fd)  # not ours: leave the holder's file as it is
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"`clat {command}` (pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})".encode(), 0)
            yield
        finally:
            # A run folder keeps its (unlocked) lock file: unlinking it could let two processes lock two files
            # under one name. A folder that holds no run afterwards (a start that failed its checks) is left as
            # it was found: without the lock file, and removed again if this call created it.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # an idle run folder's lock file is empty (it names the holder while held)
                if not self.holds_run():
                    lock_path.unlink()
                    if created and not any(self.path.iterdir()):
                        self.path.rmdir()
            os.close(fd)  # releases the flock


def _elsewhere(command: str) -> str:
    """The fix for an unwritable folder, in the words of ``command``'s options."""
    if command == "train --resume":
        return "copy the run folder to a writable place and resume it there"
    return f"choose another {'--run-dir' if command == 'train' else '--out'}"


def record_output(path: str | Path) -> None:
    """Record a file a clat command wrote, in the manifest of the run folder it lies in (if any)."""
    p = Path(path).resolve()
    r = RunDir(p.parent)
    if r.holds_run():
        r.record(p)
