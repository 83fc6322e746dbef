"""A model's layers: discovery (which modules are layers, in order), the forward-pass tracing it reads, capture (their
features), freezing (what trains)."""

from __future__ import annotations

from clat.layers.discovery import (PARAMETRIC_TYPES, BN_TYPES, OTHER_NORM_TYPES, FeaturePoint, SourceKind, Tap, Source, Layer,
                                   find_layers, unassigned_parameters, warn_unassigned, resolve_layers, layer_parameter_names,
                                   layers_table)  # noqa: F401
from clat.layers.tracing import (tensor_key, func_name, tensors_in)  # noqa: F401
from clat.layers.capture import (TapCapture, Features, FeatureExtractor, recomputed_blocks)  # noqa: F401
from clat.layers.freezing import (freeze_all_but, unfreeze_all, set_bn_train_mode, eval_mode, frozen_bn_statistics,
                                  count_parameters)  # noqa: F401

__all__ = ['PARAMETRIC_TYPES', 'BN_TYPES', 'OTHER_NORM_TYPES', 'FeaturePoint', 'SourceKind', 'Tap', 'Source', 'Layer', 'tensor_key',
           'func_name', 'tensors_in', 'find_layers', 'unassigned_parameters', 'warn_unassigned', 'resolve_layers',
           'layer_parameter_names', 'layers_table', 'TapCapture', 'Features', 'FeatureExtractor', 'recomputed_blocks', 'freeze_all_but',
           'unfreeze_all', 'set_bn_train_mode', 'eval_mode', 'frozen_bn_statistics', 'count_parameters']
