"""What made a run: clat's, torch's and Python's versions and, when clat runs from a git checkout, its commit.
Recorded in every run's config.yaml (a comment) and summary.json."""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path

import torch

__version__ = "0.2.0"  # the package version (pyproject reads it here; clat.__version__ is this)


@functools.cache
def git_commit() -> str | None:
    """The commit of the checkout clat is imported from (``+dirty`` with uncommitted changes), else None
    (an installed wheel)."""
    src = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no", "--", "."],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


@functools.cache
def versions() -> dict[str, str | None]:
    return {"clat": __version__, "torch": torch.__version__, "python": platform.python_version(), "git_commit": git_commit()}


def header() -> str:
    """``# written by clat 0.2.0 (torch 2.13.0, python 3.11.9, git 1a2b3c4)`` for the top of a YAML file."""
    v = versions()
    git = f", git {v['git_commit']}" if v["git_commit"] else ""
    return f"# written by clat {v['clat']} (torch {v['torch']}, python {v['python']}{git})\n"
