"""Scoring a model: accuracy under attack, AutoAttack, sanity checks, per-image records and the evaluation protocol."""

from __future__ import annotations

