"""Reading and checking a run's config: YAML files and ``a.b=value`` overrides onto the defaults of
:mod:`clat.config.schema`, the checks of every key, and the resolved config written back as YAML."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, get_args, get_origin, get_type_hints

import yaml

from clat.base.errors import ConfigError
from clat.base.registry import is_spec, load_spec
from clat.config.help import resolve_config, suggest
from clat.config.schema import Config, StageConfig, to_dict
from clat.data.prepare import DATASETS

_FRACTION = re.compile(r"^\s*([-+]?\d+(?:\.\d*)?)\s*/\s*(\d+(?:\.\d*)?)\s*$")


def coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is list:
        (item,) = get_args(tp)
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            value = [value] if value != "" else []
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:  # keyword arguments (model.kwargs): names to plain YAML values, so that the run's config records them
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of names to values (YAML {{depth: 10}}, or {key}.depth=10), got {value!r}")
        for k, v in value.items():
            if not (isinstance(k, str) and k.isidentifier()):
                raise ConfigError(f"{key}: {k!r} is not a keyword argument name")
            if not _plain(v):
                raise ConfigError(f"{key}.{k} must be plain data (numbers, strings, true/false, null, lists, mappings), "
                                  f"got {type(v).__name__}")
        return copy.deepcopy(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            m = _FRACTION.match(value)
            if m:
                return float(m.group(1)) / float(m.group(2))
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number (fractions like 8/255 are fine), got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def _plain(v: Any) -> bool:
    """A value YAML writes and reads back as it is."""
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    return v is None or isinstance(v, (str, int, bool))


def _build(cls: type, data: Any, prefix: str = "", base: Any = None) -> Any:
    obj = base if base is not None else cls()
    if data is None:
        return obj
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping of keys to values, got {data!r}")
    hints = dict(get_type_hints(cls))
    if isinstance(obj, Config):
        import_named_methods(data)
        obj.add_new_sections()
        hints.update({name: type(section) for name, section in obj.sections.items()})
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in hints:
            raise ConfigError(f"unknown config key {key!r}{suggest(str(k), prefix, list(hints))}; valid keys here: {', '.join(hints)} "
                              "(`clat config show` lists every key)")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            setattr(obj, k, _build(tp, v, key, getattr(obj, k)))
        elif get_origin(tp) is dict:  # a mapping adds to what the file (or the defaults) gave: model.kwargs.depth=10 keeps the others
            setattr(obj, k, {**getattr(obj, k), **coerce(v, tp, key)})
        else:
            setattr(obj, k, coerce(v, tp, key))
    return obj


def import_named_methods(data: dict) -> None:
    """A method named as ``package.module:Class`` (``finetune.method``, ``pretrain.method``, ``clat.base``) is imported before
    the keys are read: its file registers the method and its config section, so the section's keys are known."""
    for section, key in (("pretrain", "method"), ("finetune", "method"), ("clat", "base")):
        name = data[section].get(key) if isinstance(data.get(section), dict) else None
        if isinstance(name, str) and is_spec(name):
            load_spec(name, what=f"{section}.{key}={name}")


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def values_tree(values: Mapping[str, Any]) -> dict:
    """``{"clat.lam": 0.05, "finetune.epochs": 2}`` -> nested dict: Python values as they are (no text parsed), for
    :func:`variant` and :func:`override`."""
    tree: dict = {}
    for key, value in values.items():
        if not (isinstance(key, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key)):
            raise ConfigError(f"{key!r} is not a dotted config key like clat.k")
        _set_path(tree, key, value)
    return tree


def parse_overrides(overrides: Sequence[str]) -> dict:
    """``["clat.k=2", "data.dataset=bundled"]`` -> nested dict (values parsed as YAML)."""
    tree: dict = {}
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key=value (for example clat.k=2)")
        key, raw = ov.split("=", 1)
        key = key.strip()
        if not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            raise ConfigError(f"override {ov!r}: {key!r} is not a dotted key like clat.k")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {ov!r}: the value is not valid YAML ({e.__class__.__name__})") from None
        _set_path(tree, key, value)
    return tree


def read_yaml(p: Path, *, missing: str, what: str) -> Any:
    """A YAML file's content (safe loader: no tags that build objects). One-line ConfigErrors: ``missing`` when there
    is no such file; else ``what`` followed by what is wrong (``not valid YAML at line 3: ...``, ``not a readable
    text file``)."""
    if not p.is_file():
        raise ConfigError(missing)
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{what}not valid YAML{where}: {getattr(e, 'problem', None) or type(e).__name__}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{what}not a readable text file ({type(e).__name__})") from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file (a path, or a packaged config's name: :func:`list_configs`) <- overrides, validated."""
    cfg = Config()
    if path is not None:
        p = resolve_config(path)
        data = read_yaml(p, missing=f"config file {p} does not exist", what=f"config file {p} is ")
        cfg = _build(Config, data or {}, "", cfg)
    cfg = _build(Config, parse_overrides(overrides), "", cfg)
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data, "", Config())
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Range checks that types alone cannot express."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    for key, value in _numbers(cfg):
        need(math.isfinite(value), f"{key} must be a finite number, got {value}")
    a = cfg.attack
    need(a.eps > 0, f"attack.eps must be > 0, got {a.eps} (the paper uses 8/255)")
    need(a.alpha > 0, f"attack.alpha must be > 0, got {a.alpha} (the paper uses 2/255)")
    need(a.steps >= 1, f"attack.steps must be >= 1, got {a.steps}")
    # images are in [0, 1]: an l-inf radius of 1 lets the attack set every pixel to anything; an l2 radius
    # above the diameter of a 3x32x32 image (55.4) bounds nothing either
    need(a.norm != "linf" or a.eps < 1, f"attack.eps={a.eps:g} covers the whole [0, 1] pixel range under linf; images are in [0, 1] (the "
                                        f"paper uses 8/255)")
    need(a.norm != "l2" or a.eps < 55.5, f"attack.eps={a.eps:g} exceeds the l2 diameter of a 3x32x32 image in [0, 1] (55.4); the usual l2 "
                                         f"radius is 0.5")
    d = cfg.data
    DATASETS.entry(d.dataset)  # a known data set (a package.module:loader is imported now): else one line naming them
    need(d.batch_size >= 1, f"data.batch_size must be >= 1, got {d.batch_size}")
    need(d.eval_batch_size >= 1, f"data.eval_batch_size must be >= 1, got {d.eval_batch_size}")
    need(d.val_size >= 0, f"data.val_size must be >= 0, got {d.val_size}")
    need(d.train_size is None or d.train_size > d.val_size, f"data.train_size ({d.train_size}) must exceed data.val_size ({d.val_size})")
    need(d.test_size is None or d.test_size >= 1, f"data.test_size must be >= 1, got {d.test_size}")
    need(not (d.download and d.dataset in ("folder", "npz")), f"data.download=true has nothing to download for data.dataset={d.dataset}: "
                                                              f"drop it")
    need(d.image_size is None or d.image_size >= 1, f"data.image_size must be >= 1 (or null: images as stored), got {d.image_size}")
    need(d.image_size is None or d.dataset == "folder", f"data.image_size resizes the images of an image folder (data.dataset=folder), not "
         f"{d.dataset}: drop it")
    need(not d.stream or d.dataset == "folder", f"data.stream=true streams an image folder (data.dataset=folder); {d.dataset} is held in "
                                                f"memory: "
         "drop it (torch Datasets stream from Python: docs/data.md)")
    need(d.workers >= 0, f"data.workers must be >= 0 (0: the training process reads the images), got {d.workers}")
    need(d.fingerprint is None or d.dataset == "python", "data.fingerprint is written by clat.train(data=...) for data given from Python "
         f"(data.dataset=python), not for data.dataset={d.dataset}: drop it")
    for name in ("pretrain", "finetune"):
        s: StageConfig = getattr(cfg, name)
        need(s.epochs >= 0, f"{name}.epochs must be >= 0, got {s.epochs}")
        need(s.lr > 0, f"{name}.lr must be > 0, got {s.lr}")
        need(0 <= s.momentum < 1, f"{name}.momentum must be in [0, 1), got {s.momentum}")
        need(s.weight_decay >= 0, f"{name}.weight_decay must be >= 0, got {s.weight_decay}")
        need(len(s.betas) == 2 and all(0 <= b < 1 for b in s.betas), f"{name}.betas must be two numbers in [0, 1), got {s.betas}")
        need(s.eps > 0, f"{name}.eps must be > 0, got {s.eps}")
        need(not (s.nesterov and s.optimizer != "sgd"), f"{name}.nesterov=true is SGD's, but {name}.optimizer={s.optimizer}: drop it")
        need(0 <= s.warmup_epochs and (s.epochs == 0 or s.warmup_epochs <= s.epochs),
             f"{name}.warmup_epochs must be between 0 and {name}.epochs ({s.epochs}), got {s.warmup_epochs}")
        need(s.ema_decay is None or 0 < s.ema_decay < 1, f"{name}.ema_decay must be in (0, 1) (0.999 is usual) or null, got {s.ema_decay}")
        need(0 <= s.label_smoothing < 1, f"{name}.label_smoothing must be in [0, 1), got {s.label_smoothing}")
        need(s.grad_clip is None or s.grad_clip > 0, f"{name}.grad_clip must be > 0 (a gradient norm) or null, got {s.grad_clip}")
    need(cfg.pretrain.epochs + cfg.finetune.epochs >= 1, "pretrain.epochs + finetune.epochs is 0: nothing to train")
    e = cfg.eval
    need(e.n_examples >= 0, f"eval.n_examples must be >= 0, got {e.n_examples}")
    need(e.steps >= 1 and e.restarts >= 1 and e.every >= 1, "eval.steps, eval.restarts and eval.every must be >= 1")
    es = cfg.early_stop
    need(es.patience is None or es.patience >= 1, f"early_stop.patience must be >= 1 (or null: no early stopping), got {es.patience}")
    need(es.min_delta >= 0, f"early_stop.min_delta must be >= 0, got {es.min_delta}")
    need(es.patience is None or (e.n_examples > 0 and d.val_size > 0),
         "early_stop.patience watches the held-out evaluation, which is off: set data.val_size and eval.n_examples > 0, or "
         "early_stop.patience=null")
    need(cfg.log.wandb_project.strip() != "", "log.wandb_project must not be empty")
    for k in ("num_classes", "normalize"):
        need(k not in cfg.model.kwargs, f"model.kwargs.{k}: clat passes {k} to the factory itself; set model.{k} instead")
    need(not cfg.init_reset_head or cfg.init is not None, "init_reset_head=true resets the classifier of init, but init is not set")
    need(cfg.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {cfg.keep_checkpoints}")
    need(cfg.device == "auto" or re.fullmatch(r"cpu|cuda(:\d+)?|mps", cfg.device) is not None, f"device must be auto, cpu, cuda, cuda:N "
                                                                                               f"or mps; got {cfg.device!r}")
    for section in cfg.sections.values():  # each method checks its own section
        if hasattr(section, "check"):
            section.check(need)


def _numbers(obj: Any, prefix: str = "") -> list[tuple[str, float]]:
    """Every float value of the config tree (lists included), with its dotted key."""
    out: list[tuple[str, float]] = []
    names = [f.name for f in dataclasses.fields(obj)] + (list(obj.sections) if isinstance(obj, Config) else [])
    for name in names:
        v = getattr(obj, name)
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(v):
            out += _numbers(v, key + ".")
        elif isinstance(v, float):
            out.append((key, v))
        elif isinstance(v, list):
            out += [(f"{key}[{i}]", x) for i, x in enumerate(v) if isinstance(x, float)]
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flat_keys(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"clat": {"k": 2}}`` -> ``{"clat.k": 2}``."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def get_key(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def variant(cfg: Config | None = None, values: Mapping[str, Any] | None = None) -> Config:
    """A validated copy of ``cfg`` (default: clat's defaults) with ``values`` set: dotted keys to Python values, checked and
    converted by each key's type as a config file's are (``variant(cfg, {"clat.lam": 0.05, "finetune.epochs": 2})``).
    The way to build config variants in code: nothing goes through text, so no value changes on the way."""
    return override(cfg if cfg is not None else Config(), values or {})[0]


def override(cfg: Config, overrides: Sequence[str] | Mapping[str, Any]) -> tuple[Config, dict]:
    """A validated copy of ``cfg`` with ``key=value`` overrides (text, as on the command line) or a mapping of dotted keys
    to values (:func:`variant`), and ``{key: [old, new]}`` of what changed."""
    tree = values_tree(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    keys = flat_keys(tree)
    new = _build(Config, tree, "", copy.deepcopy(cfg))
    validate(new)
    return new, {k: [get_key(cfg, k), get_key(new, k)] for k in keys if get_key(cfg, k) != get_key(new, k)}
