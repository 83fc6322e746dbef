"""Streamed data: torch ``Dataset``s and ``DataLoader``s, and image folders read from disk every epoch (docs/data.md).

The in-memory :class:`clat.data.loader.Loader` stays the fast path for CIFAR-size arrays. This module feeds a run from a
``Dataset`` whose items are ``(image, label)`` pairs, read again every epoch:

* The order is clat's own: the seeded permutation of :class:`clat.data.loader.Loader` (the same one, so a Dataset holding
  the images of a :class:`clat.data.loader.Splits` gives the very batches of the in-memory path), sharded over the ranks of a
  data-parallel run the same way.
* Items are read by ``data.workers`` worker processes (a fresh ``DataLoader`` per epoch), pinned when the device is a
  GPU; clat's augmentation (``data.augment``) then runs on the device, drawn exactly as the in-memory loader draws it.
* Each item is read with torch's (CPU), Python's and numpy's global generators seeded from (run seed, epoch, position in
  the epoch), so a Dataset's random transforms give the same images whatever the number of workers, and after a
  resume; the training process's own generators are restored after every item it reads itself.
* Every batch is checked where it arrives (image dtype, range and size; label range): a problem stops the run with one
  line that says how to fix it.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler, Subset
from torch.utils.data._utils.collate import default_collate

from clat.base.errors import ConfigError, DataError
from clat.data.items import FolderDataset, SeededItems, as_pair, collate
from clat.data.loader import Loader, Splits, derive_seed, to_unit_float, train_val_split
from clat.data.readers import check_every_class_trained

__all__ = ["DatasetSplits", "StreamLoader", "as_splits", "train_loader", "stream_folder", "fingerprint", "python_data_message"]

log = logging.getLogger("clat")

_MASK = (1 << 63) - 1
_READ_BATCH = 256  # items per batch when a split is read into memory (validation, test, samples)


# --------------------------------------------------------------------------- #
# A run's data as Datasets
# --------------------------------------------------------------------------- #


def _class_count(dataset: Any, num_classes: int | None) -> int:
    """``num_classes``, else the dataset's ``classes`` (torchvision's datasets have them), else its ``targets``' largest + 1."""
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise DataError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        return num_classes
    classes = getattr(dataset, "classes", None)
    if isinstance(classes, (list, tuple)) and len(classes) >= 2:
        return len(classes)
    targets = _targets(dataset)
    if targets is not None and len(targets):
        return max(2, int(targets.max()) + 1)
    raise DataError(f"cannot tell how many classes the {type(dataset).__name__} has (it has no `classes` or `targets`): give "
                    "num_classes (clat.DatasetSplits(..., num_classes=K); model.num_classes=K for data=dataset)")


def _targets(dataset: Any) -> torch.Tensor | None:
    """The labels of every item without reading an image, where the dataset keeps them (``targets``), else None."""
    t = getattr(dataset, "targets", None)
    if t is None:
        return None
    try:
        t = torch.as_tensor(t)
    except (TypeError, ValueError, RuntimeError):
        return None
    ok = t.ndim == 1 and len(t) == len(dataset) and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
    return t.to(torch.int64) if ok else None


def _check_dataset(dataset: Any, what: str) -> None:
    if isinstance(dataset, IterableDataset):
        raise DataError(f"{what} is an IterableDataset, which clat cannot order, shard or resume exactly: give a map-style Dataset "
                        "(__getitem__ and __len__)")
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise DataError(f"{what} must be a torch Dataset (__getitem__ and __len__), got a {type(dataset).__name__}")
    if len(dataset) == 0:
        raise DataError(f"{what} holds no items: give at least one")


class DatasetSplits:
    """A run's data as torch ``Dataset``s of ``(image, label)`` items, read (streamed) every epoch: pass it as
    ``clat.train(cfg, run, data=...)``.

    ``train``: the training items; ``val``: held-out items for the per-epoch metrics and choices, else ``val_size``
    training items drawn with ``split_seed`` (:func:`clat.data.loader.train_val_split`, as :meth:`clat.Splits.from_tensors`
    does); ``test``: kept for evaluation (``x_test``), never used by training. ``num_classes``: else the dataset's
    ``classes``, else its ``targets``' largest + 1. ``workers``: worker processes (None: the run's ``data.workers``).

    An item's image is a tensor ``[C, H, W]`` (uint8 0-255 or float in [0, 1]: do not normalize), a PIL image or a
    numpy array; its label an integer. All images must have one size. ``x_val``/``x_test``/``x_train`` read a whole
    split into memory on first use (the loop reads only the validation split).
    """

    def __init__(self, train: Dataset, test: Dataset | None = None, *, val: Dataset | None = None, val_size: int = 1000,
                 split_seed: int = 0, num_classes: int | None = None, name: str = "custom", class_names: list[str] | None = None,
                 workers: int | None = None) -> None:
        _check_dataset(train, "the training Dataset")
        for ds, what in ((val, "the validation Dataset"), (test, "the test Dataset")):
            if ds is not None:
                _check_dataset(ds, what)
        self.num_classes = _class_count(train, num_classes)
        if class_names is not None and len(class_names) != self.num_classes:
            raise DataError(f"{len(class_names)} class_names for {self.num_classes} classes: give one name per class")
        targets = _targets(train)
        if targets is not None:
            check_every_class_trained(targets, self.num_classes, class_names)
        self.source = type(train).__name__
        if val is None:
            if isinstance(val_size, bool) or not isinstance(val_size, int) or not 0 <= val_size < len(train):
                raise DataError(f"val_size={val_size!r} must be in [0, {len(train)}) for {len(train)} training items (0: no validation)")
            tr, va = train_val_split(len(train), val_size, split_seed)
            train, val = Subset(train, tr.tolist()), Subset(train, va.tolist())
        self.train, self.val, self.test = train, val, test
        self.name, self.class_names = name, None if class_names is None else list(class_names)
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            raise DataError(f"workers must be an integer >= 0 (0: the training process reads the items), got {workers!r}")
        self.workers = workers
        self.loader_options: dict[str, Any] = {}  # a DataLoader's worker_init_fn, multiprocessing_context, ...
        self.collate_fn = None  # a DataLoader's own collate_fn, when it has one
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._first: torch.Tensor | None = None

    # -- what the loop asks -------------------------------------------------------------------
    @property
    def n_train(self) -> int:
        return len(self.train)

    def probe(self, n: int) -> torch.Tensor:
        """The first ``n`` training images (read with fixed seeds): what the model is traced with."""
        return self._read(self.train, list(range(min(n, self.n_train))), derive_seed("probe"), "the training Dataset", check=False)[0]

    @property
    def first_image(self) -> torch.Tensor:
        """The first training image ``[1, C, H, W]``: every image must have its size (and an empty split its type)."""
        if self._first is None:
            self._first = self.probe(1)
        return self._first

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.first_image.shape[1:])

    def sampler(self, generator_of_epoch, device: torch.device | str = "cpu"):
        """:meth:`clat.data.loader.Splits.sampler` of the Dataset: the same indices, read with seeds drawn from the same generator."""
        def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            g = generator_of_epoch()
            idx = torch.randperm(self.n_train, generator=g)[:n]
            s0 = int(torch.randint(0, 1 << 62, (1,), generator=g))
            x, y = self._read(self.train, idx.tolist(), s0, "the training Dataset")
            return to_unit_float(x.to(device)), y.to(device)

        return sample

    x_train = property(lambda self: self._split("train")[0], doc="Every training image, read into memory on first use.")
    y_train = property(lambda self: self._split("train")[1])
    x_val = property(lambda self: self._split("val")[0], doc="Every validation image, read into memory on first use.")
    y_val = property(lambda self: self._split("val")[1])
    x_test = property(lambda self: self._split("test")[0], doc="Every test image, read into memory on first use.")
    y_test = property(lambda self: self._split("test")[1])

    def _split(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        if part not in self._cache:
            ds = getattr(self, part)
            if ds is None:
                raise DataError("this DatasetSplits has no test split: give it one (clat.DatasetSplits(train, test)), or evaluate "
                                "on other data (clat eval --dataset npz --root FILE.npz)")
            if part == "train":
                log.info("reading all %d training items of %s into memory", len(ds), self.name)
            self._cache[part] = self._read(ds, list(range(len(ds))), derive_seed("split", part), f"the {part} Dataset")
        return self._cache[part]

    def _read(self, ds: Dataset, idx: list[int], seed: int, what: str, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``idx`` of ``ds`` as ``(images, labels)`` in memory, item k read with the seed ``seed + k``."""
        keys = [(j, (seed + k) & _MASK) for k, j in enumerate(idx)]
        batches = [keys[i : i + _READ_BATCH] for i in range(0, len(keys), _READ_BATCH)]
        xs, ys = [], []
        for batch in read_batches(self, ds, batches, worker_seed=seed, pin=False):
            x, y = as_pair(batch, what)
            xs.append(self.check(x, y, what) if check else x)
            ys.append(y.to(torch.int64))
        if not xs:
            return self.first_image[:0].clone(), torch.empty(0, dtype=torch.int64)
        return torch.cat(xs), torch.cat(ys)

    def check(self, x: torch.Tensor, y: torch.Tensor, what: str) -> torch.Tensor:
        """``x`` if the batch ``(x, y)`` is what clat takes (images of the first training image's size, uint8 or float in
        [0, 1]; labels in 0..K-1), else a one-line DataError."""
        if tuple(x.shape[1:]) != self.image_shape:
            raise DataError(f"{what} gives images of {'x'.join(map(str, x.shape[1:]))} (CxHxW) but the first training image is "
                            f"{'x'.join(map(str, self.image_shape))}: give every image the same size (a Resize transform; data.image_size)")
        if x.dtype != torch.uint8:
            if not x.is_floating_point():
                raise DataError(f"{what} gives {x.dtype} images: give uint8 (0-255) or float images in [0, 1]")
            lo, hi = float(x.min()), float(x.max())
            if not (lo >= 0.0 and hi <= 1.0):
                raise DataError(f"{what} gives float images with values from {lo:.4g} to {hi:.4g}, not in [0, 1]: clat's models "
                                "normalize inside the model, so drop a Normalize transform (ToTensor gives [0, 1])")
        if y.ndim != 1 or len(y) != len(x) or y.is_floating_point():
            raise DataError(f"{what} gives labels of shape {tuple(y.shape)} ({y.dtype}): one integer class index per image")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise DataError(f"{what} gives the label {int(y.max()) if int(y.max()) >= self.num_classes else int(y.min())}, outside "
                            f"0..{self.num_classes - 1} ({self.num_classes} classes): fix the labels or give num_classes")
        return x

    def fingerprint(self) -> str:
        """What the data is, in one line: sizes, image shape and type, classes and a sha256 of the validation labels and of
        up to 64 validation images and the first 2 training images (read with fixed seeds)."""
        x_val, y_val = self.x_val, self.y_val
        probe = self.probe(2)
        h = hashlib.sha256(repr((self.source, self.n_train, len(y_val), self.num_classes, tuple(probe.shape[1:]),
                                 str(probe.dtype))).encode())
        for t in (y_val, probe, x_val[torch.linspace(0, len(x_val) - 1, min(64, len(x_val))).long()] if len(x_val) else x_val):
            h.update(t.contiguous().numpy().tobytes())
        shape = "x".join(map(str, probe.shape[1:]))
        name = self.name if self.name == self.source else f"{self.name} ({self.source})"
        return (f"{name}: {self.n_train} train + {len(y_val)} val items {shape} {str(probe.dtype).removeprefix('torch.')}, "
                f"{self.num_classes} classes, sha256 {h.hexdigest()[:16]}")


def read_batches(splits: DatasetSplits, ds: Dataset, batches: list[list[tuple[int, int]]], *, worker_seed: int,
                 pin: bool) -> Iterator[Any]:
    """The collated batches of ``ds`` for ``batches`` of ``(index, seed)`` keys, in order: read by ``splits.workers`` worker
    processes (a DataLoader of its own), or here when it is 0."""
    fn = splits.collate_fn or collate
    items = SeededItems(ds)
    if not splits.workers:
        for keys in batches:
            batch = fn([items[k] for k in keys])
            yield tuple(t.pin_memory() for t in batch) if pin and isinstance(batch, tuple) else batch
        return
    loader = DataLoader(items, batch_sampler=batches, num_workers=splits.workers, collate_fn=fn, pin_memory=pin,
                        generator=torch.Generator().manual_seed(worker_seed), **splits.loader_options)
    yield from loader


# --------------------------------------------------------------------------- #
# Training batches
# --------------------------------------------------------------------------- #


class StreamLoader(Loader):
    """:class:`clat.data.loader.Loader`'s batches of a :class:`DatasetSplits`' training items: the same order, sharding and
    augmentation, the items read in worker processes every epoch and moved to ``device`` batch by batch."""

    def __init__(self, splits: DatasetSplits, batch_size: int, *, shuffle: bool = False, augment: bool | str = False,
                 drop_last: bool = False, seed: int = 0, device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1) -> None:
        self._setup(batch_size, shuffle=shuffle, augment=augment, drop_last=drop_last, seed=seed, device=device, rank=rank,
                    world_size=world_size)
        if world_size > 1 and not drop_last:
            raise DataError("a streamed Dataset over several ranks needs drop_last=True (full global batches on every rank)")
        self.splits = splits

    @property
    def num_examples(self) -> int:
        return self.splits.n_train

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x float32 [b,C,H,W] in [0,1], y int64 [b])`` on ``device``."""
        plan = list(self._plan(self._permutation().cpu()))
        first = derive_seed(self.seed, self.epoch, "items")  # item seeds follow the position in the epoch, whatever the ranks
        global_batch = self.batch_size * self.world_size
        batches = [[(j, (first + i * global_batch + start + k) & _MASK) for k, j in enumerate(idx.tolist())]
                   for i, idx, start, _, _ in plan]
        gen = torch.Generator() if self._aug else None
        pin = self.device.type == "cuda"
        read = read_batches(self.splits, self.splits.train, batches, worker_seed=derive_seed(self.seed, self.epoch, "workers"), pin=pin)
        for (i, _, start, stop, size), batch in zip(plan, read):
            x, y = as_pair(batch, "the training Dataset")
            x = self.splits.check(x, y, "the training Dataset")
            x = to_unit_float(x.to(self.device, non_blocking=pin))
            yield self._augmented(x, i, start, stop, size, gen), y.to(self.device, torch.int64, non_blocking=pin)


def train_loader(splits: Splits | DatasetSplits, batch_size: int, **kwargs) -> Loader:
    """The training batches of a run's data: :class:`clat.data.loader.Loader` for in-memory :class:`clat.data.loader.Splits`,
    :class:`StreamLoader` for :class:`DatasetSplits` (keyword arguments: the Loader's)."""
    if isinstance(splits, DatasetSplits):
        return StreamLoader(splits, batch_size, **kwargs)
    return Loader(splits.x_train, splits.y_train, batch_size, **kwargs)


# --------------------------------------------------------------------------- #
# What clat.train(data=...) takes, and what a run records of it
# --------------------------------------------------------------------------- #


def as_splits(data: Any, cfg) -> Splits | DatasetSplits:
    """``data=`` of :func:`clat.train` as a run's splits: a :class:`clat.Splits` or :class:`DatasetSplits` as it is (its
    ``workers`` defaulting to ``data.workers``); a map-style ``Dataset`` as the training items, the validation split drawn
    by ``data.val_size`` and ``data.split_seed``; a ``DataLoader`` as its dataset, its workers and collate_fn (the order is
    clat's own: a sampler of its own is refused)."""
    if isinstance(data, Splits):
        return data
    if isinstance(data, DataLoader):
        return _from_loader(data, cfg)
    if isinstance(data, DatasetSplits):
        splits = data
    elif isinstance(data, (Dataset, IterableDataset)) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")
                                                          and not isinstance(data, (torch.Tensor, np.ndarray, str, bytes))):
        splits = _from_dataset(data, cfg)
    else:
        raise DataError(f"data= takes a clat.Splits, a clat.DatasetSplits, a torch Dataset or a DataLoader, got a {type(data).__name__} "
                        "(arrays: clat.Splits.from_numpy / from_tensors)")
    if splits.workers is None:
        splits = copy.copy(splits)
        splits.workers = cfg.data.workers
    return splits


def _from_dataset(ds: Any, cfg) -> DatasetSplits:
    _check_dataset(ds, "data=")
    d = cfg.data
    if d.val_size >= len(ds):
        raise ConfigError(f"data.val_size={d.val_size} leaves no training items out of the Dataset's {len(ds)}; lower it")
    return DatasetSplits(ds, val_size=d.val_size, split_seed=cfg.seed if d.split_seed is None else d.split_seed,
                         num_classes=cfg.model.num_classes, name=type(ds).__name__)


def _from_loader(loader: DataLoader, cfg) -> DatasetSplits:
    """A DataLoader's dataset, workers and collate_fn; its sampler must be the plain one (shuffle true or false)."""
    _check_dataset(loader.dataset, "the DataLoader's dataset")
    s = loader.sampler
    plain = type(s) is SequentialSampler or (type(s) is RandomSampler and not s.replacement and s._num_samples is None)
    if loader.batch_size is None or type(loader.batch_sampler) is not BatchSampler or not plain:
        raise DataError(f"data=DataLoader with its own {'batch_sampler' if loader.batch_size is None else type(s).__name__}: clat draws "
                        "the order itself (seeded, sharded over ranks, resumed exactly), so it takes a DataLoader with batch_size= and "
                        "shuffle= only; pass loader.dataset for anything else")
    if loader.batch_size != cfg.data.batch_size:
        raise ConfigError(f"data=DataLoader(batch_size={loader.batch_size}) but data.batch_size={cfg.data.batch_size}: give both the same "
                          "batch size (the run's config records it)")
    splits = _from_dataset(loader.dataset, cfg)
    splits.workers = loader.num_workers
    if loader.num_workers:
        splits.loader_options = {"worker_init_fn": loader.worker_init_fn, "multiprocessing_context": loader.multiprocessing_context,
                                 "prefetch_factor": loader.prefetch_factor, "timeout": loader.timeout}
    if loader.collate_fn is not default_collate:
        splits.collate_fn = loader.collate_fn
    return splits


def fingerprint(splits: Splits | DatasetSplits) -> str:
    """What a run's data is, in one line: split sizes, image shape and type, classes and a sha256 of every label and of up
    to 64 evenly spaced images of each split (:meth:`DatasetSplits.fingerprint` for Datasets)."""
    if isinstance(splits, DatasetSplits):
        return splits.fingerprint()
    parts = [(getattr(splits, f"x_{p}"), getattr(splits, f"y_{p}")) for p in ("train", "val", "test")]
    x = splits.x_train
    h = hashlib.sha256(repr((splits.num_classes, [tuple(xp.shape) for xp, _ in parts], str(x.dtype))).encode())
    for xp, yp in parts:
        h.update(yp.to(torch.int64).contiguous().numpy().tobytes())
        if len(xp):
            h.update(xp[torch.linspace(0, len(xp) - 1, min(64, len(xp))).long()].contiguous().numpy().tobytes())
    return (f"{splits.name} (tensors): {len(x)} train + {len(parts[1][0])} val + {len(parts[2][0])} test images "
            f"{'x'.join(map(str, x.shape[1:]))} {str(x.dtype).removeprefix('torch.')}, {splits.num_classes} classes, sha256 "
            f"{h.hexdigest()[:16]}")


def python_data_message(fingerprint: str | None) -> str:
    """The one line for a run whose data came from Python (``data.dataset=python``): what it was and how to give data."""
    return (f"data.dataset=python: the run was trained on data given from Python ({fingerprint or 'not recorded'}), which clat cannot "
            "read again: give data from files with --dataset npz --root FILE.npz or --dataset folder --root DIR, or from Python "
            "(clat.evaluate(model, x, y), clat.train(..., data=...)); see docs/data.md")


# --------------------------------------------------------------------------- #
# data.dataset=folder data.stream=true
# --------------------------------------------------------------------------- #


def stream_folder(cfg, split_seed: int) -> DatasetSplits:
    """The splits of ``data.dataset=folder data.stream=true``: those :func:`clat.data.prepare.prepare_data` holds in memory for
    the folder (the same images, order, cuts and validation split), read from disk every epoch."""
    d = cfg.data
    train = FolderDataset(d.root, "train", image_size=d.image_size, limit=d.train_size)
    test = FolderDataset(d.root, "test", image_size=d.image_size, class_names=train.classes, size=train.size, limit=d.test_size)
    if d.val_size >= len(train):
        raise ConfigError(f"data.val_size={d.val_size} leaves no training images out of {len(train)}; lower it")
    return DatasetSplits(train, test, val_size=d.val_size, split_seed=split_seed, num_classes=len(train.classes),
                         name=f"image folder {d.root}", class_names=train.classes, workers=d.workers)
