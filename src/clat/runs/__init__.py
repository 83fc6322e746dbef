"""The run folder: layout, manifest, lock, metrics file, checkpoints and their soundness."""

from __future__ import annotations

from clat.runs.folder import (RunLocked, Checkpoints, RunDir, record_output)  # noqa: F401
from clat.runs.loading import (find_weights, load_model)  # noqa: F401

__all__ = ['RunLocked', 'Checkpoints', 'RunDir', 'record_output', 'find_weights', 'load_model']
