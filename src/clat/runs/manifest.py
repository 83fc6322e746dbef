"""The manifest of a run folder (``.clat-manifest.json``): what clat wrote there, and which command made the folder.

Every file or folder clat writes into a run folder is recorded in its manifest when it is written (``record``,
``recording``): the run's files, its report and plots, evaluations, criticality, stability and transfer results. The
manifest also says which command made the folder (``made_by``: ``train``, ``demo``), so that ``--force`` of one command
never replaces another's folder. ``--force`` removes exactly the recorded entries and nothing else (``clear``); a folder
whose files clat did not write is never emptied. Folders written by clat 0.1, which kept no manifest, are recognised by
their ``config.yaml`` (a valid clat config) and ``metrics.jsonl``, and only clat's own file names are removed from them;
manifests written before ``made_by`` existed did not list the report that ``clat train`` renders, which is recognised
by its first line. :class:`clat.runs.folder.RunDir` is a :class:`Manifest`.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path
from typing import Iterator

from clat.base.errors import ConfigError
from clat.runs.checkpoint import atomic_write_text

MANIFEST = ".clat-manifest.json"
LOCK = ".clat.lock"
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "model.safetensors", "summary.json")
REPORT_FILES = ("report.md", "plots")  # a run's report: rendered by `clat report` and at the end of `clat train`
# what clat 0.1 wrote into a run folder (it kept no manifest): removed by --force from such a folder only
LEGACY_OUTPUTS = ("report.md", "plots", "criticality.json", "criticality.png", "stability.json", "comparison")
LEGACY_PATTERNS = (r"eval.*\.json", r"transfer.*\.(json|png)")


def plain_name(n: object) -> bool:
    """A name of an entry of the folder itself, never a path out of it."""
    return isinstance(n, str) and n not in ("", ".", "..") and "/" not in n and "\\" not in n and "\0" not in n


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


class Manifest:
    """The manifest's part of a run folder (mixed into :class:`clat.runs.folder.RunDir`, whose ``path``, ``manifest_path``,
    ``config_path``, ``has_manifest``, ``holds_run``, ``is_legacy_run`` and ``finished`` it uses)."""

    path: Path

    def _manifest(self) -> dict:
        """The manifest's content ({} where there is none); a one-line error when it is damaged."""
        if not self.has_manifest():
            return {}
        try:
            data = json.loads(self.manifest_path.read_text())
            names = data["written"]
            if not isinstance(names, list) or not all(plain_name(n) for n in names):
                raise ValueError  # entries are names of this folder, never paths out of it
            if not isinstance(data.get("made_by", ""), str):
                raise ValueError
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"{self.manifest_path} is damaged (it lists what clat wrote here); "
                              "remove it by hand if the folder holds no run") from None
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
            state = "a finished" if self.finished() else "an unfinished"
            return f"{state} training run (made by `clat train`{'' if self.has_manifest() else ' of clat 0.1'})"
        if maker == "demo":
            return "a demo (made by `clat demo`)"
        if maker:
            return f"the output of `clat {maker}`"
        return "files of your own (clat did not make this folder)"

    def record(self, *names: str | Path, made_by: str | None = None) -> None:
        """Add entries (files or folders, relative to the run folder, or paths inside it) to the manifest; ``made_by``:
        the command that makes the folder (kept from the first command that says so)."""

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
            if not parts or not plain_name(parts[0]) or parts[0] in (MANIFEST, LOCK):
                continue
            new.append(parts[0])
        merged = list(dict.fromkeys([*have, *new]))
        maker = data.get("made_by") or made_by
        if merged != have or maker != data.get("made_by"):
            self.path.mkdir(parents=True, exist_ok=True)
            data = {"written": merged, "by": "clat", **({"made_by": maker} if maker else {})}
            atomic_write_text(self.manifest_path, json.dumps(data, indent=1))

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
