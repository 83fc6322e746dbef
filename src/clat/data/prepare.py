"""The splits of a run: those its config names (:func:`prepare_data`, from the data sets of :data:`DATASETS`), or the data given
from Python (:func:`run_data`)."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from clat.base.errors import ConfigError, DataError
from clat.base.registry import Registry
from clat.data.cifar import NUM_CLASSES, load_bundled, load_cifar
from clat.data.loader import Splits, train_val_split
from clat.data.readers import load_own
from clat.data.stream import DatasetSplits, as_splits, fingerprint, python_data_message, stream_folder

# The data sets a run may name (``data.dataset``; :class:`clat.base.registry.Registry`): a loader ``fn(cfg)`` returns the
# data set, as :class:`Images` (or the four tensors x_train, y_train, x_test, y_test), or as splits made already (a
# :class:`Splits`, :class:`DatasetSplits` or anything ``clat.train(data=...)`` takes). ``checked=False``: clat's own
# files, known good, skip the checks of :meth:`Splits.from_tensors` (which every other data set goes through).
DATASETS = Registry("dataset", "data.dataset")


@dataclass
class Images:
    """A data set as tensors, before clat cuts it (``data.train_size``, ``data.test_size``) and draws the validation
    split (``data.val_size``, ``data.split_seed``): images ``[N, C, H, W]`` uint8 or float in [0, 1], integer labels.
    ``num_classes``: None for ``model.num_classes``, else the largest label + 1."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int | None = None
    name: str | None = None  # None: the data.dataset name
    class_names: list[str] | None = None


@DATASETS.register("bundled", description="the CIFAR-10 subset shipped in the package (JPEG-recovered; CPU demos and tests)", checked=False)
def _bundled(cfg) -> Images:
    return Images(*load_bundled(), 10, "CIFAR-10 subset (JPEG-recovered, bundled)")


def _cifar(cfg) -> Images:
    d = cfg.data
    x_tr, y_tr = load_cifar(d.dataset, d.root, True, download=d.download, verify=d.verify)
    x_te, y_te = load_cifar(d.dataset, d.root, False, download=False, verify=d.verify)
    return Images(x_tr, y_tr, x_te, y_te, NUM_CLASSES[d.dataset], d.dataset)


DATASETS.add("cifar10", _cifar, description="CIFAR-10 from data.root (data.download=true fetches it, checksums verified)", checked=False)
DATASETS.add("cifar100", _cifar, description="CIFAR-100 from data.root (data.download=true fetches it, checksums verified)", checked=False)


def _own(cfg) -> Images:
    if cfg.data.dataset == "folder" and cfg.data.stream:
        return stream_folder(cfg, split_seed(cfg))
    x_tr, y_tr, x_te, y_te, num_classes, name, class_names = load_own(cfg)
    return Images(x_tr, y_tr, x_te, y_te, num_classes, name, class_names)


DATASETS.add("folder", _own, description="your images: data.root/{train,test}/<class>/<image> (docs/data.md)")
DATASETS.add("npz", _own, description="your arrays: a .npz file at data.root with x_train, y_train, x_test, y_test (docs/data.md)")


@DATASETS.register("python", description="recorded by clat.train(data=...): data given from Python")
def _python(cfg) -> Images:
    raise DataError(python_data_message(cfg.data.fingerprint))


def prepare_data(cfg) -> Splits | DatasetSplits:
    """The splits a run config (:class:`clat.config.schema.Config`) describes: the data set ``data.dataset`` loaded
    (:data:`DATASETS`), cut to size, and the validation split carved from the training data with ``data.split_seed``.
    ``data.dataset=folder`` and ``npz`` read your own data from ``data.root`` (:func:`clat.data.readers.load_own`);
    they, and a loader of your own (``data.dataset=mymodule:load``), go through :meth:`Splits.from_tensors` and its checks."""
    d = cfg.data
    entry = DATASETS.entry(d.dataset)
    got = entry.obj(cfg)
    if isinstance(got, tuple) and len(got) == 4 and all(isinstance(t, torch.Tensor) for t in got):
        got = Images(*got)
    if isinstance(got, (Splits, DatasetSplits)):
        return got
    if not isinstance(got, Images):
        return as_splits(got, cfg)
    x_tr, y_tr, x_te, y_te = got.x_train, got.y_train, got.x_test, got.y_test
    if d.train_size is not None:
        x_tr, y_tr = x_tr[: d.train_size], y_tr[: d.train_size]
    if d.test_size is not None:
        x_te, y_te = x_te[: d.test_size], y_te[: d.test_size]
    if d.val_size >= len(x_tr):
        raise ConfigError(f"data.val_size={d.val_size} leaves no training images out of {len(x_tr)}; lower it")
    seed = split_seed(cfg)
    num_classes = got.num_classes if got.num_classes is not None else cfg.model.num_classes
    name = got.name or d.dataset
    if entry.extra.get("checked", True):
        return Splits.from_tensors(x_tr, y_tr, x_te, y_te, val_size=d.val_size, split_seed=seed, num_classes=num_classes,
                                   name=name, class_names=got.class_names)
    tr_idx, va_idx = train_val_split(len(x_tr), d.val_size, seed)
    return Splits(x_tr[tr_idx], y_tr[tr_idx], x_tr[va_idx], y_tr[va_idx], x_te, y_te, num_classes, name)


def split_seed(cfg) -> int:
    """``data.split_seed``, or ``seed`` where it is null (clat 0.1's rule, with a warning)."""
    if cfg.data.split_seed is None:  # clat 0.1: the split followed the training seed
        if cfg.seed != 0:
            warnings.warn(f"data.split_seed is null: the validation split follows seed={cfg.seed}, so a run with another seed (or the "
                          "checkpoint it starts from) may have trained on these validation images; set data.split_seed to a fixed value",
                          stacklevel=3)
        return cfg.seed
    return cfg.data.split_seed


def run_data(cfg, data: Any, *, resume: bool, run: Any) -> tuple[Splits | DatasetSplits, Any]:
    """The splits of a run (``data=`` of :func:`clat.train`, else those its config names) and the config it records: given
    data, ``data.dataset=python`` with the data's :func:`fingerprint` (and the workers that read it). Resumed, the data
    must be the recorded one (runs of clat 0.2 recorded none), and a run on Python data cannot continue without it."""
    if data is None:
        if resume and cfg.data.dataset == "python":
            raise ConfigError(f"--resume: {run} was trained on data given from Python ({cfg.data.fingerprint}): continue it from "
                              "Python, clat.train(None, run_dir, resume=True, data=<the same data>)")
        return prepare_data(cfg), cfg
    splits = as_splits(data, cfg)
    fp = fingerprint(splits)
    if resume:
        if cfg.data.dataset == "python" and cfg.data.fingerprint not in (None, fp):
            raise DataError(f"data= is not the data this run was trained on (recorded: {cfg.data.fingerprint}; given: {fp}): pass the "
                            "same data to continue it, or start a new run")
        return splits, cfg
    cfg = copy.deepcopy(cfg)
    cfg.data.dataset, cfg.data.fingerprint = "python", fp
    if isinstance(splits, DatasetSplits):
        cfg.data.workers = splits.workers
    return splits, cfg
