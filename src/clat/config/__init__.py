"""A run's settings: the config dataclasses, method sections, YAML and overrides, and `clat config` help."""

from __future__ import annotations

from clat.config.schema import (ModelConfig, DataConfig, AttackConfig, StageConfig, EvalConfig, EarlyStopConfig, LogConfig,
                                register_section, Config, to_dict)  # noqa: F401
from clat.config.load import (coerce, parse_overrides, read_yaml, load_config, config_from_dict, validate, dump_yaml, flat_keys, get_key,
                              override, variant, values_tree)  # noqa: F401

__all__ = ['ModelConfig', 'DataConfig', 'AttackConfig', 'StageConfig', 'EvalConfig', 'EarlyStopConfig', 'LogConfig', 'register_section',
           'Config', 'to_dict', 'coerce', 'parse_overrides', 'read_yaml', 'load_config', 'config_from_dict', 'validate', 'dump_yaml',
           'flat_keys', 'get_key', 'override', 'variant', 'values_tree']
