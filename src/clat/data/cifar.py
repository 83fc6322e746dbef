"""CIFAR-10/100 files: the official python-format files (read safely, checked, downloaded on request) and the
small subset bundled with clat. :mod:`clat.data` turns them into training data.

Why this module looks the way it does:

* The official "python version" CIFAR files are pickles. Unpickling runs code
  named in the file, so they are read with a restricted unpickler
  (:mod:`clat.data.safe_pickle`) that only builds plain numpy arrays; anything
  else is refused before it can run.
* Every file is checked against the official MD5 by default, so numbers are
  never reported on a silently different copy. A copy known to differ (for
  example a subset) can be read with ``verify=False``, with a warning.
* Downloading happens only when asked (``download=True``), never at import;
  :mod:`clat.data.download` fetches, checks and safely extracts the tarball.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from clat.base.errors import DataError
from clat.data.download import download_tarball
from clat.data.safe_pickle import RefusedGlobal, SafeUnpickler

__all__ = [
    "DatasetName",
    "NUM_CLASSES",
    "URLS",
    "TARBALL_MD5",
    "FILE_MD5",
    "ChecksumWarning",
    "load_cifar",
    "load_bundled",
]

DatasetName = Literal["cifar10", "cifar100"]

#: Number of classes of each data set (CIFAR-100: the 100 "fine" labels).
NUM_CLASSES: dict[str, int] = {"cifar10": 10, "cifar100": 100}

#: Where ``download=True`` fetches each data set's official tarball. A module
#: level dict so that tests (or a local mirror) can point it elsewhere.
URLS: dict[str, str] = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}

#: MD5 of the official tarballs (the values torchvision checks).
TARBALL_MD5: dict[str, str] = {
    "cifar10": "c58f30108f718f92721af3b95e74349a",
    "cifar100": "eb9058c3a382ffc7106e4002c42a8d85",
}

#: MD5 of every official file inside the tarballs (the values torchvision checks).
FILE_MD5: dict[str, dict[str, str]] = {
    "cifar10": {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    },
    "cifar100": {
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "meta": "7973b15100ade9c7d40fb424638fde48",
    },
}

# The folder each official tarball extracts to.
_FOLDERS: dict[str, str] = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
# How to ask for a download, in the words of each entry point (clat train has no --download flag).
HOW_TO_DOWNLOAD = "data.download=true (clat train, a config), --download (clat eval, criticality, transfer, stability) or download=True"
# The files holding each split, in the official order.
_SPLIT_FILES: dict[str, dict[bool, tuple[str, ...]]] = {
    "cifar10": {
        True: ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"),
        False: ("test_batch",),
    },
    "cifar100": {True: ("train",), False: ("test",)},
}
_LABEL_KEYS: dict[str, str] = {"cifar10": "labels", "cifar100": "fine_labels"}
_PRETTY: dict[str, str] = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
_PIXELS = 3 * 32 * 32


class ChecksumWarning(UserWarning):
    """Data was read without checking it against the official checksums."""


# --------------------------------------------------------------------------- #
# Safe unpickling (clat.data.safe_pickle), with one-line errors
# --------------------------------------------------------------------------- #


def _safe_unpickle(blob: bytes, path: Path) -> Any:
    """Unpickle ``blob`` (read from ``path``) with the restricted unpickler."""
    if not blob:
        raise DataError(
            f"CIFAR file {path} is empty: replace it with the official file "
            f"(re-download it with {HOW_TO_DOWNLOAD}, or re-extract the tarball)."
        )
    try:
        return SafeUnpickler(io.BytesIO(blob), encoding="latin1").load()
    except RefusedGlobal as err:
        raise DataError(
            f"CIFAR file {path} references the Python object {err.qualname}, which a CIFAR "
            "file never needs, so it was refused (it could run code): use the official files."
        ) from None
    except Exception as err:  # truncated or not a pickle at all
        raise DataError(
            f"CIFAR file {path} is not a readable CIFAR pickle ({type(err).__name__}: {err}): "
            f"replace it with the official file (re-download it with {HOW_TO_DOWNLOAD})."
        ) from None


# --------------------------------------------------------------------------- #
# Official files
# --------------------------------------------------------------------------- #


def _check_name(name: str) -> None:
    if name not in NUM_CLASSES:
        raise DataError(f"Unknown data set {name!r}: use one of {sorted(NUM_CLASSES)}.")


def _find_folder(name: str, root: Path, train: bool) -> Path | None:
    """The batches folder for ``root``: ``root/<folder>``, or ``root`` itself
    when it is that folder (by name, or because it holds the split's files)."""
    folder = _FOLDERS[name]
    if (root / folder).is_dir():
        return root / folder
    if root.is_dir() and (
        root.name == folder or all((root / f).is_file() for f in _SPLIT_FILES[name][train])
    ):
        return root
    return None


def _read_batch(name: str, path: Path, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    """Read, optionally verify, unpickle and validate one batch file."""
    try:
        blob = path.read_bytes()
    except OSError as err:
        raise DataError(
            f"Cannot read CIFAR file {path} ({err.strerror or err}): check its permissions "
            "or replace it with the official file."
        ) from None
    if verify:
        expected = FILE_MD5[name][path.name]
        actual = hashlib.md5(blob).hexdigest()
        if actual != expected:
            raise DataError(
                f"CIFAR file {path} has MD5 {actual}, not the official {expected}: re-download "
                "it, or, for a copy known to differ (such as a subset), read it with "
                "verify=False (CLI: data.verify=false)."
            )
    entry = _safe_unpickle(blob, path)
    if not isinstance(entry, dict):
        raise DataError(
            f"CIFAR file {path} holds a {type(entry).__name__}, not the dict of the official "
            "format: replace it with the official file."
        )
    # Python 3 pickles written with bytes keys: normalise to str.
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    label_key = _LABEL_KEYS[name]
    for key in ("data", label_key):
        if key not in entry:
            raise DataError(
                f"CIFAR file {path} has no {key!r} entry (keys: {sorted(map(str, entry))}): "
                f"it is not a {_PRETTY[name]} file; point data.root at the official data."
            )
    data = entry["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(
            f"CIFAR file {path}: 'data' is {kind}, not a uint8 array: "
            "replace it with the official file (or save subsets as uint8)."
        )
    if data.ndim != 2 or data.shape[1] != _PIXELS:
        raise DataError(
            f"CIFAR file {path}: 'data' has shape {tuple(data.shape)}, not [N, 3072] "
            "(32x32 RGB, channel-major): replace it with the official file."
        )
    if data.shape[0] == 0:
        raise DataError(f"CIFAR file {path} holds no images: replace it with the official file.")
    raw_labels = entry[label_key]
    try:
        labels = np.asarray(raw_labels)
    except Exception:  # pragma: no cover - ragged or exotic objects
        labels = np.asarray([], dtype=object)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(
            f"CIFAR file {path}: {label_key!r} is not a flat list of integers "
            f"(dtype {labels.dtype}, shape {tuple(labels.shape)}): "
            "replace it with the official file."
        )
    if labels.shape[0] != data.shape[0]:
        raise DataError(
            f"CIFAR file {path} has {data.shape[0]} images but {labels.shape[0]} labels: "
            "replace it with the official file."
        )
    k = NUM_CLASSES[name]
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= k:
        raise DataError(
            f"CIFAR file {path} has labels in [{lo}, {hi}], outside [0, {k}) for "
            f"{_PRETTY[name]}: check that data.dataset matches the files."
        )
    return data, labels.astype(np.int64)


def load_cifar(
    name: DatasetName,
    root: str | os.PathLike[str],
    train: bool,
    *,
    download: bool = False,
    verify: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images uint8 [N,3,32,32], labels int64 [N])`` of the official
    "python version" CIFAR files.

    ``root`` is the folder that holds ``cifar-10-batches-py`` /
    ``cifar-100-python``, or that batches folder itself. Files are read with a
    restricted unpickler (a file cannot run code) and validated.

    Args:
        name: ``"cifar10"`` or ``"cifar100"`` (CIFAR-100 gives the fine labels).
        root: where the data lives (or will be downloaded to).
        train: the training split (50,000 images) or the test split (10,000).
        download: fetch and extract the official tarball into ``root`` when the
            folder is missing. Never happens unless asked.
        verify: compare every file read with its official MD5, so results are
            never silently computed on a different copy. ``False`` reads a copy
            known to differ (a subset, a re-encoded set) and warns once.

    Raises:
        DataError: the folder or a file is missing, malformed, unsafe, or fails
            verification; the message says how to fix it.
    """
    _check_name(name)
    root_path = Path(os.fspath(root)).expanduser()
    folder = _find_folder(name, root_path, train)
    if folder is None:
        if not download:
            raise DataError(
                f"{_PRETTY[name]} folder {_FOLDERS[name]} not found in {root_path}: download it "
                f"with {HOW_TO_DOWNLOAD}, or point data.root at a folder holding {_FOLDERS[name]}."
            )
        download_tarball(URLS[name], TARBALL_MD5[name], root_path, folder=_FOLDERS[name], what=_PRETTY[name],
                         default_name=f"{name}.tar.gz")
        folder = root_path / _FOLDERS[name]
    files = [folder / f for f in _SPLIT_FILES[name][train]]
    for path in files:
        if not path.is_file():
            raise DataError(
                f"{_PRETTY[name]} folder {folder} has no file {path.name}: download it with "
                f"{HOW_TO_DOWNLOAD}, or point data.root at a folder holding a complete {_FOLDERS[name]}."
            )
    if not verify:
        warnings.warn(
            f"{_PRETTY[name]} files in {folder} were read without checking their checksums "
            "(verify=False): results on them may not be comparable with the official data.",
            ChecksumWarning,
            stacklevel=2,
        )
    datas, labels = zip(*(_read_batch(name, path, verify) for path in files), strict=True)
    x = np.concatenate(datas).reshape(-1, 3, 32, 32)
    y = np.concatenate(labels)
    return torch.from_numpy(x), torch.from_numpy(y)


# --------------------------------------------------------------------------- #
# Bundled subset
# --------------------------------------------------------------------------- #

_BUNDLED = "cifar10_mini.npz"


def load_bundled() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train uint8 [N,3,32,32], y_train int64, x_test uint8, y_test int64)``
    of the small real CIFAR-10 subset shipped inside the package.

    It works offline, so demos, tests and smoke runs need no download: the
    first 3,000 training and 1,000 test images of a JPEG-recovered CIFAR-10
    copy (see ``clat/assets/README.md``; report results on it as
    "CIFAR-10 subset (JPEG-recovered)").
    """
    ref = resources.files("clat") / "assets" / _BUNDLED
    try:
        with resources.as_file(ref) as path, np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, KeyError, ValueError) as err:
        raise DataError(
            f"The bundled data set clat/assets/{_BUNDLED} is missing or damaged ({err}): "
            "reinstall clat, or rebuild it with scripts/make_mini_cifar.py."
        ) from None
    out: list[torch.Tensor] = []
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if (
            x.dtype != np.uint8
            or x.ndim != 4
            or x.shape[1:] != (3, 32, 32)
            or y.shape != (x.shape[0],)
            or y.dtype.kind not in "iu"
            or (y.size and int(y.max()) >= NUM_CLASSES["cifar10"])
        ):
            raise DataError(
                f"The bundled data set clat/assets/{_BUNDLED} has malformed {split} arrays: "
                "reinstall clat, or rebuild it with scripts/make_mini_cifar.py."
            )
        out += [torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64))]
    return out[0], out[1], out[2], out[3]
