"""Items of a map-style torch ``Dataset`` as clat reads them (:mod:`clat.stream` feeds a run from them).

* An item is ``(image, label)``: the image a tensor ``[C, H, W]`` (or ``[H, W]``), a PIL image (made RGB) or a numpy
  array; the label an integer. :func:`collate` stacks a batch of them, or returns the :class:`BadItem` that says what is
  wrong, so that a problem found in a worker process reaches the training process as one line, not a traceback.
* :class:`SeededItems` reads each item with torch's (CPU), Python's and numpy's global generators seeded with a seed of
  its own, so random transforms give the same images in any process; in the training process its own generators are
  restored afterwards.
* :class:`FolderDataset` reads an image folder one image at a time (``data.stream=true``).
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from clat.base.errors import DataError
from clat.data.readers import class_folders, image_files, interleaved, pillow, read_image, same_classes

__all__ = ["BadItem", "SeededItems", "collate", "as_pair", "FolderDataset"]


class BadItem:
    """A problem found while reading an item or a batch (maybe in a worker process), raised as a one-line DataError by
    the training process (an exception raised in a worker would arrive wrapped in a multi-line traceback)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def seed_globals(s: int) -> None:
    torch.default_generator.manual_seed(s)  # the CPU generator only: a GPU's belongs to the run
    random.seed(s)
    np.random.seed(s & 0xFFFFFFFF)


@contextlib.contextmanager
def kept_globals():
    """The training process's global generators, restored after an item read here."""
    state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(state[0])
        random.setstate(state[1])
        np.random.set_state(state[2])


class SeededItems(Dataset):
    """``items[(j, s)]``: ``dataset[j]`` read with the global generators seeded with ``s``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        j, s = key
        if get_worker_info() is not None:  # a worker process: its generators are its own
            seed_globals(s)
            return self.dataset[j]
        with kept_globals():
            seed_globals(s)
            return self.dataset[j]


def image_tensor(im: Any) -> torch.Tensor | BadItem:
    """One item's image as a tensor ``[C, H, W]``: a tensor ``[C, H, W]`` or ``[H, W]``, a PIL image (RGB), or a numpy
    array ``[H, W, C]``, ``[C, H, W]`` or ``[H, W]``."""
    if type(im).__module__.startswith("PIL."):
        im = np.asarray(im.convert("RGB"))
    if isinstance(im, np.ndarray):
        if im.ndim == 3 and (im.shape[2] in (1, 3)) != (im.shape[0] in (1, 3)):
            im = im.transpose(2, 0, 1) if im.shape[2] in (1, 3) else im
        elif im.ndim == 3:
            return BadItem(f"an image has the ambiguous shape {im.shape}: return images as tensors [C, H, W]")
        if im.dtype != np.uint8 and im.dtype.kind != "f":
            return BadItem(f"images must be uint8 (0-255) or float in [0, 1], got a numpy {im.dtype} image: convert it")
        im = torch.from_numpy(np.ascontiguousarray(im, dtype=np.float32 if im.dtype.kind == "f" else np.uint8))
    if not isinstance(im, torch.Tensor):
        return BadItem(f"an item's image is a {type(im).__name__}: return a tensor [C, H, W] (transforms.ToTensor()/PILToTensor()), "
                       "a PIL image or a numpy array")
    if im.ndim == 2:
        im = im[None]
    if im.ndim != 3:
        return BadItem(f"an item's image has shape {tuple(im.shape)}: return one image [C, H, W] per item (batching is clat's)")
    return im


def label(y: Any) -> int | BadItem:
    if isinstance(y, torch.Tensor) and y.numel() == 1 and not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool):
        return int(y)
    if isinstance(y, (int, np.integer)) and not isinstance(y, bool):
        return int(y)
    return BadItem(f"an item's label is {y!r} ({type(y).__name__}): labels are integer class indices 0..K-1")


def collate(items: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor] | BadItem:
    """``(images [B, C, H, W], labels int64 [B])`` of ``(image, label)`` items (:func:`image_tensor`'s images), or the
    :class:`BadItem` that says what is wrong."""
    bad = next((it for it in items if isinstance(it, BadItem)), None)
    if bad is not None:
        return bad
    if not all(isinstance(it, (tuple, list)) and len(it) == 2 for it in items):
        it = items[0] if items else None
        kind = f"a {type(it).__name__} of {len(it)}" if isinstance(it, (tuple, list)) else f"a {type(it).__name__}"
        return BadItem(f"items must be (image, label) pairs, got {kind}: make __getitem__ return (image, label)")
    images = [image_tensor(im) for im, _ in items]
    labels = [label(y) for _, y in items]
    bad = next((it for it in images + labels if isinstance(it, BadItem)), None)
    if bad is not None:
        return bad
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1 or len({im.dtype for im in images}) > 1:
        shown = sorted("x".join(map(str, s)) for s in shapes)[:3]
        return BadItem(f"images of different sizes or types in one batch ({', '.join(shown)}, CxHxW): give every image the same "
                       "size and type (a Resize transform; data.image_size for an image folder)")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def as_pair(batch: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, BadItem):
        raise DataError(f"{what}: {batch.message}")
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch)):
        raise DataError(f"{what}: a batch must be (images, labels) tensors, got a {type(batch).__name__}: make the collate_fn return them")
    return batch[0], batch[1]


class FolderDataset(Dataset):
    """The images of ``root/<split>/<class>/`` read one at a time: ``(uint8 [3, H, W], label)`` items in the order and with
    the classes of :func:`clat.data.readers.load_image_folder` (the first ``limit``), resized to ``image_size`` when given.
    ``size`` ``(width, height)``: the size every image must have (default: the first image's, or ``image_size``)."""

    def __init__(self, root: str | os.PathLike[str], split: str, *, image_size: int | None = None, class_names: list[str] | None = None,
                 size: tuple[int, int] | None = None, limit: int | None = None) -> None:
        image_module = pillow()
        self.root = Path(os.fspath(root)).expanduser()
        names = class_folders(self.root, split)
        if class_names is not None:
            same_classes(self.root / split, names, list(class_names))
        order = interleaved([image_files(self.root / split / name) for name in names])[:limit]
        self.files, self.targets, self.classes = [p for _, p in order], [c for c, _ in order], names
        self.image_size = image_size
        if image_size:
            self.size, self._ref = (image_size, image_size), "data.image_size is"
        elif size is not None:
            self.size, self._ref = tuple(size), "the training images are"
        else:
            try:
                with image_module.open(self.files[0]) as im:
                    self.size, self._ref = im.size, f"{self.files[0]} is"
            except (OSError, ValueError, image_module.DecompressionBombError) as err:
                raise DataError(f"cannot read image {self.files[0]} ({err}): replace or delete the file") from None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | BadItem:
        path = self.files[i]
        try:
            img = read_image(path, pillow(), self.image_size)
        except DataError as err:
            return BadItem(str(err))
        if (img.shape[1], img.shape[0]) != tuple(self.size):
            return BadItem(f"image {path} is {img.shape[1]}x{img.shape[0]} pixels but {self._ref} {self.size[0]}x{self.size[1]}: "
                           "all images must have one size; set data.image_size to resize them")
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), self.targets[i]
