"""Cost of one criticality selection vs one PGD-AT epoch on full CIFAR-10.

    .venv/bin/python benchmarks/criticality_cost.py            # small_cnn, resnet18
    .venv/bin/python benchmarks/criticality_cost.py --quick    # tiny_cnn only, < 1 min

One selection is what CLAT runs at each re-selection (every 10 epochs of its stage):
``clat.compute_criticality`` on 100 training images with a PGD-10 perturbation
(ε = 8/255, α = 2/255, clat's default criticality settings). One PGD-AT epoch is 391
steps of clat's PGD-AT method (``clat.methods.PGDAT``: PGD-10 + CE + SGD step) at batch
128 over the 50,000 CIFAR-10 training images; it is EXTRAPOLATED from the measured
per-step time (median of interleaved rounds), not run in full. Both are timed in the
same run, interleaved, one untimed warm-up each. Target: one selection <= 1% of an
epoch (paper Table 7: 3.9%).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

import clat  # noqa: E402
from clat.config.schema import AttackConfig  # noqa: E402
from clat.methods.clat import CriticalityConfig  # noqa: E402
from clat.methods import PGDAT  # noqa: E402

N_TRAIN = 50_000  # CIFAR-10 training images
TARGET = 0.01
PAPER = 0.039


def bench_model(name: str, bs: int, crit_n: int, repeats: int, min_time: float) -> dict:
    dev = C.device()
    base = C.build_model(name)
    layers = clat.find_layers(base)
    a = AttackConfig()
    cc = CriticalityConfig(batch_size=crit_n)
    xc, yc, data = C.real_images(crit_n, seed=1)
    xb, yb, _ = C.real_images(bs)
    xc, yc, xb, yb = xc.to(dev), yc.to(dev), xb.to(dev), yb.to(dev)
    crit_model = C.fresh_copy(base)  # in train mode, as CLAT calls it; compute_criticality switches to eval
    trainer = C.Trainer(PGDAT(a), C.fresh_copy(base))

    def select():
        clat.compute_criticality(crit_model, layers, xc, yc, a.threat().replace(steps=cc.steps), denominator=cc.denominator,
                                 scaling=cc.scaling, point=cc.point, include_classifier=cc.include_classifier)

    times = C.interleaved({"criticality": select, "pgd_at_step": lambda: trainer.step(xb, yb)}, repeats, warmup=1,
                          min_time=min_time, label=name)
    t_sel = C.median(times["criticality"])
    t_step = C.median(times["pgd_at_step"])
    steps_per_epoch = math.ceil(N_TRAIN / bs)
    t_epoch = t_step * steps_per_epoch
    paired = [s / (t * steps_per_epoch) for s, t in zip(times["criticality"], times["pgd_at_step"])]
    ratio = C.median(paired)  # median of per-round ratios (selection and step of a round ran back to back)
    return {
        "model": name, "data": data, "criticality_batch": crit_n, "criticality_steps": cc.steps, "train_batch": bs,
        "repeats": repeats, "times": {k: C.summary(v) for k, v in times.items()},
        "steps_per_epoch": steps_per_epoch, "epoch_s_extrapolated": t_epoch,
        "ratio_selection_to_epoch": ratio,
        "ratio_paired": paired, "ratio_of_medians": t_sel / t_epoch,
        "amortised_per_epoch_reselect_every_10": ratio / 10,
        "target": TARGET, "meets_target": ratio <= TARGET, "paper_table7": PAPER,
    }


def main() -> None:
    default = ["small_cnn", "resnet18"]
    ap = C.timing_parser(__doc__, ["tiny_cnn", "small_cnn", "resnet18", "preact_resnet18"], default, "timed rounds (default 3)")
    ap.add_argument("--batch-size", type=int, default=128, help="PGD-AT training batch (default 128)")
    ap.add_argument("--criticality-batch", type=int, default=100, help="images per selection (CLAT's default 100)")
    args, models = C.timing_args(ap, default)
    info = C.env_info()
    C.header("One criticality selection vs one PGD-AT epoch (CIFAR-10, 50,000 images)", info,
             f"selection: clat.compute_criticality, {args.criticality_batch} images, PGD-10; epoch: clat PGDAT steps at batch "
             f"{args.batch_size}, EXTRAPOLATED to {math.ceil(N_TRAIN / args.batch_size)} steps from the measured per-step median")
    results = [bench_model(m, args.batch_size, args.criticality_batch, args.repeats or 3, args.min_time) for m in models]
    rows = [[r["model"], f"{r['times']['criticality']['median_s']:.2f}", f"{r['times']['pgd_at_step']['median_s']:.2f}",
             f"{r['epoch_s_extrapolated']:.0f}", f"{100 * r['ratio_selection_to_epoch']:.3f}%",
             f"{100 * min(r['ratio_paired']):.3f}-{100 * max(r['ratio_paired']):.3f}%",
             f"{100 * r['amortised_per_epoch_reselect_every_10']:.4f}%", "yes" if r["meets_target"] else "NO"] for r in results]
    print(C.table(["model", "selection s", "PGD-AT step s", "epoch s (extrap.)", "selection/epoch", "per-round",
                   "amortised (every 10 ep.)", "<= 1%"], rows,
                  f"Criticality cost (target <= {100 * TARGET:.0f}% of an epoch per selection; paper Table 7: {100 * PAPER:.1f}%)"))
    C.finish(info)
    path = C.write_json("criticality_cost" + ("_quick" if args.quick else ""),
                        {"benchmark": "criticality_cost", "quick": args.quick, "env": info, "results": results})
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
