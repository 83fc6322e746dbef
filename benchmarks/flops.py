"""Achieved FLOP/s of a clat PGD-AT training step vs the machine's measured matmul peak.

    .venv/bin/python benchmarks/flops.py            # small_cnn (batch 128), resnet18 (batch 32)
    .venv/bin/python benchmarks/flops.py --quick    # tiny_cnn only, < 1 min

FLOPs of one full step of ``clat.methods.PGDAT`` (10-step PGD attack + forward +
backward + SGD step) are counted with ``torch.utils.flop_counter.FlopCounterMode``
(convolutions and matmuls, forward and backward; BatchNorm, ReLU, element-wise ops and
the optimizer are not counted, so this is a matmul-equivalent utilisation). The step is
timed as the median of interleaved rounds (1 warm-up step excluded). The peak is the
best of several large fp32 ``torch.mm`` (2048 x 2048, 2·n³ FLOPs each), measured in the
same rounds so that machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402

from clat.config.schema import AttackConfig  # noqa: E402
from clat.methods import PGDAT  # noqa: E402

SETTINGS = {"tiny_cnn": 32, "small_cnn": 128, "resnet18": 32, "preact_resnet18": 32}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny_cnn only: a smoke test (< 1 min)")
    ap.add_argument("--models", nargs="+", choices=list(SETTINGS), help="default: small_cnn resnet18 (--quick: tiny_cnn)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    ap.add_argument("--mm-size", type=int, default=2048, help="n of the n x n fp32 matmul measuring the peak")
    ap.add_argument("--mm-per-round", type=int, default=3, help="matmuls timed per round (the best of all counts)")
    args = ap.parse_args()
    models = args.models or (["tiny_cnn"] if args.quick else ["small_cnn", "resnet18"])
    dev = C.device()
    info = C.env_info()
    C.header("Achieved FLOP/s of a clat PGD-AT step / measured fp32 matmul peak", info,
             f"PGD-AT: clat.methods.PGDAT, linf eps=8/255 alpha=2/255 10 steps; peak: best {args.mm_size}x{args.mm_size} fp32 torch.mm")

    n = args.mm_size
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    mm_flops = 2 * n**3
    mm_times: list[float] = []

    def mm():
        import time

        for _ in range(args.mm_per_round):
            C.sync()
            t0 = time.perf_counter()
            torch.mm(a, b)
            C.sync()
            mm_times.append(time.perf_counter() - t0)

    fns = {"matmul": mm}
    trainers = {}
    batches = {}
    for name in models:
        bs = SETTINGS[name]
        x, y, data = C.real_images(bs)
        batches[name] = (x.to(dev), y.to(dev), bs, data)
        trainers[name] = C.Trainer(PGDAT(AttackConfig()), C.build_model(name))
        fns[name] = (lambda t=trainers[name], xb=batches[name][0], yb=batches[name][1]: t.step(xb, yb))
    times = C.interleaved(fns, args.repeats, warmup=1, label="flops")
    mm_times_timed = mm_times[args.mm_per_round:]  # the warm-up round's matmuls are not counted
    peak = mm_flops / min(mm_times_timed)

    results = []
    for name in models:
        x, y, bs, data = batches[name]
        flops = C.count_flops(lambda t=trainers[name]: t.step(x, y))
        t_med = C.median(times[name])
        t_best = min(times[name])
        results.append({
            "model": name, "batch_size": bs, "data": data, "flops_per_step": flops, "times": C.summary(times[name]),
            "achieved_flops_per_s_median": flops / t_med, "achieved_flops_per_s_best": flops / t_best,
            "utilisation_median": flops / t_med / peak, "utilisation_best": flops / t_best / peak,
            "img_per_s": bs / t_med,
        })
    rows = [[r["model"], r["batch_size"], f"{r['flops_per_step'] / 1e9:.1f}", f"{r['times']['median_s']:.3f}",
             f"{r['achieved_flops_per_s_median'] / 1e9:.1f}", f"{peak / 1e9:.1f}", f"{100 * r['utilisation_median']:.1f}%",
             f"{100 * r['utilisation_best']:.1f}%"] for r in results]
    print(C.table(["model", "batch", "GFLOP/step", "step s (median)", "achieved GFLOP/s", "peak GFLOP/s", "utilisation",
                   "utilisation (best step)"], rows,
                  "FLOPs counted by FlopCounterMode over one full PGD-AT step (attack + forward + backward + SGD)"))
    print(f"\nmatmul peak: {n}x{n} fp32, best of {len(mm_times_timed)}: {min(mm_times_timed) * 1e3:.1f} ms -> {peak / 1e9:.1f} GFLOP/s "
          f"(median {mm_flops / C.median(mm_times_timed) / 1e9:.1f} GFLOP/s)")
    C.finish(info)
    path = C.write_json("flops" + ("_quick" if args.quick else ""), {
        "benchmark": "flops", "quick": args.quick, "env": info,
        "peak": {"mm_size": n, "flops_per_mm": mm_flops, "times_s": mm_times_timed, "best_s": min(mm_times_timed),
                 "peak_flops_per_s": peak, "median_flops_per_s": mm_flops / C.median(mm_times_timed)},
        "results": results,
    })
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
