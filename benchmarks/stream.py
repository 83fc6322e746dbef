"""What does streaming cost? Training batches from clat's in-memory loader vs the same images streamed from a torch
Dataset and from an image folder on disk, side by side on this machine.

    .venv/bin/python benchmarks/stream.py            # small_cnn, 5 rounds
    .venv/bin/python benchmarks/stream.py --quick    # tiny_cnn, fewer images, 3 rounds (< 1 min)

Variants (the same 32x32 images of the CIFAR-10 subset bundled with clat, the same seeded order, batch 128):

- ``in_memory``: :class:`clat.data.loader.Loader` on uint8 tensors (the default path for CIFAR-size arrays).
- ``dataset_w0`` / ``dataset_w2``: :class:`clat.data.stream.StreamLoader` on a map-style Dataset returning those tensors one
  item at a time, read by the training process (``data.workers=0``) or by 2 worker processes (the default): the cost of
  per-item reading, seeding, collating and checking, without any decoding.
- ``folder_w0`` / ``folder_w2``: the same images written as PNG files in an image folder and streamed as
  ``data.dataset=folder data.stream=true`` does (:class:`clat.data.stream.FolderDataset`): decoding from disk every epoch.

Two measurements, each interleaved round by round (the order rotated) with one warm-up pass excluded:

1. **feeding only**: seconds to iterate one epoch of batches (no model), as images per second;
2. **training**: one epoch of clat's PGD-AT steps (:class:`clat.training.stage.Stage`, PGD-10 linf 8/255) fed by each loader, as
   images per second; the ratio streamed / in-memory is what a CPU user pays for streaming.

Ratios are medians of the per-round ratios. Worker processes' CPU time is counted as this benchmark's own (they are
reaped at the end of each epoch), so the contention check does not flag them as other processes.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402

from clat.config.schema import AttackConfig  # noqa: E402
from clat.data.loader import Loader  # noqa: E402
from clat.methods import PGDAT  # noqa: E402
from clat.data.stream import DatasetSplits, FolderDataset, StreamLoader  # noqa: E402

VARIANTS = ("in_memory", "dataset_w0", "dataset_w2", "folder_w0", "folder_w2")
BATCH = 128


def _own_cpu_s() -> float:
    """This process's CPU time and that of its reaped children (the DataLoader's workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


C._own_cpu_s = _own_cpu_s


class Items(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def write_png_folder(root: Path, x: torch.Tensor, y: torch.Tensor) -> None:
    from PIL import Image

    for i, (img, label) in enumerate(zip(x, y.tolist())):
        d = root / "train" / f"class_{label:02d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i:05d}.png")


def make_loaders(x: torch.Tensor, y: torch.Tensor, folder: Path, device) -> dict[str, Loader]:
    kw = dict(shuffle=True, augment=True, drop_last=True, seed=0, device=device)
    folder_ds = FolderDataset(folder, "train")
    out: dict[str, Loader] = {"in_memory": Loader(x, y, BATCH, **kw)}
    for w in (0, 2):
        out[f"dataset_w{w}"] = StreamLoader(DatasetSplits(Items(x, y), val_size=0, num_classes=10, workers=w), BATCH, **kw)
        out[f"folder_w{w}"] = StreamLoader(DatasetSplits(folder_ds, val_size=0, num_classes=10, workers=w), BATCH, **kw)
    return out


def epoch_fn(loader: Loader, step=None):
    epoch = [0]

    def run() -> None:
        loader.set_epoch(epoch[0])
        epoch[0] += 1
        for xb, yb in loader:
            if step is not None:
                step(xb, yb)

    return run


def main() -> None:
    ap = C.timing_parser(__doc__, ["tiny_cnn", "small_cnn"], ["small_cnn"], "timed rounds (default 5; --quick 3)")
    ap.add_argument("--images", type=int, help="images per epoch (default 2048 feeding / 1024 training; --quick 1024 / 256)")
    args, models = C.timing_args(ap, ["small_cnn"])
    repeats = args.repeats or (3 if args.quick else 5)
    info = C.env_info()
    C.header("Streaming: in-memory vs streamed training batches", info,
             f"batch {BATCH}, 32x32 images (bundled CIFAR-10 subset), augment crop+flip; interleaved rounds, 1 warm-up excluded;\n"
             "ratios = medians of the per-round ratios t_in_memory / t_variant (1.0: streaming costs nothing)")
    dev = C.device()
    n_feed = args.images or (1024 if args.quick else 2048)
    n_train = max(BATCH, (args.images or (256 if args.quick else 1024)) // BATCH * BATCH)
    x, y, data = C.real_images(max(n_feed, n_train))
    x = x.mul(255).round().to(torch.uint8)  # the uint8 images clat holds in memory
    results = {"data": data, "batch_size": BATCH, "repeats": repeats, "models": models}
    with tempfile.TemporaryDirectory() as tmp:
        C.log(f"writing {n_feed} PNG files ...")
        write_png_folder(Path(tmp) / "feed", x[:n_feed], y[:n_feed])
        write_png_folder(Path(tmp) / "train", x[:n_train], y[:n_train])
        feed = make_loaders(x[:n_feed], y[:n_feed], Path(tmp) / "feed", dev)
        times = C.interleaved({v: epoch_fn(feed[v]) for v in VARIANTS}, repeats, warmup=1, label="feeding")
        results["feeding"] = summarize(times, n_feed)
        for m in models:
            loaders = make_loaders(x[:n_train], y[:n_train], Path(tmp) / "train", dev)
            base = C.build_model(m)
            steps = {v: C.Trainer(PGDAT(AttackConfig(eps=8 / 255, alpha=2 / 255, steps=10)), C.fresh_copy(base)).step for v in VARIANTS}
            times = C.interleaved({v: epoch_fn(loaders[v], steps[v]) for v in VARIANTS}, repeats, warmup=1, label=m)
            results[f"training_{m}"] = summarize(times, n_train)
    rows = [[what, *(f"{r['img_per_s'][v]:.0f}" for v in VARIANTS), *(f"{r['ratio'][v]:.2f}" for v in VARIANTS[1:])]
            for what, r in results.items() if isinstance(r, dict) and "img_per_s" in r]
    print(C.table(["measurement", *(f"{v} img/s" for v in VARIANTS), *(f"{v} / in_memory" for v in VARIANTS[1:])], rows))
    C.finish(info)
    path = C.write_json("stream" + ("_quick" if args.quick else ""), {"benchmark": "stream", "quick": args.quick, "env": info, **results})
    print(f"results: {path}")


def summarize(times: dict[str, list[float]], n: int) -> dict:
    med = {k: C.median(v) for k, v in times.items()}
    return {"images": n, "times": {k: C.summary(v) for k, v in times.items()}, "img_per_s": {k: n / t for k, t in med.items()},
            "ratio": {k: C.median(C.paired_ratios(times["in_memory"], times[k])) for k in VARIANTS},
            "paired_ratios": {k: C.paired_ratios(times["in_memory"], times[k]) for k in VARIANTS}}


if __name__ == "__main__":
    main()
