"""What results mean: run reports, plots, comparisons, the layer oracle and the stability analysis."""

from __future__ import annotations

