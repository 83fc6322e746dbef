"""The splits of a run: those its config names (:func:`prepare_data`), or the data given from Python (:func:`run_data`)."""

from __future__ import annotations

import copy
import warnings
from typing import Any

from clat.base.errors import ConfigError, DataError
from clat.data.cifar import NUM_CLASSES, load_bundled, load_cifar
from clat.data.loader import Splits, train_val_split
from clat.data.readers import OWN_DATASETS, load_own
from clat.data.stream import DatasetSplits, as_splits, fingerprint, python_data_message, stream_folder


def prepare_data(cfg) -> Splits:
    """The splits a run config (:class:`clat.config.schema.Config`) describes: the data set loaded, cut to size,
    and the validation split carved from the training data with ``data.split_seed``. ``data.dataset=folder``
    and ``npz`` read your own data from ``data.root`` (:func:`clat.data.readers.load_own`) and go through
    :meth:`Splits.from_tensors` and its checks."""
    d = cfg.data
    if d.dataset == "python":
        raise DataError(python_data_message(d.fingerprint))
    if d.dataset == "folder" and d.stream:
        return stream_folder(cfg, split_seed(cfg))
    own = d.dataset in OWN_DATASETS
    if own:
        x_tr, y_tr, x_te, y_te, num_classes, name, class_names = load_own(cfg)
    elif d.dataset == "bundled":
        x_tr, y_tr, x_te, y_te = load_bundled()
        num_classes, name = 10, "CIFAR-10 subset (JPEG-recovered, bundled)"
    else:
        x_tr, y_tr = load_cifar(d.dataset, d.root, True, download=d.download, verify=d.verify)
        x_te, y_te = load_cifar(d.dataset, d.root, False, download=False, verify=d.verify)
        num_classes, name = NUM_CLASSES[d.dataset], d.dataset
    if d.train_size is not None:
        x_tr, y_tr = x_tr[: d.train_size], y_tr[: d.train_size]
    if d.test_size is not None:
        x_te, y_te = x_te[: d.test_size], y_te[: d.test_size]
    if d.val_size >= len(x_tr):
        raise ConfigError(f"data.val_size={d.val_size} leaves no training images out of {len(x_tr)}; lower it")
    seed = split_seed(cfg)
    if own:
        return Splits.from_tensors(x_tr, y_tr, x_te, y_te, val_size=d.val_size, split_seed=seed, num_classes=num_classes,
                                   name=name, class_names=class_names)
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
