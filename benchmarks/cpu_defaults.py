"""Which CPU settings should clat ship as defaults? The PGD-AT training step of every CPU-size zoo model, timed
with each candidate setting, side by side.

    .venv/bin/python benchmarks/cpu_defaults.py            # the CPU-size zoo (below), 5 rounds
    .venv/bin/python benchmarks/cpu_defaults.py --quick    # tiny_cnn only, < 1 min

One step = clat's PGD-AT step as ``clat train`` runs it (:class:`clat.training.stage.Stage`: a 10-step ℓ∞ PGD attack,
ε = 8/255, α = 2/255, then CE on the adversarial batch, backward, SGD), on real CIFAR-10 images, at the batch
size a CPU user runs each model with. Variants, interleaved round by round on copies of the same model:

- ``contiguous``: NCHW tensors (PyTorch's default memory format).
- ``channels_last``: model and inputs in NHWC (``channels_last=true``): oneDNN's NHWC convolution kernels.
- ``channels_last+1thread``: the same with ``torch.set_num_threads(1)`` (is one thread per process better
  than PyTorch's default of one per physical core? Only informative: a user runs one process).

The fastest setting on every model becomes the shipped default for CPU runs (``channels_last: auto``,
:func:`clat.training.stage.resolve_channels_last`); the output says whether that is what ``auto`` picks.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402

from clat.config.schema import AttackConfig  # noqa: E402
from clat.methods import PGDAT  # noqa: E402
from clat.training.stage import resolve_channels_last  # noqa: E402

# the batch size a CPU user trains each model with (the configs under configs/cpu/ and the study)
SETTINGS = {"tiny_cnn": 32, "small_cnn": 128, "vgg11_w16": 128, "resnet18_w16": 128, "resnet18": 32, "preact_resnet18": 32}
VARIANTS = ("contiguous", "channels_last", "channels_last+1thread")


def make_step(base, x, y, variant: str):
    cl = variant.startswith("channels_last")
    model = C.fresh_copy(base)
    trainer = C.Trainer(PGDAT(AttackConfig(eps=8 / 255, alpha=2 / 255, steps=10)), model, channels_last=cl)
    threads = 1 if variant.endswith("1thread") else torch.get_num_threads()

    def step():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            trainer.step(x, y)
        finally:
            torch.set_num_threads(before)

    return step


def bench_model(name: str, repeats: int, min_time: float) -> dict:
    bs = SETTINGS[name]
    base = C.build_model(name)
    x, y, data = C.real_images(bs)
    x, y = x.to(C.device()), y.to(C.device())
    fns = {v: make_step(base, x, y, v) for v in VARIANTS}
    times = C.interleaved(fns, repeats, warmup=1, min_time=min_time, label=name)
    med = {k: C.median(v) for k, v in times.items()}
    ratio = {k: C.median(C.paired_ratios(times["contiguous"], times[k])) for k in VARIANTS}  # speed-up over contiguous
    fastest = min(med, key=med.get)
    return {"model": name, "batch_size": bs, "data": data, "repeats": repeats, "times": {k: C.summary(v) for k, v in times.items()},
            "img_per_s": {k: bs / v for k, v in med.items()}, "speedup_over_contiguous": ratio,
            "paired_speedups": {k: C.paired_ratios(times["contiguous"], times[k]) for k in VARIANTS}, "fastest": fastest}


def main() -> None:
    default = list(SETTINGS)
    args, models = C.timing_args(C.timing_parser(__doc__, list(SETTINGS), default, "timed rounds (default 5; --quick 3)"), default)
    info = C.env_info()
    C.header("CPU defaults: PGD-AT step per memory format and thread count", info,
             "clat's PGD-AT step (Stage), PGD-10 linf 8/255; interleaved rounds, 1 warm-up step excluded;\n"
             "speed-ups are medians of the per-round ratios t_contiguous / t_variant")
    results = [bench_model(m, args.repeats or (3 if args.quick else 5), args.min_time) for m in models]
    shipped = resolve_channels_last("auto", torch.device("cpu"), "fp32")
    rows = [[r["model"], r["batch_size"], *(f"{r['img_per_s'][v]:.1f}" for v in VARIANTS),
             f"{r['speedup_over_contiguous']['channels_last']:.2f}x", r["fastest"]] for r in results]
    print(C.table(["model", "batch", *(f"{v} img/s" for v in VARIANTS), "channels_last speed-up", "fastest"], rows))
    cl_wins = all(r["speedup_over_contiguous"]["channels_last"] > 1.0 for r in results)
    print(f"\nchannels_last faster on every model timed: {cl_wins}; clat ships channels_last=auto -> {shipped} on a CPU "
          f"({'consistent' if shipped == cl_wins else 'INCONSISTENT: revisit the default'})")
    C.finish(info)
    path = C.write_json("cpu_defaults" + ("_quick" if args.quick else ""),
                        {"benchmark": "cpu_defaults", "quick": args.quick, "env": info, "results": results,
                         "channels_last_faster_everywhere": cl_wins, "shipped_auto_on_cpu": shipped})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
