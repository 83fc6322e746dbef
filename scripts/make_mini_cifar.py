"""Build ``src/clat/assets/cifar10_mini.npz``, the small CIFAR-10 subset shipped with clat.

Why: demos, tests and smoke runs must work offline and in seconds, on real
images rather than noise. The subset is the first ``--n-train`` training and
first ``--n-test`` test images (official order) of a CIFAR-10 folder in the
official "python version" layout, read with :func:`clat.data.loader.load_cifar`.

The default source is the JPEG-recovered CIFAR-10 subset of this project
(``/work/shared/data/cifar-10-batches-py``, see its README), whose checksums
differ from the official ones, so it is read with ``verify=False``.

Usage (from the repository root)::

    PYTHONPATH=src python scripts/make_mini_cifar.py
    PYTHONPATH=src python scripts/make_mini_cifar.py --source /data/cifar-10-batches-py --verify

It also rewrites ``src/clat/assets/README.md`` with the class counts of what it wrote.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from clat.data.loader import ChecksumWarning, load_cifar  # noqa: E402

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _content_sha256(arrays: dict[str, np.ndarray]) -> str:
    """Hash of the arrays' contents (the .npz bytes carry zip timestamps)."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _table(y_train: np.ndarray, y_test: np.ndarray) -> str:
    tr = np.bincount(y_train, minlength=10)
    te = np.bincount(y_test, minlength=10)
    lines = ["| label | class | train | test |", "|---:|---|---:|---:|"]
    lines += [f"| {i} | {c} | {tr[i]} | {te[i]} |" for i, c in enumerate(CLASSES)]
    lines.append(f"| | **total** | {tr.sum()} | {te.sum()} |")
    return "\n".join(lines)


def _span(y: np.ndarray) -> str:
    counts = np.bincount(y, minlength=10)
    return f"{counts.min()}-{counts.max()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        type=Path,
        default=REPO.parent / "shared" / "data" / "cifar-10-batches-py",
        help="CIFAR-10 folder in the official python-version layout",
    )
    parser.add_argument("--out", type=Path, default=REPO / "src" / "clat" / "assets")
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument(
        "--verify", action="store_true", help="check official MD5s (only for the official files)"
    )
    args = parser.parse_args(argv)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ChecksumWarning)
        x_tr, y_tr = load_cifar("cifar10", args.source, True, verify=args.verify)
        x_te, y_te = load_cifar("cifar10", args.source, False, verify=args.verify)
    if args.n_train > len(y_tr) or args.n_test > len(y_te):
        parser.error(f"source has only {len(y_tr)} train / {len(y_te)} test images")

    arrays = {
        "x_train": x_tr[: args.n_train].numpy(),
        "y_train": y_tr[: args.n_train].numpy().astype(np.uint8),
        "x_test": x_te[: args.n_test].numpy(),
        "y_test": y_te[: args.n_test].numpy().astype(np.uint8),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    npz = args.out / "cifar10_mini.npz"
    np.savez_compressed(npz, **arrays)

    readme = f"""# Bundled data: `cifar10_mini.npz`

A small real CIFAR-10 subset shipped inside the package so that demos, tests
and smoke runs work offline. Load it with `clat.data.loader.load_bundled()`.

**What it is.** The first {args.n_train:,} images of the CIFAR-10 training set and
the first {args.n_test:,} images of the CIFAR-10 test set, in the official order.
The pixels come from a JPEG-recovered copy of CIFAR-10 (quality 75, put back
in official order; checked against the original labels, and against the
original pixels for the first 4,000 training images: mean PSNR 30.5 dB),
so they are close to, not identical with, the official pixels. When you
report numbers measured on it, call it **"CIFAR-10 subset (JPEG-recovered)"**.

**Format.** `np.savez_compressed` archive, no pickles (load with
`allow_pickle=False`):

| key | dtype | shape |
|---|---|---|
| `x_train` | uint8 | [{args.n_train}, 3, 32, 32] |
| `y_train` | uint8 | [{args.n_train}] |
| `x_test` | uint8 | [{args.n_test}, 3, 32, 32] |
| `y_test` | uint8 | [{args.n_test}] |

Images are channel-first RGB, 0-255. File size {npz.stat().st_size:,} bytes;
SHA-256 of the array contents (keys sorted, dtype, shape, bytes)
`{_content_sha256(arrays)}` (the .npz bytes themselves carry zip timestamps).

**Class balance** (labels 0-9 as in CIFAR-10's `batches.meta`): all 10 classes
present and close to balanced, {_span(arrays["y_train"])} images per class in train
and {_span(arrays["y_test"])} in test (the head of the official order is not
stratified; a uniform split would give {args.n_train // 10} / {args.n_test // 10}).

{_table(arrays["y_train"], arrays["y_test"])}

**How it was built.** From the repository root:

    PYTHONPATH=src python scripts/make_mini_cifar.py --source DIR

which reads `DIR`, a `{args.source.name}` folder (the project's JPEG-recovered
CIFAR-10 subset, in the official python-version layout)
with `clat.data.loader.load_cifar(..., verify={args.verify})`, keeps the first
{args.n_train:,} train / {args.n_test:,} test images and rewrites this file.
"""
    (args.out / "README.md").write_text(readme)
    print(f"wrote {npz} ({npz.stat().st_size:,} bytes)")
    print(_table(arrays["y_train"], arrays["y_test"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
