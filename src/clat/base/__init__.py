"""The ground floor: errors, random streams, atomic files, the plug-in registry, distributed helpers, statistics, versions, the
run's record types (metrics rows, selections, summary; clat.base.run_records). Imports nothing of clat."""

from __future__ import annotations

