"""The one plug-in pattern of clat: a :class:`Registry` per kind of extension (models, methods, selectors,
evaluation attacks, datasets, loggers). Each entry is registered by name with a decorator in the file that defines it
(timm's ``@register_model``, without the magic), and any entry can also be named from outside the package as
``package.module:name`` (imported on use, the current folder searched as ``python -m`` would), so a new extension is
one file of the user's and a name on the command line. ``clat list [KIND]`` shows every registry.

Example::

    from clat.base.registry import Registry

    SHAPES = Registry("shape", "config key shape.name")

    @SHAPES.register("square", description="four equal sides")
    def square(n):
        return n * n

    SHAPES.get("square")(3)            # 9
    SHAPES.get("mypkg.shapes:circle")  # imported from the user's module
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from clat.base.errors import ConfigError

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


@dataclass(frozen=True)
class Entry:
    """One registered extension: its name, the object (a class or a function), a one-line description and any
    kind-specific facts (``extra``: a model's paper k, a method's config section, ...)."""

    name: str
    obj: Any
    description: str
    extra: dict


class Registry:
    """Named extensions of one kind. ``where`` says where a user names them (for error messages)."""

    def __init__(self, kind: str, where: str, *, plural: str | None = None) -> None:
        self.kind, self.where, self.plural = kind, where, plural or f"{kind}s"
        self._entries: dict[str, Entry] = {}
        self._aliases: dict[str, str] = {}  # another name -> the registered name

    def register(self, name: str, *, description: str = "", aliases: tuple[str, ...] = (), **extra: Any) -> Callable[[Any], Any]:
        """A decorator: ``@REGISTRY.register("name", description=...)`` above a class or function; ``aliases``: other
        names of the same entry (an older name)."""
        for n in (name, *aliases):
            if not re.fullmatch(rf"{_IDENT}(\.{_IDENT})*", n) and not re.fullmatch(r"[a-z0-9_]+", n):
                raise ValueError(f"{self.kind} name {n!r} must be an identifier")

        def deco(obj: Any) -> Any:
            self.add(name, obj, description=description, aliases=aliases, **extra)
            return obj

        return deco

    def add(self, name: str, obj: Any, *, description: str = "", aliases: tuple[str, ...] = (), **extra: Any) -> Entry:
        """Register ``obj`` under ``name`` (what :meth:`register` does). The same object twice, or the same definition
        run again (a module reloaded, a test's class defined anew), replaces the entry; another object is an error."""
        old = self._entries.get(name)
        if old is not None and old.obj is not obj and _where(old.obj) != _where(obj):
            raise ValueError(f"{self.kind} {name!r} is registered already ({_where(old.obj)})")
        for a in aliases:
            if a in self._entries or self._aliases.get(a, name) != name:
                raise ValueError(f"{self.kind} alias {a!r} is a name already")
        doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
        entry = Entry(name, obj, description or (doc[0] if doc else ""), dict(extra))
        self._entries[name] = entry
        self._aliases.update({a: name for a in aliases})
        return entry

    def names(self) -> list[str]:
        """The registered names, in the order they were registered (aliases not included)."""
        return list(self._entries)

    def aliases(self, name: str) -> list[str]:
        """The other names of entry ``name``."""
        return [a for a, n in self._aliases.items() if n == name]

    def canonical(self, name: str) -> str:
        """The registered name of ``name`` (itself, or the entry an alias names)."""
        return self._aliases.get(name, name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._entries.values()))

    def entry(self, name: str) -> Entry:
        """The entry of ``name`` (or of its alias); a ``package.module:name`` spec is imported (and recorded under that spec)."""
        if is_spec(name):
            return self.record(name, load_spec(name, what=f"{self.where}={name}"))
        name = self.canonical(name)
        if name in self._entries:
            return self._entries[name]
        raise self.unknown(name)

    def record(self, spec: str, obj: Any, *, description: str = "", **extra: Any) -> Entry:
        """Keep ``obj``, loaded from ``package.module:name`` ``spec``, as an entry (``clat list`` shows what a run named).
        It is imported again at each use (a module of the same name elsewhere on the path is another object), so the
        entry is replaced, never in conflict; registering a name this way is :meth:`add`'s."""
        old = self._entries.get(spec)
        if old is not None and old.obj is obj and not (description or extra):
            return old
        self._entries.pop(spec, None)
        return self.add(spec, obj, description=description, **extra)

    def unknown(self, name: Any) -> ConfigError:
        """The one-line error of an unknown ``name``: the close names, every known one, and the way to one's own."""
        known = [n for n in self.names() if not is_spec(n)]
        close = difflib.get_close_matches(str(name), known + list(self._aliases), n=3)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        return ConfigError(f"unknown {self.kind} {name!r}; {hint}known {self.plural}: {', '.join(known)}, or your own as "
                           f"package.module:name ({self.where}; `clat list {self.plural}`)")

    def get(self, name: str) -> Any:
        """The registered object of ``name`` (see :meth:`entry`; a ``package.module:name`` is imported at each call)."""
        return self.entry(name).obj


def is_spec(name: str) -> bool:
    """``package.module:name``: an extension in the user's code."""
    return isinstance(name, str) and ":" in name


def load_spec(spec: str, *, what: str, bad: str = "not package.module:name (e.g. mymodule:my_thing)") -> Any:
    """``package.module:attr`` -> the object, with one-line errors that name ``what`` (e.g. ``model.name=x:y``);
    ``bad``: what the error of a malformed spec says after ``what``."""
    module, _, attr = spec.partition(":")
    if not re.fullmatch(rf"{_IDENT}(\.{_IDENT})*", module) or not re.fullmatch(rf"{_IDENT}(\.{_IDENT})*", attr):
        raise ConfigError(f"{what}: {bad}")
    obj = import_user_module(module, what=what)
    done: list[str] = []
    for part in attr.split("."):
        if not hasattr(obj, part):
            close = difflib.get_close_matches(part, [n for n in dir(obj) if not n.startswith("_")], n=2)
            hint = f"; did you mean {' or '.join(f'{module}:' + '.'.join([*done, c]) for c in close)}?" if close else ""
            raise ConfigError(f"{what}: {module} has no {attr!r}{hint}")
        obj = getattr(obj, part)
        done.append(part)
    return obj


def import_user_module(module: str, *, what: str) -> Any:
    """Import a module of the user's; the current folder is searched too (as ``python -m`` would)."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{what}: cannot import {module} ({e}); install it, or run from the folder that holds it, "
                          "or add that folder to PYTHONPATH") from None


def _where(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
