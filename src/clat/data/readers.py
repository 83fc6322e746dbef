"""Your own data: image folders, ``.npz`` files and arrays, checked where they enter clat (docs/data.md).

* An image folder is ``root/train/<class>/<image>`` and ``root/test/<class>/<image>``; the class index is the
  position of the class folder's name in sorted order (as torchvision's ``ImageFolder`` numbers them). Images are
  read with Pillow, an optional dependency (``pip install "clat-at[images]"``), imported on first use, and always
  converted to RGB: clat's models take 3-channel images.
* An ``.npz`` file holds the arrays ``x_train, y_train, x_test, y_test``; it is read with ``allow_pickle=False``,
  so a file cannot run code.
* Arrays become tensors ``[N, C, H, W]`` (uint8 0-255 or float in [0, 1]) with integer labels ``[N]``; the checks
  here (labels, classes, shapes) are those :meth:`clat.data.loader.Splits.from_tensors` runs, each failing with a
  one-line :class:`clat.base.errors.DataError` that says how to fix the data.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from clat.base.errors import ConfigError, DataError

__all__ = ["IMAGE_EXTENSIONS", "NPZ_KEYS", "OWN_DATASETS", "load_image_folder", "read_image_folders", "load_npz",
           "images_from_numpy", "labels_from_numpy", "check_labels", "check_pair", "class_count", "check_every_class_trained",
           "load_own"]

#: Files an image folder's class folders may hold (case-insensitive); other files (README, .DS_Store) are skipped.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
#: The arrays an ``.npz`` data file must hold.
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
#: ``data.dataset`` values that read the user's own data from ``data.root``.
OWN_DATASETS = ("folder", "npz")
_PILLOW_HINT = 'pip install "clat-at[images]"'

# --------------------------------------------------------------------------- #
# Image folders
# --------------------------------------------------------------------------- #


def pillow():
    """``PIL.Image``, imported on first use: Pillow is optional (the ``images`` extra)."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"reading an image folder needs Pillow, which is not installed: {_PILLOW_HINT}") from None
    return Image


def class_folders(root: Path, split: str) -> list[str]:
    """Sorted names of the class folders of ``root/split`` (hidden folders skipped)."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder: point data.root at a folder holding "
                        "train/<class>/ and test/<class>/ (see docs/data.md)")
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"image folder {root} has no {split}/ folder: put the {split} images in {folder}/<class name>/")
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"{folder} has no class folders: put each class's images in {folder}/<class name>/")
    return names


def image_files(folder: Path) -> list[Path]:
    """The image files of one class folder, sorted by name; none is an error."""
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"class folder {folder} holds no images ({' '.join(IMAGE_EXTENSIONS)}): add images or remove the folder")
    return files


def resize_image(im, size: int, image_module):
    """``im`` (a PIL image) with its shorter side scaled to ``size`` (bilinear; Pillow antialiases when it shrinks) and cut
    to the central ``size`` x ``size`` square, as torchvision's ``Resize(size)`` then ``CenterCrop(size)``; an image of
    that size already is returned as it is."""
    w, h = im.size
    if (w, h) == (size, size):
        return im
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), image_module.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def read_image(path: Path, image_module, size: int | None = None) -> np.ndarray:
    """One image as uint8 ``[H, W, 3]`` (converted to RGB; resized by :func:`resize_image` when ``size`` is given)."""
    try:
        with image_module.open(path) as im:
            im = im.convert("RGB")
            return np.asarray(resize_image(im, size, image_module) if size else im, dtype=np.uint8)
    except (OSError, ValueError, image_module.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path} ({err}): replace or delete the file") from None


def same_classes(folder: Path, names: list[str], expected: list[str]) -> None:
    if names != expected:
        missing, extra = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
        raise DataError(f"the class folders of {folder} differ from the training ones (missing: {missing[:5] or 'none'}, "
                        f"extra: {extra[:5] or 'none'}): give test/ and train/ the same class folders")


def interleaved(per_class: list[list[Path]]) -> list[tuple[int, Path]]:
    """``(label, file)`` taking one file of each class in turn, so that the first N images (``data.train_size``,
    ``data.test_size``) cover the classes evenly instead of being the first classes."""
    longest = max(len(files) for files in per_class)
    return [(c, files[i]) for i in range(longest) for c, files in enumerate(per_class) if i < len(files)]


def load_image_folder(root: str | os.PathLike[str], split: str, *, class_names: list[str] | None = None,
                      size: tuple[int, int] | None = None, image_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(images uint8 [N, 3, H, W], labels int64 [N], class_names)`` of the images in ``root/<split>/<class>/``.

    Class ``i`` is the ``i``-th class folder name in sorted order. Images (``IMAGE_EXTENSIONS``; other files are
    skipped) are converted to RGB and ordered one class at a time in turn, each class's files by name.
    ``image_size=S`` resizes every image to S x S (:func:`resize_image`: shorter side to S, central crop), so the
    images may have any sizes.

    Checked, each a one-line DataError naming the path: Pillow is installed; the folders exist; there are class
    folders and none is empty; every file can be read; all images have the same size (``size``, ``(width,
    height)``, when given: the training images' size); the class folders equal ``class_names`` when given.
    """
    image_module = pillow()
    root_path = Path(os.fspath(root)).expanduser()
    names = class_folders(root_path, split)
    if class_names is not None:
        same_classes(root_path / split, names, list(class_names))
    order = interleaved([image_files(root_path / split / name) for name in names])
    images, ref = [], (("the training images are", tuple(size)) if size else None)  # (what, (width, height))
    for _, path in order:
        img = read_image(path, image_module, image_size)
        got = (img.shape[1], img.shape[0])
        if ref is None:
            ref = (f"{path} is", got)
        elif got != ref[1]:
            raise DataError(f"image {path} is {got[0]}x{got[1]} pixels but {ref[0]} {ref[1][0]}x{ref[1][1]}: all images "
                            "must have the same size; resize them first")
        images.append(img)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor([c for c, _ in order], dtype=torch.int64), names


def read_image_folders(root: str | os.PathLike[str], image_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                                         torch.Tensor, list[str]]:
    """``(x_train, y_train, x_test, y_test, class_names)`` of an image folder ``root`` with ``train/`` and ``test/``
    (:func:`load_image_folder`, resized to ``image_size`` when given); the test folder must have the training classes
    and image size."""
    x_tr, y_tr, names = load_image_folder(root, "train", image_size=image_size)
    x_te, y_te, _ = load_image_folder(root, "test", class_names=names, size=(x_tr.shape[3], x_tr.shape[2]), image_size=image_size)
    return x_tr, y_tr, x_te, y_te, names


# --------------------------------------------------------------------------- #
# .npz files and numpy arrays
# --------------------------------------------------------------------------- #


def load_npz(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)`` as stored in the ``.npz`` file ``path`` (as ``np.savez`` writes
    them), read with ``allow_pickle=False``; pass them to :meth:`clat.data.loader.Splits.from_numpy`, which checks them.

    Raises:
        DataError: the file is missing or unreadable, or lacks one of the four arrays (the message lists the
            missing keys and those present).
    """
    p = Path(os.fspath(path)).expanduser()
    if not p.is_file():
        raise DataError(f"data file {p} does not exist or is not a file: point data.root at an .npz file holding {', '.join(NPZ_KEYS)}")
    save = f"np.savez(path, {', '.join(k + '=...' for k in NPZ_KEYS)})"
    try:
        z = np.load(p, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise DataError(f"{p} holds a single array, not an .npz archive: save the data with {save}")
        with z:
            missing = [k for k in NPZ_KEYS if k not in z.files]
            if missing:
                raise DataError(f"{p} lacks the array(s) {missing} (it has {sorted(z.files)}): save it with {save}")
            arrays = [z[k] for k in NPZ_KEYS]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"cannot read {p} as an .npz file ({err}): save plain numeric arrays with {save}") from None
    return arrays[0], arrays[1], arrays[2], arrays[3]


def _channels_last(shape: tuple[int, ...], what: str) -> bool:
    """Whether ``[N, A, B, D]`` images are ``[N, H, W, C]``: when D is 1 or 3 and A is not (else ``[N, C, H, W]``)."""
    first, last = shape[1] in (1, 3), shape[3] in (1, 3)
    if first != last:
        return last
    which = "both dimensions 1 and 3 could be" if first else "neither dimension 1 nor 3 is"
    raise DataError(f"{what} has shape {shape}: {which} a channel axis of 1 or 3 channels, so the layout is ambiguous; "
                    "pass channels_last=True ([N, H, W, C]) or channels_last=False ([N, C, H, W])")


def images_from_numpy(x: np.ndarray, what: str, channels_last: bool | None = None) -> torch.Tensor:
    """Images as a tensor ``[N, C, H, W]`` (uint8 kept, float as float32) from a numpy array ``[N, H, W, C]``,
    ``[N, C, H, W]`` (``channels_last=None`` decides by :func:`_channels_last`'s rule) or ``[N, H, W]`` (grayscale)."""
    if not isinstance(x, np.ndarray):
        raise DataError(f"{what} must be a numpy array, got {type(x).__name__}: use Splits.from_tensors for tensors")
    if x.ndim == 3 and x.shape[2] in (1, 3):
        raise DataError(f"{what} has shape {x.shape}, which looks like one image [H, W, C]: give images [N, H, W, C] "
                        "(x[None] for a single one)")
    if x.ndim == 3:
        x, channels_last = x[:, None], False
    if x.ndim != 4:
        raise DataError(f"{what} must be images [N, H, W, C], [N, C, H, W] or [N, H, W], got shape {x.shape}")
    if channels_last is None:
        channels_last = _channels_last(x.shape, what)
    if channels_last:
        x = x.transpose(0, 3, 1, 2)
    if x.dtype != np.uint8:
        if x.dtype.kind != "f":
            raise DataError(f"{what} must be uint8 (0-255) or float in [0, 1], got {x.dtype}: convert them with "
                            ".astype(np.uint8) (0-255 values) or .astype(np.float32) / 255")
        x = x.astype(np.float32, copy=False)
    return torch.from_numpy(np.require(x, requirements=["C_CONTIGUOUS", "WRITEABLE"]))


def labels_from_numpy(y: np.ndarray, what: str) -> torch.Tensor:
    """Integer labels as an int64 tensor; other dtypes are a DataError (:func:`check_labels` checks the rest)."""
    if not isinstance(y, np.ndarray):
        raise DataError(f"{what} must be a numpy array, got {type(y).__name__}: use Splits.from_tensors for tensors")
    if y.dtype.kind not in "iu":
        raise DataError(f"{what} must hold integer class indices, got {y.dtype}: convert them with .astype(np.int64)")
    return torch.from_numpy(y.astype(np.int64))


# --------------------------------------------------------------------------- #
# Checks of labels, classes and shapes
# --------------------------------------------------------------------------- #


def check_labels(y: torch.Tensor, n: int, what: str, x_what: str) -> torch.Tensor:
    """``y`` as int64 ``[n]``: integer class indices >= 0, one per image (``[n, 1]`` is flattened)."""
    if not isinstance(y, torch.Tensor):
        raise DataError(f"{what} must be a tensor of class indices, got {type(y).__name__}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        hint = " (one-hot labels? pass y.argmax(1))" if y.ndim == 2 else ""
        raise DataError(f"{what} must hold one class index per image, shape [N], got {tuple(y.shape)}{hint}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"{what} must hold integer class indices, got {y.dtype}: convert them with .long()")
    if len(y) != n:
        raise DataError(f"{x_what} has {n} images but {what} has {len(y)} labels: give one label per image")
    if n and int(y.min()) < 0:
        raise DataError(f"{what} holds the negative label {int(y.min())}: labels are class indices 0..K-1")
    return y.to(torch.int64)


def check_pair(x_train: torch.Tensor, x_test: torch.Tensor) -> None:
    """Both splits hold images ``[N, C, H, W]`` of the same channels and size, and neither is empty."""
    for x, what in ((x_train, "x_train"), (x_test, "x_test")):
        if len(x) == 0:
            raise DataError(f"{what} holds no images: give at least one")
        if x.shape[3] in (1, 3) and x.shape[1] not in (1, 3):
            raise DataError(f"{what} has shape {tuple(x.shape)}, which looks channels-last [N, H, W, C]: pass "
                            "x.permute(0, 3, 1, 2), or the numpy array to Splits.from_numpy (it reads both layouts)")
    if x_test.shape[1:] != x_train.shape[1:]:
        raise DataError(f"x_test images are {'x'.join(map(str, x_test.shape[1:]))} (CxHxW) but x_train images are "
                        f"{'x'.join(map(str, x_train.shape[1:]))}: give both splits the same channels and size")


def class_count(y_train: torch.Tensor, y_test: torch.Tensor, num_classes: int | None = None) -> int:
    """``num_classes`` checked against the labels (every label below it, and at least 2 classes), or, when it is
    None, the largest label + 1."""
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2):
        raise DataError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    for y, what in ((y_train, "y_train"), (y_test, "y_test")):
        if num_classes is not None and len(y) and int(y.max()) >= num_classes:
            raise DataError(f"{what} holds the label {int(y.max())} but num_classes={num_classes}: labels must be 0..{num_classes - 1}")
    k = num_classes or 1 + max(int(y.max()) for y in (y_train, y_test) if len(y))
    if k < 2:
        raise DataError("every label is 0: a classifier needs at least 2 classes (labels 0..K-1)")
    return k


def check_every_class_trained(y_train: torch.Tensor, num_classes: int, class_names: list[str] | None = None) -> None:
    """Every class ``0..num_classes-1`` has at least one training image."""
    empty = (torch.bincount(y_train, minlength=num_classes) == 0).nonzero().flatten().tolist()
    if empty:
        shown = ", ".join(f"{c} ({class_names[c]})" if class_names else str(c) for c in empty[:5]) + (", ..." if len(empty) > 5 else "")
        raise DataError(f"no training image has class {shown} of 0..{num_classes - 1}: every class needs training images "
                        "(labels are 0-based and contiguous; a data.train_size cut may have left the class out)")


# --------------------------------------------------------------------------- #
# data.dataset=folder / npz
# --------------------------------------------------------------------------- #


def load_own(cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int | None, str, list[str] | None]:
    """``(x_train, y_train, x_test, y_test, num_classes, name, class_names)`` of ``data.dataset=folder`` or ``npz``
    read from ``data.root``, uncut. Images are RGB: a 1-channel ``.npz`` is repeated to 3 channels (clat's models
    take RGB). ``num_classes``: the class folders, or ``model.num_classes`` (else the largest label + 1) for npz."""
    d = cfg.data
    if d.download:
        raise ConfigError(f"data.download=true has nothing to download for data.dataset={d.dataset} (data.root is your "
                          f"{'image folder' if d.dataset == 'folder' else '.npz file'}): drop it")
    if d.dataset == "folder":
        x_tr, y_tr, x_te, y_te, names = read_image_folders(d.root, d.image_size)
        return x_tr, y_tr, x_te, y_te, len(names), f"image folder {d.root}", names
    x_tr, y_tr, x_te, y_te = load_npz(d.root)
    x_tr, x_te = images_from_numpy(x_tr, "x_train"), images_from_numpy(x_te, "x_test")
    y_tr = check_labels(labels_from_numpy(y_tr, "y_train"), len(x_tr), "y_train", "x_train")
    y_te = check_labels(labels_from_numpy(y_te, "y_test"), len(x_te), "y_test", "x_test")
    if x_tr.shape[1] == 1 and x_te.shape[1] == 1:
        x_tr, x_te = x_tr.expand(-1, 3, -1, -1).contiguous(), x_te.expand(-1, 3, -1, -1).contiguous()
    return x_tr, y_tr, x_te, y_te, class_count(y_tr, y_te, cfg.model.num_classes), f"npz {d.root}", None
