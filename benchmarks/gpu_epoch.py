"""Epoch time of real `clat.train` runs on a GPU: PGD-10 AT and CLAT, fp32 / bf16 / fp16, channels-last.

Each variant is a real training run (`clat.train` on a paper config from `configs/paper/cifar10/`, with
the data swapped for a local CIFAR-10 copy) of a few epochs; the time of the last epoch (warm: cuDNN
autotuning and allocator growth happen in the first) gives the training throughput in images/s, and
from it the time of one epoch over the full 49,000 training images (50,000 minus the 1,000 held out) is
**extrapolated** (the per-step cost does not depend on the data set size). Validation is excluded from
`epoch_time_s`. Peak GPU memory is `torch.cuda.max_memory_allocated` over the run.

    python benchmarks/gpu_epoch.py --root ../shared/data --no-verify          # all variants
    python benchmarks/gpu_epoch.py --root data --variants preact_pgd_at_bf16_cl

Writes benchmarks/results/gpu_epoch.json. Needs CUDA (on a CPU it runs, slowly, with --allow-cpu).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import clat  # noqa: E402
from clat.config.load import load_config  # noqa: E402
from clat.runs.folder import RunDir  # noqa: E402
from clat.data.prepare import prepare_data  # noqa: E402

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper" / "cifar10"
FULL_TRAIN = 49_000

# name: (paper config, overrides, epochs of pretrain, epochs of finetune)
VARIANTS: dict[str, tuple[str, list[str], int, int]] = {
    "preact_pgd_at_fp32": ("preact_resnet18_fast_at.yaml", ["pretrain.method=pgd_at"], 2, 0),
    "preact_pgd_at_bf16_cl": ("preact_resnet18_fast_at.yaml", ["pretrain.method=pgd_at", "precision=bf16", "channels_last=true"], 2, 0),
    "preact_pgd_at_fp16_cl": ("preact_resnet18_fast_at.yaml", ["pretrain.method=pgd_at", "precision=fp16", "channels_last=true"], 2, 0),
    "preact_pgd_at_bf16_cl_b512": ("preact_resnet18_fast_at.yaml",
                                   ["pretrain.method=pgd_at", "precision=bf16", "channels_last=true", "data.batch_size=512",
                                    "pretrain.lr=0.2"], 2, 0),
    "resnet18_pgd_at_then_clat_bf16_cl": ("resnet18_pgd_at_clat.yaml", ["precision=bf16", "channels_last=true"], 2, 2),
    "resnet18_pgd_at_then_clat_fp32": ("resnet18_pgd_at_clat.yaml", [], 2, 2),
    "wrn34_10_pgd_at_bf16_cl": ("wrn34_10_pgd_at.yaml", ["precision=bf16", "channels_last=true"], 2, 0),
    "preact_pgd_at_bf16_cl_compile": ("preact_resnet18_fast_at.yaml",
                                      ["pretrain.method=pgd_at", "precision=bf16", "channels_last=true", "compile=true"], 3, 0),
    # 0.2: SGD is fused on a GPU by default (fused_optimizer=auto); this variant measures what that changed
    "preact_pgd_at_bf16_cl_unfused": ("preact_resnet18_fast_at.yaml",
                                      ["pretrain.method=pgd_at", "precision=bf16", "channels_last=true", "fused_optimizer=false"], 2, 0),
    # CUDA graphs through torch.compile's cudagraph trees (never measured yet)
    "preact_pgd_at_bf16_cl_reduce_overhead": ("preact_resnet18_fast_at.yaml",
                                              ["pretrain.method=pgd_at", "precision=bf16", "channels_last=true",
                                               "compile=reduce-overhead"], 3, 0),
}


SMOKE = ["model.name=tiny_cnn", "data.dataset=bundled", "data.train_size=300", "data.val_size=100", "attack.steps=1", "eval.steps=1",
         "eval.n_examples=20", "clat.criticality.batch_size=16", "clat.criticality.steps=1", "compile=false"]


def run_variant(name: str, root: str, verify: bool, n_val_eval: int, smoke: bool = False) -> dict:
    cfg_file, over, pre, fine = VARIANTS[name]
    overrides = [f"data.root={root}", f"data.verify={str(verify).lower()}", "data.download=false", "progress=false",
                 f"pretrain.epochs={pre}", f"finetune.epochs={fine}", f"eval.n_examples={n_val_eval}", "eval.every=1", *over,
                 *(SMOKE if smoke else [])]
    cfg = load_config(PAPER / cfg_file, overrides)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    splits = prepare_data(cfg)
    n_train = len(splits.y_train)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        clat.train(cfg, Path(d) / "run", force=True, data=splits)
        rows = RunDir(Path(d) / "run").metrics()
    wall = time.time() - t0
    out = {"config": f"configs/paper/cifar10/{cfg_file}", "overrides": overrides, "wall_s": wall, "epochs": []}
    for r in rows:
        out["epochs"].append({k: r.get(k) for k in ("epoch", "stage", "method", "epoch_time_s", "time_s", "trainable_params", "selected",
                                                    "val")})
    out["n_train"] = n_train
    if torch.cuda.is_available():
        out["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    for stage in ("pretrain", "finetune"):
        st = [r for r in rows if r["stage"] == stage]
        if len(st) >= 2:  # the last epoch of the stage is warm
            t = st[-1]["epoch_time_s"]
            out[f"{stage}_last_epoch_s"] = t
            out[f"{stage}_method"] = st[-1]["method"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data", help="folder holding cifar-10-batches-py")
    ap.add_argument("--no-verify", action="store_true", help="accept a local copy whose MD5s differ (the JPEG-recovered subset)")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--val-examples", type=int, default=500, help="held-out images evaluated per epoch (not timed)")
    ap.add_argument("--budget-s", type=float, default=float("inf"), help="start no new variant after this many seconds")
    ap.add_argument("--allow-cpu", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the bundled data: a check of this script, not a measurement")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_epoch.py measures GPU training; no CUDA device is visible (use --allow-cpu to run it anyway)", file=sys.stderr)
        return 2
    info = C.env_info()
    C.header("Epoch time of real clat.train runs", info)
    res: dict = {"info": info, "variants": {}, "full_train_images": FULL_TRAIN}
    t_start = time.time()
    out_name = "gpu_epoch_smoke" if args.smoke else "gpu_epoch"
    for name in args.variants:
        if time.time() - t_start > args.budget_s:
            res["variants"][name] = {"skipped": "time budget"}
            continue
        C.log(f"{name} ...")
        try:
            r = run_variant(name, args.root, not args.no_verify, args.val_examples, args.smoke)
        except Exception as e:  # noqa: BLE001 - record and go on: one broken variant must not hide the others
            r = {"error": f"{type(e).__name__}: {e}"[:2000]}
        res["variants"][name] = r
        C.log(json.dumps({k: v for k, v in r.items() if k not in ("epochs", "overrides")}))
        C.finish(info)
        C.write_json(out_name, res)
    rows = []
    for name, r in res["variants"].items():
        if "pretrain_last_epoch_s" not in r:
            rows.append([name, r.get("error", r.get("skipped", "?"))[:60], "", "", "", ""])
            continue
        n = r["n_train"]
        for stage in ("pretrain", "finetune"):
            if f"{stage}_last_epoch_s" in r:
                t = r[f"{stage}_last_epoch_s"]
                rows.append([name, r[f"{stage}_method"], f"{t:.2f}", f"{n / t:,.0f}", f"{t * FULL_TRAIN / n:.1f}",
                             f"{r.get('peak_gpu_mem_gib', 0):.2f}"])
    print(C.table(["variant", "method", "epoch s", "img/s", "49k-image epoch s (extrap.)", "peak GiB"], rows))
    print(f"results: {C.write_json(out_name, res)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
