"""Data: CIFAR and the bundled subset, the user's own files and Datasets, the seeded in-memory and streamed loaders, augmentation."""

from __future__ import annotations

from clat.data.loader import (AUGMENTATIONS, augment, augment_mode, crop_flip, draw_augment_params, FILE_MD5, NUM_CLASSES, TARBALL_MD5,
                              URLS, ChecksumWarning, DatasetName, load_bundled, load_cifar, to_unit_float, check_images, train_val_split,
                              derive_seed, Loader, Splits)  # noqa: F401
from clat.data.readers import load_image_folder, load_npz  # noqa: F401
from clat.data.prepare import (DATASETS, Images, prepare_data, split_seed, run_data)  # noqa: F401

__all__ = ['AUGMENTATIONS', 'augment', 'augment_mode', 'crop_flip', 'draw_augment_params', 'FILE_MD5', 'NUM_CLASSES', 'TARBALL_MD5',
           'URLS', 'ChecksumWarning', 'DatasetName', 'load_bundled', 'load_cifar', 'to_unit_float', 'check_images', 'train_val_split',
           'derive_seed', 'Loader', 'Splits',
           'DATASETS', 'Images', 'load_image_folder', 'load_npz', 'prepare_data', 'split_seed', 'run_data']
