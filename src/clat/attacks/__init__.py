"""The threat model and the attacks that realise it (PGD, FGSM with a random start)."""

from __future__ import annotations

from clat.attacks.threat import (Norm, Objective, Shard, uniform_like, randn_like, eps_str, ThreatModel, DEFAULT_THREAT, perturb,
                                 ce_objective, feature_distance, pgd, fgsm_rs)  # noqa: F401

__all__ = ['Norm', 'Objective', 'Shard', 'uniform_like', 'randn_like', 'eps_str', 'ThreatModel', 'DEFAULT_THREAT', 'perturb',
           'ce_objective', 'feature_distance', 'pgd', 'fgsm_rs']
