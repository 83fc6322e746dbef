"""The commands that show what clat offers: ``clat configs`` (packaged configs), ``clat config show`` (every key of a
config with its help), ``clat list [KIND]`` (every registry: the extensions a run may name), ``clat models`` and
``clat methods`` (two registries in more detail)."""

from __future__ import annotations

import argparse
from typing import Sequence

import torch

from clat import methods
from clat.analysis.report import text_table
from clat.base.errors import ClatError
from clat.base.registry import Registry, import_user_module
from clat.config.help import CONFIGS, describe, list_configs, render
from clat.config.load import dump_yaml, load_config
from clat.criticality.selectors import SELECTORS
from clat.data.prepare import DATASETS
from clat.eval.attacks import ATTACKS
from clat.layers.discovery import find_layers
from clat.methods.registry import METHODS
from clat.models import create_model, list_models, model_info
from clat.models.registry import MODELS
from clat.training.callbacks import LOGGERS

# Every kind of extension, with its registry (clat.base.registry): `clat list KIND`.
REGISTRIES: dict[str, Registry | None] = {"models": MODELS, "methods": METHODS, "selectors": SELECTORS, "attacks": ATTACKS,
                                          "datasets": DATASETS, "loggers": LOGGERS}


def config_and_overrides(config: str | None, overrides: Sequence[str]) -> tuple[str | None, list[str]]:
    """``clat train a=1 b=2`` has no config file: its first positional is an override."""
    if config is not None and "=" in config:
        return None, [config, *overrides]
    return config, list(overrides)


def cmd_configs(args: argparse.Namespace) -> int:
    names = [n for n in list_configs() if not args.prefix or n.startswith(args.prefix.removeprefix("configs/").rstrip("/"))]
    if not names:
        raise ClatError(f"no packaged config starts with {args.prefix!r}; `clat configs` lists them all")
    for n in names:
        first = next((ln[1:].strip() for ln in (CONFIGS / f"{n}.yaml").read_text().splitlines() if ln.startswith("#")), "")
        print(f"{n:48s} {first}")
    print(f"({len(names)} configs in {CONFIGS}; run one with `clat train NAME`)")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    config, overrides = config_and_overrides(args.config, args.overrides)
    cfg = load_config(config, overrides)
    if args.yaml:
        print(dump_yaml(cfg), end="")
        return 0
    print(f"# {config or 'defaults'}{' + ' + ' '.join(overrides) if overrides else ''}; * = differs from the default")
    print(render(describe(cfg), only_changed=args.changed))
    return 0


def cmd_models(args: argparse.Namespace) -> int:

    rows = []
    for name in list_models():
        with torch.device("meta"):  # counting only: no memory for WRN-70-16's 267M parameters
            m = create_model(name)
        rows.append([name, f"{sum(p.numel() for p in m.parameters()):,}", len(find_layers(m)), model_info(name).default_k,
                     model_info(name).description])
    print(text_table(["name", "params (10 classes)", "layers", "default k", "description"], rows))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    for name in methods.list_methods():
        print(f"{name:10s} {methods.method_info(name).description}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """``clat list [KIND] [--import MODULE ...]``: name and description of every registered extension (of one kind)."""
    for module in args.imports or ():
        import_user_module(module, what=f"--import {module}")
    for kind in [args.kind] if args.kind else list(REGISTRIES):
        registry = REGISTRIES[kind]
        entries = list(registry) if registry is not None else []
        print(f"{kind} ({registry.where if registry is not None else 'not registered in this version'}):")
        for e in entries:
            also = ", ".join(registry.aliases(e.name))
            print(f"  {e.name:16s} {e.description}{f' (also: {also})' if also else ''}")
        if not entries:
            print("  (none registered)")
    return 0

