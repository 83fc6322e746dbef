"""Finding one's way in configs: packaged configs by name, ``clat config show`` (every key of a run's config with
its type, default, value and one-line help) and "did you mean" for a misspelled key.

The help of a key is the ``# comment`` beside its field in the dataclass that defines it (:mod:`clat.config`,
and each method's own section in its file), so the documentation cannot drift from the code; a test checks
that every key has one.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from clat.base.errors import ConfigError
from clat.config.schema import Config, to_dict

_FIELD = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$")


CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # the configs shipped in the package (the repository's configs/ links here)


def list_configs() -> list[str]:
    """The packaged configs by name (``paper/cifar10/resnet18_pgd_at_clat``), as ``clat train NAME`` takes them."""
    return sorted(p.relative_to(CONFIGS).with_suffix("").as_posix() for p in CONFIGS.rglob("*.yaml"))


def resolve_config(path: str | Path) -> Path:
    """A config file: ``path`` itself if it exists, else the packaged config of that name (``.yaml`` and a leading
    ``configs/`` optional), else a one-line ConfigError with the closest names."""
    p = Path(path)
    if p.is_file():
        return p
    name = p.as_posix().removeprefix("configs/").removesuffix(".yaml")
    if (CONFIGS / f"{name}.yaml").is_file():
        return CONFIGS / f"{name}.yaml"

    names = list_configs()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5) or [n for n in names if Path(n).name == Path(name).name][:3]
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError(f"config file {p} does not exist, and no packaged config has that name{hint} (`clat configs` lists them)")


def dotted_keys(obj: Any, prefix: str = "") -> list[str]:
    """Every leaf key of a config (sub)tree, dotted: ``model.name``, ..., ``clat.criticality.steps``."""
    names = [f.name for f in dataclasses.fields(obj)] + (list(obj.sections) if isinstance(obj, Config) else [])
    out: list[str] = []
    for name in names:
        v = getattr(obj, name)
        out += dotted_keys(v, f"{prefix}{name}.") if dataclasses.is_dataclass(v) else [f"{prefix}{name}"]
    return out


def suggest(key: str, prefix: str, siblings: list[str]) -> str:
    """`` (did you mean clat.lam?)`` for a misspelled or misplaced key, or nothing."""

    close = [f"{prefix}.{c}" if prefix else c for c in difflib.get_close_matches(key, siblings, n=2, cutoff=0.6)]
    if not close:  # the right name in another section (``k=2`` for ``clat.k=2``), or a near one anywhere
        every = dotted_keys(Config())
        leaves = {d: d.rsplit(".", 1)[-1] for d in every}
        close = [d for d, leaf in leaves.items() if leaf == key][:3] or [
            d for d in every if leaves[d] in difflib.get_close_matches(key, list(leaves.values()), n=2, cutoff=0.75)][:3]
    return f" (did you mean {' or '.join(close)}?)" if close else ""


@dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted: ``clat.criticality.steps``
    type: str  # ``int | None``; a closed set as ``linf|l2``
    default: Any
    value: Any
    help: str


@functools.cache
def field_help(cls: type) -> dict[str, str]:
    """``{field: comment}`` from the source of a dataclass: the comment beside the field, or the comment lines right above
    it (a field without a comment maps to '')."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):  # pragma: no cover (source not shipped)
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    above: list[str] = []  # a comment on the lines right above a field (where the line beside it would be too long)
    for line in lines:
        m = _FIELD.match(line)
        if m and m.group(1) in names and m.group(1) not in out:
            out[m.group(1)] = (m.group(2) or "").strip() or " ".join(above)
        above = [*above, line.strip()[1:].strip()] if line.strip().startswith("#") else []
    return out


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list[{type_name(get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def describe(cfg: Config) -> list[KeyDoc]:
    """Every leaf key of ``cfg`` in the order of its YAML, with the defaults of a fresh :class:`Config`."""
    return _walk(cfg, Config(), "")


def _walk(obj: Any, default: Any, prefix: str) -> list[KeyDoc]:
    hints = dict(get_type_hints(type(obj)))
    helps = dict(field_help(type(obj)))
    names = [f.name for f in dataclasses.fields(obj)]
    if isinstance(obj, Config):
        hints.update({n: type(s) for n, s in obj.sections.items()})
        names = list(to_dict(obj))  # the sections sit where the YAML shows them
    out: list[KeyDoc] = []
    for name in names:
        v, d = getattr(obj, name), getattr(default, name)
        if dataclasses.is_dataclass(v):
            out += _walk(v, d, f"{prefix}{name}.")
        else:
            out.append(KeyDoc(f"{prefix}{name}", type_name(hints[name]), d, v, helps.get(name, "")))
    return out


def _show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v) if not isinstance(v, list) else "[" + ", ".join(_show(x) for x in v) + "]"


def render(docs: list[KeyDoc], *, only_changed: bool = False) -> str:
    """One line per key: ``key  value  (default ...)  type  help``; keys whose value differs from the default
    are marked with ``*``."""
    rows = [d for d in docs if not only_changed or d.value != d.default]
    kw = max((len(d.key) for d in rows), default=3)
    vw = min(24, max((len(_show(d.value)) for d in rows), default=5))
    tw = min(28, max((len(d.type) for d in rows), default=4))
    lines = [f"  {'key':<{kw}}  {'value':<{vw}}  {'type':<{tw}}  help (default)"]
    for d in rows:
        star = "*" if d.value != d.default else " "
        default = "" if d.value == d.default else f" (default {_show(d.default)})"
        lines.append(f"{star} {d.key:<{kw}}  {_show(d.value):<{vw}}  {d.type:<{tw}}  {d.help}{default}")
    return "\n".join(lines)
