"""The ground floor: errors, random streams, atomic files, the plug-in registry, distributed helpers, statistics, versions. Imports nothing of clat."""

from __future__ import annotations

