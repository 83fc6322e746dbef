"""The criticality index (paper Eq. 5-6), the estimators the layer oracle scores, and the layer selection rules."""

from __future__ import annotations

from clat.criticality.index import (Denominator, Scaling, DENOMINATORS, scale, CriticalityConfig, CriticalityResult, eligible_mask,
                                    distance, weakness_from_features, compute_criticality, select_random)  # noqa: F401
from clat.criticality.selectors import SELECTORS, LayerScoring, choose, register_selector, scores  # noqa: F401
from clat.criticality.estimators import ESTIMATORS, compute_estimates  # noqa: F401  (registers the oracle's estimators as selectors)

__all__ = ['Denominator', 'Scaling', 'DENOMINATORS', 'scale', 'CriticalityConfig', 'CriticalityResult', 'eligible_mask', 'distance',
           'weakness_from_features', 'compute_criticality', 'select_random',
           'SELECTORS', 'LayerScoring', 'choose', 'register_selector', 'scores', 'ESTIMATORS', 'compute_estimates']
