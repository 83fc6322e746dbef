"""Training: one stage's epoch, the loop over stages, early stopping, callbacks, warm starts."""

from __future__ import annotations

