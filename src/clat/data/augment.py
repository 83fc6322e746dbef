"""Augmentation of image batches on any device: the crop and flip of ``data.augment``, drawn for a whole batch at once
and applied with one gather (as airbench does), so that it runs on the GPU at the cost of a copy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clat.base.errors import DataError

__all__ = ["AUGMENTATIONS", "augment", "augment_mode", "crop_flip", "draw_augment_params"]


def draw_augment_params(
    batch: int, pad: int, flip: bool, generator: torch.Generator | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (row offset, column offset, flip mask) in that draw order,
    drawn on the generator's device (``device`` when there is none)."""
    gdev = generator.device if generator is not None else device
    oy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=gdev)
    ox = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=gdev)
    if flip:
        fl = torch.randint(0, 2, (batch,), generator=generator, device=gdev).bool()
    else:
        fl = torch.zeros(batch, dtype=torch.bool, device=gdev)
    return oy.to(device), ox.to(device), fl.to(device)


def crop_flip(
    x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, fl: torch.Tensor, pad: int
) -> torch.Tensor:
    """Crop each zero-padded image at its (oy, ox) and mirror it where ``fl``:
    one gather for the whole batch."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    dev = x.device
    rows = oy[:, None] + torch.arange(h, device=dev)  # [B, H]
    cols_fwd = torch.arange(w, device=dev)
    # A flipped crop reads the crop's columns right to left.
    cols = ox[:, None] + torch.where(fl[:, None], (w - 1) - cols_fwd, cols_fwd)  # [B, W]
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def augment(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    pad: int = 4,
    flip: bool = True,
) -> torch.Tensor:
    """Standard CIFAR augmentation of a batch ``[B,C,H,W]`` on any device.

    Each sample gets its own random crop of the image zero-padded by ``pad``
    pixels on each side (offsets in ``[0, 2*pad]``) and, if ``flip``, a
    horizontal flip with probability 1/2. It is one vectorised gather, so it
    runs on the GPU at the cost of a copy instead of a Python loop over
    samples. Randomness comes from ``generator`` (normally on ``x``'s device;
    on another device the few random numbers are moved to ``x``'s), or from
    the default generator of ``x``'s device when it is ``None``.

    Returns a new tensor with the shape, dtype and device of ``x``.
    """
    if x.ndim != 4:
        raise DataError(
            f"augment expects a batch [B, C, H, W], got shape {tuple(x.shape)}: "
            "add a batch dimension (x[None]) for a single image."
        )
    if pad < 0:
        raise DataError(f"augment pad must be >= 0, got {pad}: use 0 to disable cropping.")
    oy, ox, fl = draw_augment_params(x.shape[0], pad, flip, generator, x.device)
    return crop_flip(x, oy, ox, fl, pad)


#: ``data.augment`` -> (crop padding, flip) of the training augmentation; ``None``: no augmentation.
AUGMENTATIONS: dict[object, tuple[int, bool] | None] = {True: (4, True), "crop_flip": (4, True), "flip": (0, True),
                                                         False: None, "none": None}


def augment_mode(value: object) -> tuple[int, bool] | None:
    """``(pad, flip)`` of a ``data.augment`` value (``true``/``crop_flip``, ``flip``, ``false``/``none``)."""
    if isinstance(value, bool) or value in AUGMENTATIONS:
        return AUGMENTATIONS[value]
    raise DataError(f"augment must be one of crop_flip, flip, none, true or false; got {value!r}")
