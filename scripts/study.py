"""The controlled study of docs/results.md — does CLAT help? — with one command.

    python scripts/study.py                 # do what the time budget allows, then render docs/results.md
    python scripts/study.py --hours 2       # this session's budget (default 2 h; no new epoch or attack chunk starts after it)
    python scripts/study.py --plan          # the work items and their state
    python scripts/study.py --report        # only render docs/results.md from what is done

Design (see docs/results.md): a ResNet-18 at 1/4 width is adversarially trained with PGD-AT on the
CIFAR-10 subset in ../shared/data (configs/study/pgd_at_pretrain.yaml). The arms all branch from
its checkpoint at the epoch of best validation PGD accuracy (P) and train F more epochs with the same
optimizer settings: PGD-AT continued, CLAT and its ablations, RiFT, LoRA; TRADES → TRADES + CLAT
branch from a TRADES run of the same schedule stopped at P. Each arm runs with 3 seeds and is
evaluated on the held-out test images (clean, PGD-20 worst of 5 restarts, standard AutoAttack).

Nothing is lost when a session ends: training runs continue from their last epoch checkpoint
(`runs/study/`), AutoAttack runs in chunks, and every finished piece is exported to
`study/` (committed: result JSON and the two branch checkpoints), so a fresh clone continues
where the last session stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "study"
STUDY = REPO / "study"
RESULTS = STUDY / "results"
CKPTS = STUDY / "checkpoints"
DOC = REPO / "docs" / "results.md"
IMG = REPO / "docs" / "img"
PRETRAIN_CFG = REPO / "configs" / "study" / "pgd_at_pretrain.yaml"

SEEDS = (0, 1, 2)
F_EPOCHS = 10  # epochs of every arm after the branch point
ARM_OVERRIDES = ["pretrain.epochs=0", f"finetune.epochs={F_EPOCHS}", "finetune.lr=0.01", "finetune.schedule=cosine",
                 "clat.reselect_every=2", "keep_checkpoints=2"]
LAMBDAS = (0.01, 0.1, 1.0)  # swept on the validation split (seed 0) before the CLAT arms
N_TEST_PGD = 2000  # every test image of the subset
N_TEST_AA = 1000
AA_CHUNK = 250
PGD = {"steps": 20, "restarts": 5}

# arm name -> (branch checkpoint, finetune method, extra overrides, label)
ARMS: dict[str, tuple[str, str, list[str], str]] = {
    "pgd_at_cont": ("pgd_at", "pgd_at", [], "PGD-AT continued (full model)"),
    "clat": ("pgd_at", "clat", [], "CLAT (k=1, dynamic)"),
    "clat_random": ("pgd_at", "clat", ["clat.selection=random"], "CLAT, random layers"),
    "clat_nondynamic": ("pgd_at", "clat", ["clat.dynamic=false"], "CLAT, non-dynamic"),
    "clat_ce_adv": ("pgd_at", "clat", ["clat.ce_on=adv"], "CLAT, CE on x+δ*"),
    "rift": ("pgd_at", "rift", [], "RiFT"),
    "lora": ("pgd_at", "lora", [], "LoRA (rank 8, every conv)"),
    "trades_cont": ("trades", "trades", [], "TRADES continued (full model)"),
    "trades_clat": ("trades", "clat", [], "TRADES + CLAT"),
}
CLAT_ARMS = {a for a, v in ARMS.items() if v[1] == "clat"}
DATA_ROOT = REPO.parent / "shared" / "data"
EXTRA: list[str] = [f"data.root={DATA_ROOT}"]  # overrides added to every run (and the --smoke mode's tiny settings)


def configure_smoke(root: Path) -> None:
    """Everything at toy size in ``root``: checks the whole pipeline in about a minute."""
    global RUNS, STUDY, RESULTS, CKPTS, DOC, IMG, SEEDS, F_EPOCHS, LAMBDAS, N_TEST_PGD, N_TEST_AA, AA_CHUNK, PGD
    RUNS, STUDY, DOC, IMG = root / "runs", root / "study", root / "results.md", root / "img"
    RESULTS, CKPTS = STUDY / "results", STUDY / "checkpoints"
    SEEDS, F_EPOCHS, LAMBDAS = (0, 1), 2, (0.1, 1.0)
    N_TEST_PGD, N_TEST_AA, AA_CHUNK, PGD = 40, 8, 4, {"steps": 2, "restarts": 2}
    ARM_OVERRIDES[1] = f"finetune.epochs={F_EPOCHS}"
    EXTRA[:] = [f"data.root={DATA_ROOT}", "model.name=tiny_cnn", "data.train_size=260", "data.val_size=40", "pretrain.epochs=3", "eval.n_examples=40",
                "eval.steps=2", "attack.steps=1", "data.batch_size=64", "clat.criticality.batch_size=20", "clat.criticality.steps=1",
                "rift.batch_size=20", "rift.steps=1", "rift.alphas=[0.0,1.0]", "keep_checkpoints=3", "channels_last=false"]


class OutOfTime(Exception):
    pass


def log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_json(p: Path):
    return json.loads(p.read_text()) if p.is_file() else None


def write_json(p: Path, obj) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(p)


def rows_of(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    return [json.loads(l) for l in f.read_text().splitlines() if l.strip()] if f.is_file() else []


class Budget:
    def __init__(self, hours: float) -> None:
        self.deadline = time.time() + 3600 * hours

    def check(self) -> None:
        if time.time() > self.deadline:
            raise OutOfTime


# -- training in chunks --------------------------------------------------------------------
def save_partial(run: Path) -> None:
    """Keep an unfinished run across sessions (runs/ is not committed): its config, metrics, latest
    checkpoint and the weights of its best validation epoch go to study/partial/<run>/."""
    from clat.train import Checkpoints

    latest = Checkpoints(run, 1).latest_valid()
    if latest is None:
        return
    dst = STUDY / "partial" / run.name
    shutil.rmtree(dst, ignore_errors=True)
    (dst / "checkpoints").mkdir(parents=True)
    for f in ("config.yaml", "metrics.jsonl"):
        shutil.copy(run / f, dst / f)
    shutil.copytree(latest, dst / "checkpoints" / latest.name)
    rows = rows_of(run)
    if rows and "val" in rows[0]:
        best = max(rows, key=lambda r: (r["val"]["pgd_acc"], -r["epoch"]))["epoch"]
        src = run / "checkpoints" / f"epoch_{best - 1:04d}"
        if src != latest and (src / "model.safetensors").is_file():
            (dst / "checkpoints" / src.name).mkdir()
            shutil.copy(src / "model.safetensors", dst / "checkpoints" / src.name / "model.safetensors")
    log(f"{run.name}: unfinished run saved to {dst.relative_to(STUDY.parent)} (continues next session)")


def restore_partial(run: Path) -> None:
    src = STUDY / "partial" / run.name
    if src.is_dir() and not run.exists():
        shutil.copytree(src, run)
        log(f"{run.name}: continuing the run saved in {src.relative_to(STUDY.parent)}")


def run_training(run: Path, cfg, budget: Budget, until: int | None = None) -> None:
    """Train ``cfg`` in ``run`` one epoch per call of clat.train, resuming, until done (or ``until``).
    When the budget ends first, the run is saved to study/partial/ for the next session."""
    restore_partial(run)
    try:
        _train_epochs(run, cfg, budget, until)
    except OutOfTime:
        save_partial(run)
        raise
    shutil.rmtree(STUDY / "partial" / run.name, ignore_errors=True)


def _train_epochs(run: Path, cfg, budget: Budget, until: int | None) -> None:
    from clat.train import train

    total = cfg.pretrain.epochs + cfg.finetune.epochs
    stop = min(until or total, total)
    while True:
        done = len(rows_of(run))
        finished = (run / "summary.json").is_file()
        if finished or done >= stop:
            return
        budget.check()
        started = (run / "config.yaml").is_file()
        t0 = time.time()
        if started:
            train(None, run, resume=True, until_epoch=done + 1)
        else:
            train(cfg, run, until_epoch=done + 1, force=True)
        log(f"{run.name}: epoch {done + 1}/{stop} in {time.time() - t0:.0f} s")


def pretrain_cfg(method: str = "pgd_at"):
    from clat.config import load_config

    return load_config(PRETRAIN_CFG, [f"pretrain.method={method}", *EXTRA])


def branch_point() -> dict | None:
    return read_json(RESULTS / "branch.json")


def do_pretraining(budget: Budget) -> dict:
    """PGD-AT for the whole schedule; P = the epoch of best validation PGD accuracy."""
    b = branch_point()
    if b is not None:
        return b
    run = RUNS / "pgd_at_pretrain"
    cfg = pretrain_cfg()
    run_training(run, cfg, budget)
    rows = rows_of(run)
    best = max(rows, key=lambda r: (r["val"]["pgd_acc"], -r["epoch"]))  # ties: the earlier epoch
    p = best["epoch"]
    CKPTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "checkpoints" / f"epoch_{p - 1:04d}" / "model.safetensors", CKPTS / "pgd_at_branch.safetensors")
    write_json(RESULTS / "pgd_at_pretrain.json", {"config": str(PRETRAIN_CFG.relative_to(REPO)), "rows": rows,
                                                 "summary": read_json(run / "summary.json")})
    b = {"epoch": p, "val": best["val"], "rule": "epoch of the highest validation PGD-10 accuracy (earliest on ties)",
         "last_val": rows[-1]["val"], "epochs": len(rows)}
    write_json(RESULTS / "branch.json", b)
    log(f"branch point: epoch {p} (val PGD {best['val']['pgd_acc']:.3f}, last epoch {rows[-1]['val']['pgd_acc']:.3f})")
    return b


def do_trades_pretraining(budget: Budget, p: int) -> None:
    if (CKPTS / "trades_branch.safetensors").is_file():
        return
    run = RUNS / "trades_pretrain"
    run_training(run, pretrain_cfg("trades"), budget, until=p)
    shutil.copy(run / "checkpoints" / f"epoch_{p - 1:04d}" / "model.safetensors", CKPTS / "trades_branch.safetensors")
    write_json(RESULTS / "trades_pretrain.json", {"rows": rows_of(run), "stopped_at": p})


def arm_cfg(arm: str, seed: int, lam: float | None):
    from clat.config import load_config

    branch, method, extra, _ = ARMS[arm]
    over = [f"init={CKPTS / f'{branch}_branch.safetensors'}", f"finetune.method={method}", f"seed={seed}", *ARM_OVERRIDES, *extra]
    if branch == "trades":
        over.append("pretrain.method=trades")  # CLAT's base method (used only with clat.ce_on=base)
    if lam is not None:
        over.append(f"clat.lam={lam}")
    return load_config(PRETRAIN_CFG, [*EXTRA, *over])


# -- evaluation ----------------------------------------------------------------------------
def test_data():
    from clat.data import load_cifar

    x, y = load_cifar("cifar10", DATA_ROOT, False, verify=False)
    return x, y


def load_weights(path: Path):
    from clat.checkpoint import load_model

    model, _ = load_model(str(path), device=torch.device("cpu"))
    return model.to(memory_format=torch.channels_last).eval()


def evaluate_weights(weights: Path, out_dir: Path, budget: Budget, name: str) -> dict:
    """Clean + PGD-20 (worst of 5) on all test images, standard AutoAttack on the first 1,000 (in chunks)."""
    from clat.evaluate import autoattack, evaluate

    x, y = test_data()
    model = load_weights(weights)
    pgd_file = out_dir / "pgd.json"
    if not pgd_file.is_file():
        budget.check()
        # in two parts, so that PGD is also known on exactly the images AutoAttack sees
        parts = [(0, N_TEST_AA), (N_TEST_AA, N_TEST_PGD)]
        r = [evaluate(model, x[a:b], y[a:b], eps=8 / 255, alpha=2 / 255, steps=PGD["steps"], restarts=PGD["restarts"],
                      batch_size=500, seed=0, index_offset=a) for a, b in parts if b > a]
        n = sum(p["n"] for p in r)
        r = {"n": n, "clean_acc": sum(p["clean_correct"] for p in r) / n, "pgd_acc": sum(p["pgd_correct"] for p in r) / n,
             "pgd_acc_aa_images": r[0]["pgd_acc"], "n_aa_images": r[0]["n"], "attack": r[0]["attack"], "time_s": sum(p["time_s"] for p in r)}
        write_json(pgd_file, r)
        log(f"{name}: clean {r['clean_acc']:.3f} PGD {r['pgd_acc']:.3f} ({r['time_s']:.0f} s)")
    chunks = []
    for i in range(0, N_TEST_AA, AA_CHUNK):
        f = out_dir / f"aa_{i:05d}.json"
        if not f.is_file():
            budget.check()
            r = autoattack(model, x[i : i + AA_CHUNK], y[i : i + AA_CHUNK], eps=8 / 255, version="standard", batch_size=AA_CHUNK, seed=i)
            write_json(f, r)
            log(f"{name}: AutoAttack images {i}-{i + AA_CHUNK}: {r['robust_acc']:.3f} ({r['time_s']:.0f} s)")
        chunks.append(read_json(f))
    pgd = read_json(pgd_file)
    n = sum(c["n"] for c in chunks)
    return {
        "clean_acc": pgd["clean_acc"], "pgd20x5_acc": pgd["pgd_acc"], "n_pgd": pgd["n"], "pgd20x5_acc_aa_images": pgd["pgd_acc_aa_images"],
        "aa_acc": sum(c["robust_acc"] * c["n"] for c in chunks) / n, "aa_clean_acc": sum(c["clean_acc"] * c["n"] for c in chunks) / n,
        "n_aa": n, "aa_library": chunks[0]["library"], "aa_warnings": sorted({w for c in chunks for w in c["warnings"]}),
        "eval_time_s": pgd["time_s"] + sum(c["time_s"] for c in chunks),
    }


def do_reference(name: str, budget: Budget) -> None:
    """The branch checkpoints themselves, evaluated like the arms ("before")."""
    out = RESULTS / f"{name}_branch_eval.json"
    if out.is_file():
        return
    res = evaluate_weights(CKPTS / f"{name}_branch.safetensors", RUNS / f"{name}_branch_eval", budget, f"{name} branch")
    write_json(out, res)


# -- λ and the arms ------------------------------------------------------------------------
def chosen_lambda() -> float | None:
    d = read_json(RESULTS / "lambda.json")
    return None if d is None else d["chosen"]


def do_lambda_sweep(budget: Budget) -> float:
    lam = chosen_lambda()
    if lam is not None:
        return lam
    finals = {}
    for value in LAMBDAS:
        run = RUNS / f"lam_{value:g}"
        run_training(run, arm_cfg("clat", 0, value), budget)
        finals[value] = rows_of(run)[-1]["val"]
    best = max(LAMBDAS, key=lambda v: (finals[v]["pgd_acc"], finals[v]["clean_acc"]))
    write_json(RESULTS / "lambda.json", {"chosen": best, "final_val": {f"{v:g}": finals[v] for v in LAMBDAS}, "seed": 0,
                                         "rule": "highest final validation PGD-10 accuracy (clean accuracy breaks ties)"})
    log(f"λ = {best:g} ({ {f'{v:g}': round(finals[v]['pgd_acc'], 3) for v in LAMBDAS} })")
    return best


def do_arm(arm: str, seed: int, lam: float, budget: Budget) -> None:
    out = RESULTS / f"{arm}_s{seed}.json"
    if out.is_file():
        return
    run = RUNS / f"{arm}_s{seed}"
    if arm == "clat" and seed == 0 and (RUNS / f"lam_{lam:g}" / "summary.json").is_file() and not run.exists():
        shutil.copytree(RUNS / f"lam_{lam:g}", run)  # the sweep's run with the chosen λ is this arm's seed-0 run
    run_training(run, arm_cfg(arm, seed, lam if arm in CLAT_ARMS else None), budget)
    res = evaluate_weights(run / "model.safetensors", run / "eval", budget, run.name)
    summary = read_json(run / "summary.json")
    rows = rows_of(run)
    write_json(out, {"arm": arm, "seed": seed, "label": ARMS[arm][3], "lam": lam if arm in CLAT_ARMS else None, "test": res,
                     "trainable_params": summary["trainable_params_last"], "total_params": summary["total_params"],
                     "train_time_s": summary["train_time_s"], "rows": rows, "selection_history": summary["selection_history"]})
    log(f"{arm} seed {seed}: done")


def plan() -> list[tuple[str, bool]]:
    items = [("pgd_at_pretrain", (RESULTS / "branch.json").is_file()),
             ("trades_pretrain (to P)", (CKPTS / "trades_branch.safetensors").is_file()),
             ("lambda sweep", (RESULTS / "lambda.json").is_file()),
             ("eval pgd_at branch", (RESULTS / "pgd_at_branch_eval.json").is_file()),
             ("eval trades branch", (RESULTS / "trades_branch_eval.json").is_file())]
    items += [(f"{a} seed {s}", (RESULTS / f"{a}_s{s}.json").is_file()) for s in SEEDS for a in ARMS]
    return items


def run_all(budget: Budget) -> None:
    b = do_pretraining(budget)
    do_trades_pretraining(budget, b["epoch"])
    lam = do_lambda_sweep(budget)
    do_reference("pgd_at", budget)
    do_reference("trades", budget)
    for seed in SEEDS:
        for arm in ARMS:
            do_arm(arm, seed, lam, budget)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hours", type=float, default=2.0, help="time budget of this session (default 2)")
    ap.add_argument("--plan", action="store_true", help="list the work items and their state")
    ap.add_argument("--report", action="store_true", help="only render docs/results.md")
    ap.add_argument("--smoke", metavar="DIR", help="the whole pipeline at toy size in DIR (a check of this script, ~2 min)")
    args = ap.parse_args(argv)
    if args.smoke:
        configure_smoke(Path(args.smoke).resolve())
    sys.modules.setdefault("study", sys.modules[__name__])  # study_report reads this module's (possibly --smoke) settings
    if args.plan:
        for name, done in plan():
            print(f"[{'x' if done else ' '}] {name}")
        return 0
    if not args.report:
        import logging
        import warnings

        logging.basicConfig(level=logging.WARNING)
        warnings.filterwarnings("ignore", message=".*without checking their checksums.*")
        t0 = time.time()
        try:
            run_all(Budget(args.hours))
            log("the study is complete")
        except OutOfTime:
            log(f"time budget used ({(time.time() - t0) / 3600:.2f} h): run the same command again to continue")
    from study_report import render

    render()
    done = sum(d for _, d in plan())
    log(f"{done}/{len(plan())} items done; report: {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
