"""Training data: images as clat takes them, the train/validation/test splits of a run, augmentation and a fast loader.

* Images are uint8 (0-255) or float in [0, 1], shaped [N, C, H, W] (:func:`check_images` where they enter,
  :func:`to_unit_float` where a model reads them); the files they come from belong to :mod:`clat.cifar` (CIFAR)
  and :mod:`clat.userdata` (your own: image folders, ``.npz`` files, arrays; docs/data.md).
* Training data is small (CIFAR-10 is 150 MB as uint8), so the loader keeps
  the whole uint8 set on the device and builds float batches and the standard
  crop/flip augmentation there, vectorised (as airbench does), instead of
  decoding samples one by one in worker processes.
* Shuffling and augmentation randomness is derived from ``(seed, epoch)``
  alone, so any epoch can be reproduced on its own (exact resume), and it is
  drawn for the whole global batch, so a run sharded over several ranks sees
  exactly the batches of a single-rank run.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from clat.base.errors import DataError
from clat.data.augment import AUGMENTATIONS, augment, augment_mode, crop_flip, draw_augment_params  # noqa: F401  (public API)
from clat.data.cifar import (
    FILE_MD5,
    NUM_CLASSES,
    TARBALL_MD5,
    URLS,
    ChecksumWarning,
    DatasetName,
    load_bundled,
    # noqa: F401  (public API)
    load_cifar,
)
from clat.data.readers import (
    check_every_class_trained,
    check_labels,
    check_pair,
    class_count,
    images_from_numpy,
    labels_from_numpy,
    load_image_folder,
    load_npz,
    read_image_folders,
)

__all__ = ["DatasetName", "NUM_CLASSES", "URLS", "TARBALL_MD5", "FILE_MD5", "ChecksumWarning", "load_cifar", "load_bundled",
           "to_unit_float", "check_images", "train_val_split", "augment", "Loader", "Splits", "load_image_folder",
           "load_npz"]

# --------------------------------------------------------------------------- #
# Splits and augmentation
# --------------------------------------------------------------------------- #


def to_unit_float(x: torch.Tensor) -> torch.Tensor:
    """Images as float32 in [0, 1]: uint8 images are divided by 255, float images are taken as they are
    (they are [0, 1] already: :func:`check_images` checks that where they enter)."""
    return x.to(torch.float32).div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float32)


def check_images(x: torch.Tensor, what: str = "images") -> None:
    """uint8 images (0-255) or float images in [0, 1], shaped [N, C, H, W]; else a DataError that says how to fix them."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(f"{what} must be a tensor [N, C, H, W], got {shape}")
    if x.dtype == torch.uint8:
        return
    if not x.is_floating_point():
        raise DataError(f"{what} must be uint8 (0-255) or float (0-1), got {x.dtype}: convert them first")
    if x.numel():
        lo, hi = x.min().item(), x.max().item()
        if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
            fix = "; divide them by 255 (or pass them as uint8)" if hi > 1.0 else ""
            raise DataError(f"float {what} must lie in [0, 1], got values from {lo:.4g} to {hi:.4g}{fix}")


def train_val_split(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint index tensors ``(train_idx, val_idx)`` covering ``range(n)``.

    A held-out validation set must be the same every time a run (or its
    resume) asks for it, so the split is drawn with a ``torch.Generator``
    seeded by ``seed`` alone. Both index tensors are sorted (int64, CPU).

    Raises:
        DataError: ``val_size`` is not in ``[0, n)``.
    """
    if not 0 <= val_size < n:
        raise DataError(
            f"Validation size {val_size} must be in [0, {n}) for {n} examples: "
            "choose a smaller validation size (0 disables validation)."
        )
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    return perm[val_size:].sort().values, perm[:val_size].sort().values


# --------------------------------------------------------------------------- #
# Loader
# --------------------------------------------------------------------------- #


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from a tuple of ints/strings; stable across runs and
    platforms (unlike ``hash``), and uncorrelated for neighbouring epochs."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Loader:
    """Batches from in-memory tensors.

    Images uint8 ``[N,3,32,32]`` are converted to float in [0, 1] batch by
    batch on ``device`` (float images are used as they are). The whole data
    set is moved to ``device`` once: CIFAR is small, and indexing on the device
    avoids a host-to-device copy per batch.

    Shuffling and augmentation use generators seeded from ``(seed, epoch)``
    (and the batch index), so epoch ``e`` is reproducible on its own, which an
    exact resume needs. Call :meth:`set_epoch` before each epoch; iterating
    twice without it repeats the same epoch.

    Sharding for distributed training: after the permutation (identical on
    every rank), each global batch of ``batch_size * world_size`` examples is
    split into ``world_size`` contiguous parts and rank ``r`` gets part ``r``.
    Augmentation randomness is drawn for the whole global batch, so the ranks'
    batches put together equal the single-rank batch of the global size. A
    last, partial global batch (``drop_last=False``) is split as evenly as
    possible; every rank yields the same number of batches (a rank's last batch
    may then be smaller, or even empty), so collective operations stay in step.
    Use ``drop_last=True`` for training with several ranks.

    ``augment``: ``True`` (the crop and flip below), ``False``, or a ``data.augment`` name (:data:`AUGMENTATIONS`).
    """

    #: Crop padding and flip of the training augmentation.
    AUGMENT_PAD: int = 4
    AUGMENT_FLIP: bool = True

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool | str = False,
        drop_last: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape: object = (
                tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            )
            raise DataError(
                f"Loader images must be a tensor [N, C, H, W], got {shape}: "
                "pass the images returned by load_cifar or load_bundled."
            )
        if images.shape[0] == 0:
            raise DataError("Loader got no images: check the data set path and split.")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise DataError(
                f"Loader images must be uint8 (0-255) or float (0-1), got {images.dtype}: "
                "convert them first."
            )
        if not isinstance(labels, torch.Tensor) or labels.shape != (images.shape[0],):
            shape = (
                tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            )
            raise DataError(
                f"Loader labels must be a tensor [{images.shape[0]}] (one per image), got {shape}: "
                "pass the labels that belong to the images."
            )
        if labels.is_floating_point() or labels.is_complex():
            raise DataError(
                f"Loader labels must be integers, got {labels.dtype}: convert them with .long()."
            )
        self._setup(batch_size, shuffle=shuffle, augment=augment, drop_last=drop_last, seed=seed, device=device, rank=rank,
                    world_size=world_size)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)

    def _setup(self, batch_size: int, *, shuffle: bool, augment: bool | str, drop_last: bool, seed: int, device: str | torch.device,
               rank: int, world_size: int) -> None:
        """The order, sharding and augmentation settings (shared with :class:`clat.data.stream.StreamLoader`), checked."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise DataError(f"Batch size must be a positive integer, got {batch_size!r}.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(
                f"Rank {rank} with world size {world_size} is invalid: need world_size >= 1 and "
                "0 <= rank < world_size."
            )
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        # True keeps the class's settings (a subclass may change them); a data.augment name picks its own
        self._aug = (self.AUGMENT_PAD, self.AUGMENT_FLIP) if augment is True else augment_mode(augment)
        self.drop_last = drop_last
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration gives."""
        if epoch < 0:
            raise DataError(f"Epoch must be >= 0, got {epoch}.")
        self.epoch = int(epoch)

    @property
    def num_examples(self) -> int:
        """Number of examples in the data (all ranks together)."""
        return int(self.images.shape[0])

    def __len__(self) -> int:
        """Number of batches per epoch (the same on every rank)."""
        global_batch = self.batch_size * self.world_size
        if self.drop_last:
            return self.num_examples // global_batch
        return math.ceil(self.num_examples / global_batch)

    def _permutation(self) -> torch.Tensor:
        n = self.num_examples
        if not self.shuffle:
            return torch.arange(n, device=self.device)
        # Drawn on the CPU so that the order does not depend on the device.
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, "shuffle"))
        return torch.randperm(n, generator=gen).to(self.device)

    def _to_float(self, x: torch.Tensor) -> torch.Tensor:
        return to_unit_float(x)

    def _plan(self, perm: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, int, int, int]]:
        """``(batch index, this rank's indices, start, stop, global batch size)`` of each batch of the epoch: rank r
        gets part r (``start:stop``) of each global batch of ``perm``."""
        global_batch = self.batch_size * self.world_size
        for i in range(len(self)):
            gidx = perm[i * global_batch : (i + 1) * global_batch]
            size = gidx.shape[0]
            # tensor_split's part r: sizes differ by at most one, larger first.
            base, extra = divmod(size, self.world_size)
            start = self.rank * base + min(self.rank, extra)
            stop = start + base + (1 if self.rank < extra else 0)
            yield i, gidx[start:stop], start, stop, size

    def _augmented(self, x: torch.Tensor, i: int, start: int, stop: int, size: int, gen: torch.Generator | None) -> torch.Tensor:
        """Batch ``i``'s augmentation, drawn for the whole global batch (``size``) and applied to this rank's part."""
        if gen is None or self._aug is None:
            return x
        pad, flip = self._aug
        gen.manual_seed(derive_seed(self.seed, self.epoch, "augment", i))
        oy, ox, fl = draw_augment_params(size, pad, flip, gen, self.device)
        return crop_flip(x, oy[start:stop], ox[start:stop], fl[start:stop], pad)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x float32 [b,C,H,W] in [0,1], y int64 [b])`` on ``device``."""
        gen = torch.Generator() if self._aug else None
        for i, idx, start, stop, size in self._plan(self._permutation()):
            x = self._to_float(self.images.index_select(0, idx))
            yield self._augmented(x, i, start, stop, size, gen), self.labels.index_select(0, idx)


# --------------------------------------------------------------------------- #
# The splits of a run
# --------------------------------------------------------------------------- #


@dataclass
class Splits:
    """A data set cut into training, validation and test parts. Images are uint8 (0-255) or float
    in [0, 1], shaped [N, C, H, W]; labels are integers in [0, num_classes). Checked on creation.

    Build one from your own data with :meth:`from_tensors`, :meth:`from_numpy` or :meth:`from_folder`
    (they carve the validation split as a run does); ``class_names[i]`` names class ``i`` when known."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        for part in ("train", "val", "test"):
            x, y = getattr(self, f"x_{part}"), getattr(self, f"y_{part}")
            check_images(x, f"Splits.x_{part}")
            if not isinstance(y, torch.Tensor) or y.shape != (len(x),) or y.is_floating_point():
                raise DataError(f"Splits.y_{part} must be an integer tensor with one label per image ({len(x)}), got "
                                f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
            if len(y) and not (0 <= int(y.min()) and int(y.max()) < self.num_classes):
                raise DataError(f"Splits.y_{part} holds labels from {int(y.min())} to {int(y.max())}, outside 0..{self.num_classes - 1} "
                                f"(num_classes={self.num_classes})")

    @classmethod
    def from_tensors(cls, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, *,
                     val_size: int = 1000, split_seed: int = 0, num_classes: int | None = None, name: str = "custom",
                     class_names: list[str] | None = None) -> "Splits":
        """Splits of your own tensors: images ``[N, C, H, W]`` uint8 (0-255) or float in [0, 1], labels ``[N]`` (or
        ``[N, 1]``) integer class indices. ``val_size`` training images, drawn with ``split_seed``, become the validation
        split (:func:`train_val_split`, as :func:`prepare_data` does); ``num_classes`` defaults to the largest label + 1.
        Checked, each a one-line DataError: image dtype, range and layout (a channels-last tensor is refused); both splits
        non-empty with the same channels and size; one integer label >= 0 per image, below ``num_classes`` when given;
        at least 2 classes, each with a training image; one ``class_names`` entry per class; ``0 <= val_size < N``."""
        check_images(x_train, "x_train")
        check_images(x_test, "x_test")
        check_pair(x_train, x_test)
        y_train = check_labels(y_train, len(x_train), "y_train", "x_train")
        y_test = check_labels(y_test, len(x_test), "y_test", "x_test")
        k = class_count(y_train, y_test, num_classes)
        if class_names is not None and len(class_names) != k:
            raise DataError(f"{len(class_names)} class_names for {k} classes: give one name per class")
        check_every_class_trained(y_train, k, class_names)
        tr, va = train_val_split(len(x_train), val_size, split_seed)
        return cls(x_train[tr], y_train[tr], x_train[va], y_train[va], x_test, y_test, k, name,
                   None if class_names is None else list(class_names))

    @classmethod
    def from_numpy(cls, x_train, y_train, x_test, y_test, *, val_size: int = 1000, split_seed: int = 0,
                   num_classes: int | None = None, name: str = "custom", class_names: list[str] | None = None,
                   channels_last: bool | None = None) -> "Splits":
        """:meth:`from_tensors` of numpy arrays. Images are ``[N, H, W, C]`` or ``[N, C, H, W]``: channels-last when
        the last dimension is 1 or 3 and the second is not, channels-first in the opposite case; when both or
        neither are 1 or 3, pass ``channels_last``. ``[N, H, W]`` is one channel. uint8 (0-255) or float in [0, 1]
        (float is stored as float32); labels of any integer dtype."""
        return cls.from_tensors(images_from_numpy(x_train, "x_train", channels_last), labels_from_numpy(y_train, "y_train"),
                                images_from_numpy(x_test, "x_test", channels_last), labels_from_numpy(y_test, "y_test"),
                                val_size=val_size, split_seed=split_seed, num_classes=num_classes, name=name, class_names=class_names)

    @classmethod
    def from_folder(cls, root, *, val_size: int = 1000, split_seed: int = 0, image_size: int | None = None) -> "Splits":
        """:meth:`from_tensors` of the image folder ``root/train/<class>/``, ``root/test/<class>/``
        (:func:`clat.data.readers.load_image_folder`: RGB uint8, one class per folder, sorted by name; ``image_size=S``
        resizes every image to S x S)."""
        x_tr, y_tr, x_te, y_te, names = read_image_folders(root, image_size)
        return cls.from_tensors(x_tr, y_tr, x_te, y_te, val_size=val_size, split_seed=split_seed, num_classes=len(names),
                                name=f"image folder {root}", class_names=names)

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    def probe(self, n: int) -> torch.Tensor:
        """The first ``n`` training images: what the model is traced with."""
        return self.x_train[:n]

    def sampler(self, generator_of_epoch, device: torch.device | str = "cpu"):
        """``sample(n)``: n random training images as float [0, 1] and their labels, drawn with the generator
        ``generator_of_epoch()`` returns (a fresh one per call: the same images for the same epoch)."""
        def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            idx = torch.randperm(len(self.x_train), generator=generator_of_epoch())[:n]
            return to_unit_float(self.x_train[idx].to(device)), self.y_train[idx].to(device)

        return sample
