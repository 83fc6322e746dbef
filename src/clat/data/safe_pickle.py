"""A restricted unpickler that can only build plain numpy arrays, dicts, lists and scalars.

Unpickling runs code named in the file, so :class:`SafeUnpickler` resolves only the few globals of
:data:`ALLOWED_GLOBALS` (numpy's array reconstruction helpers, ``ndarray``, ``dtype`` and ``_codecs.encode``);
any other global raises :class:`RefusedGlobal` before it can run. :mod:`clat.data.cifar` reads the official CIFAR
files (pickles) with it and turns a refusal into a one-line ``DataError``.
"""

from __future__ import annotations

import codecs
import pickle
from typing import Any

import numpy as np

__all__ = ["ALLOWED_GLOBALS", "RefusedGlobal", "SafeUnpickler"]

# (module, name) pairs a pickle may reference. numpy's array
# reconstruction helpers and the dtype/ndarray classes build plain arrays and
# cannot run other code. ``_codecs.encode`` is how Python 3 writes ``bytes``
# at pickle protocol 2 (it only re-encodes a string), and ``_frombuffer`` is
# how numpy writes arrays at protocol 5 (the default from Python 3.14); both
# are allowed so that subsets re-saved by users load too.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
)


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle referenced a Python object outside the allow-list."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualname = f"{module}.{name}"


def _resolve_allowed(module: str, name: str) -> Any:
    """Return the object for an allowed (module, name) without importing the
    deprecated ``numpy.core`` alias (numpy >= 2 warns on it)."""
    if name == "_reconstruct":
        try:
            from numpy._core.multiarray import _reconstruct
        except ImportError:  # numpy < 2
            from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
        return _reconstruct
    if name == "_frombuffer":
        try:
            from numpy._core.numeric import _frombuffer  # type: ignore[attr-defined]
        except ImportError:  # numpy < 2
            from numpy.core.numeric import _frombuffer  # type: ignore[no-redef]
        return _frombuffer
    if module == "numpy" and name == "ndarray":
        return np.ndarray
    if module == "numpy" and name == "dtype":
        return np.dtype
    if module == "_codecs" and name == "encode":
        return codecs.encode
    raise RefusedGlobal(module, name)  # pragma: no cover - guarded by the allow-list


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that can only build numpy arrays, dicts, lists and scalars."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise RefusedGlobal(module, name)
        return _resolve_allowed(module, name)
