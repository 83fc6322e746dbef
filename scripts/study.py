"""The controlled study of docs/results.md — does CLAT help? — with one command.

    python scripts/study.py                 # do what the time budget allows, then render docs/results.md
    python scripts/study.py --hours 2       # this session's budget (default 2 h; no new epoch or attack chunk starts after it)
    python scripts/study.py --plan          # the work items and their state
    python scripts/study.py --report        # only render docs/results.md from what is done
    python scripts/study.py --seeds 3 4 5 --arms clat --no-report   # one worker of a parallel run (e.g. on a GPU)

Design (see docs/results.md): a ResNet-18 at 1/4 width is adversarially trained with PGD-AT on the
CIFAR-10 subset in ../shared/data (configs/study/pgd_at_pretrain.yaml). The arms all branch from
its checkpoint at the epoch of best validation PGD accuracy (P) and train F more epochs with the same
optimizer settings: PGD-AT continued, CLAT and its ablations, RiFT, LoRA; TRADES → TRADES + CLAT
branch from a TRADES run of the same schedule stopped at P. Each arm runs with 3 seeds and is
evaluated on the held-out test images (clean, PGD-20 worst of 5 restarts, standard AutoAttack).

Nothing is lost when a session ends: training runs continue from their last epoch checkpoint
(`runs/study/`), attacks run in chunks, and every finished piece is exported to `study/` (committed: result
JSON, attack chunks in study/eval/, the two branch checkpoints, and an unfinished run's latest checkpoint or
trained weights in study/partial/), so a fresh clone continues where the last session stopped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from clat.attacks import ThreatModel
from clat.runs import RunDir

# The threat model of every evaluation of the study (ℓ∞ 8/255, step 2/255: the paper's; the arms train under the same ε)
THREAT = ThreatModel()

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "study"
STUDY = REPO / "study"
RESULTS = STUDY / "results"
CKPTS = STUDY / "checkpoints"
DOC = REPO / "docs" / "results.md"
IMG = REPO / "docs" / "img"
PRETRAIN_CFG = REPO / "configs" / "study" / "pgd_at_pretrain.yaml"
IMG_PREFIX = "study_"  # the plots' file names in docs/img/

SEEDS = (0, 1, 2, 3)  # 0-2 trained on the 2-core CPU; 3 on one H100 (scripts/study_gpu.sh), evaluated on both
F_EPOCHS = 20  # epochs of every arm after the branch point
ARM_SETTINGS = {"pretrain.epochs": 0, "finetune.epochs": F_EPOCHS, "finetune.lr": 0.01, "finetune.schedule": "cosine",
                "clat.reselect_every": 4, "keep_checkpoints": 2}  # config overrides of every arm
# A measurement kept beside the study: (run name, config, title, what it taught). Its run is the last work item.
PILOT: tuple[str, Path, str, str] | None = (
    "pilot_9k_pretrain", REPO / "configs" / "study" / "pilot_9k_pretrain.yaml", "First attempt: all 9,000 training images, 30 epochs",
    "With all 9,000 training images this model underfits: accuracy on its own (weaker, PGD-5) training attack stays within a "
    "few points of validation PGD-10 accuracy, and validation robustness stays on its plateau after the last decay instead of "
    "falling. An underfit baseline would make the comparison "
    "meaningless, so the study trains on fewer images for longer (below).")
LAMBDAS = (0.01, 0.1, 1.0)  # swept on the validation split (seed 0) before the CLAT arms
N_TEST_PGD = 2000  # every test image of the subset
N_TEST_AA = 1000
AA_CHUNK = 250
PGD = {"steps": 20, "restarts": 5}

# Settings the arms below were run with, named so that each arm stays one variant whatever the defaults become:
# the criticality of clat 0.1 (denominator = the post-activation input; the paper's Eq. 6 is `upstream`), and
# TRADES crafting its attack with batch statistics (clat 0.1; the reference code uses eval mode).
INPUT_DENOMINATOR = "clat.criticality.denominator=input"
PAPER_DENOMINATOR = "clat.criticality.denominator=upstream"
TRADES_TRAIN_MODE = "trades.attack_mode=train"
# arm name -> (branch checkpoint, finetune method, extra overrides, label)
ARMS: dict[str, tuple[str, str, list[str], str]] = {
    "pgd_at_cont": ("pgd_at", "pgd_at", [], "PGD-AT continued (full model)"),
    "clat": ("pgd_at", "clat", [INPUT_DENOMINATOR], "CLAT (k=1, dynamic; clat 0.1's criticality)"),
    "clat_random": ("pgd_at", "clat", [INPUT_DENOMINATOR, "clat.selection=random"], "CLAT, random layers"),
    "clat_nondynamic": ("pgd_at", "clat", [INPUT_DENOMINATOR, "clat.dynamic=false"], "CLAT, non-dynamic"),
    "clat_ce_adv": ("pgd_at", "clat", [INPUT_DENOMINATOR, "clat.ce_on=adv"], "CLAT, CE on x+δ*"),
    "rift": ("pgd_at", "rift", [], "RiFT"),
    "lora": ("pgd_at", "lora", [], "LoRA (rank 8, every conv)"),
    "trades_cont": ("trades", "trades", [TRADES_TRAIN_MODE], "TRADES continued (full model)"),
    "trades_clat": ("trades", "clat", [INPUT_DENOMINATOR, TRADES_TRAIN_MODE], "TRADES + CLAT"),
    # The paper's own criticality (Eq. 6 along the dataflow, clat 0.2's default) and a fair random control: with automatic λ
    # the feature term has the same weight whatever layers are chosen (docs/criticality.md measures which layers help).
    "clat_paper": ("pgd_at", "clat", [PAPER_DENOMINATOR], "CLAT, the paper's Eq. 6 (k=1, dynamic)"),
    "clat_paper_auto": ("pgd_at", "clat", [PAPER_DENOMINATOR, "clat.lam_mode=auto"], "CLAT, Eq. 6, automatic λ"),
    "clat_random_auto": ("pgd_at", "clat", [PAPER_DENOMINATOR, "clat.selection=random", "clat.lam_mode=auto"], "CLAT, random layers, automatic λ"),
}
CLAT_ARMS = {a for a, v in ARMS.items() if v[1] == "clat"}
DATA_ROOT = REPO.parent / "shared" / "data"
DATASET, DOWNLOAD, VERIFY = "cifar10", False, False  # the subset is JPEG-recovered: it cannot match the official MD5s
EXTRA: list[str] = [f"data.root={DATA_ROOT}"]  # overrides added to every run (and the --smoke mode's tiny settings)
# What docs/results*.md says about the setting (the paper-scale presets replace it).
TEXT = {
    "title": "the CIFAR-10 subset",
    "data": "the CIFAR-10 subset in `../shared/data` (JPEG-recovered; 10,000 training and 2,000 test images). The study uses "
            "its first 3,000 training images: 2,000 to train on and 1,000 held out (fixed split, `data.split_seed=0`) that "
            "decide every choice below (with all 9,000 the model underfits: see the first attempt below); the 2,000 test "
            "images are used only for the final evaluation.",
    "model": "CIFAR ResNet-18 at 1/4 width (`resnet18_w16`, 0.70M parameters, 21 layers), PGD-AT (ε = 8/255, PGD-5 with step "
             "2/255 in training), SGD momentum 0.9, weight decay 5e-4, batch 128, lr 0.1 divided by 10 at 50% and 75% of 80 epochs "
             "(Rice et al.'s piecewise schedule), channels-last (`configs/study/pgd_at_pretrain.yaml`).",
    "plot_title": "PGD-AT on the CIFAR-10 subset, ResNet-18 at 1/4 width",
    "train_attack": "PGD-5",
    "k": "k = 1, the paper's default for ResNet-18; dynamic re-selection every 4 epochs, i.e. 5 selections as in the paper's "
         "50 epochs with re-selection every 10",
    "machine": "2 CPU cores",
    "command": ".venv/bin/python scripts/study.py",
    "sessions": "The whole study needs several sessions of 2 hours.",
}

# The same study at paper scale, for a GPU: full CIFAR-10/100 (downloaded, MD5-verified), 50 epochs of PGD-AT (PGD-10),
# then every arm 50 epochs. python scripts/study.py --scale cifar10_preact_resnet18 --data-root /data --hours 24
PAPER_SCALE = {
    "cifar10_preact_resnet18": ("cifar10", "PreAct ResNet-18 (`preact_resnet18`, 11.2M parameters)", 1),
    "cifar10_wrn34_10": ("cifar10", "WideResNet-34-10 (`wrn34_10`, 46.2M parameters)", 2),
    "cifar100_preact_resnet18": ("cifar100", "PreAct ResNet-18 (`preact_resnet18`, 11.2M parameters)", 1),
    "cifar100_wrn34_10": ("cifar100", "WideResNet-34-10 (`wrn34_10`, 46.2M parameters)", 2),
}


def configure_paper(name: str, data_root: Path) -> None:
    """Point the study at a paper-scale preset (``configs/study/paper/<name>.yaml``): its own runs/, study/ and
    docs/results_<name>.md, F = 50 epochs per arm with re-selection every 10, PGD-20x5 on all 10,000 test images
    and AutoAttack on the first 1,000 (in chunks of 500)."""
    global RUNS, STUDY, RESULTS, CKPTS, DOC, PRETRAIN_CFG, IMG_PREFIX, F_EPOCHS, N_TEST_PGD, N_TEST_AA, AA_CHUNK
    global DATA_ROOT, DATASET, DOWNLOAD, VERIFY, PILOT, SEEDS
    dataset, model_text, k = PAPER_SCALE[name]
    SEEDS = (0, 1, 2)
    RUNS, STUDY, DOC = REPO / "runs" / f"study_{name}", REPO / "study" / "paper" / name, REPO / "docs" / f"results_{name}.md"
    RESULTS, CKPTS = STUDY / "results", STUDY / "checkpoints"
    PRETRAIN_CFG, IMG_PREFIX = REPO / "configs" / "study" / "paper" / f"{name}.yaml", f"study_{name}_"
    F_EPOCHS, N_TEST_PGD, N_TEST_AA, AA_CHUNK = 50, 10_000, 1000, 500
    ARM_SETTINGS.update({"finetune.epochs": F_EPOCHS, "clat.reselect_every": 10})
    DATA_ROOT, DATASET, DOWNLOAD, VERIFY, PILOT = data_root, dataset, True, True, None
    EXTRA[:] = [f"data.root={DATA_ROOT}"]
    full = "CIFAR-10" if dataset == "cifar10" else "CIFAR-100"
    TEXT.update({
        "title": f"full {full} with {model_text.split(' (')[0]}",
        "data": f"full {full} (50,000 training and 10,000 test images; downloaded and MD5-verified). 1,000 training images are "
                "held out (fixed split, `data.split_seed=0`) and decide every choice below; the test images are used only for the "
                "final evaluation.",
        "model": f"{model_text}, PGD-AT (ε = 8/255, PGD-10 with step 2/255 in training), SGD momentum 0.9, weight decay 5e-4, "
                 f"batch 128, lr 0.1 divided by 10 at 50% and 75% of 50 epochs (`configs/study/paper/{name}.yaml`).",
        "plot_title": f"PGD-AT on {full}, {model_text.split(' (')[0]}",
        "train_attack": "PGD-10",
        "k": f"k = {k}, the paper's default for this model; dynamic re-selection every 10 epochs (5 selections, as in the paper)",
        "machine": "the GPU",
        "command": f"python scripts/study.py --scale {name} --data-root DATA",
        "sessions": "A paper-scale arm is 50 GPU epochs: give `--hours` the length of the lease; the next call continues.",
    })


def configure_smoke(root: Path) -> None:
    """Everything at toy size in ``root``: checks the whole pipeline in about a minute."""
    global RUNS, STUDY, RESULTS, CKPTS, DOC, IMG, SEEDS, F_EPOCHS, LAMBDAS, N_TEST_PGD, N_TEST_AA, AA_CHUNK, PGD
    RUNS, STUDY, DOC, IMG = root / "runs", root / "study", root / "results.md", root / "img"
    RESULTS, CKPTS = STUDY / "results", STUDY / "checkpoints"
    SEEDS, F_EPOCHS, LAMBDAS = (0, 1), 2, (0.1, 1.0)
    N_TEST_PGD, N_TEST_AA, AA_CHUNK, PGD = 40, 8, 4, {"steps": 2, "restarts": 2}
    ARM_SETTINGS["finetune.epochs"] = F_EPOCHS
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


def device_label() -> str:
    """Where this process trains and evaluates, as the study records it (seeds can run on different machines)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({torch.get_num_threads()} threads)"


# Files written before the study recorded devices (2026-11-27) all came from the CPU study on 2 cores.
LEGACY_DEVICE = "CPU (2 threads)"
DEVICE_FILE = "study_device.json"  # in a run directory: the devices that trained it (kept with it in study/partial/)


def note_device(run: Path) -> None:
    f = run / DEVICE_FILE
    seen = (read_json(f) or {"train": []})["train"]
    if device_label() not in seen:
        write_json(f, {"train": [*seen, device_label()]})


def train_devices(run: Path) -> list[str]:
    d = read_json(run / DEVICE_FILE)
    return d["train"] if d else [LEGACY_DEVICE]


def rows_of(run: Path) -> list[dict]:
    from clat.runs import RunDir

    return RunDir(run).metrics()


class Budget:
    def __init__(self, hours: float) -> None:
        self.deadline = time.time() + 3600 * hours

    def check(self) -> None:
        if time.time() > self.deadline:
            raise OutOfTime


# -- training in chunks --------------------------------------------------------------------
def partial_dir(run: Path) -> Path:
    """Where an unfinished item's run is kept across sessions (committed; runs/ is not)."""
    return STUDY / "partial" / run.name


def save_partial(run: Path) -> None:
    """Keep an unfinished run across sessions (runs/ is not committed): its config, metrics, latest
    checkpoint and the weights of its best validation epoch go to study/partial/<run>/."""
    from clat.runs import RunDir

    rows = rows_of(run)
    best = {best_row(rows)["epoch"] - 1} if rows and "val" in rows[0] else set()
    dst = partial_dir(run)
    what = RunDir(run).export(dst, weights_of=best, extra=(DEVICE_FILE,))
    if what == "finished":
        log(f"{run.name}: trained weights kept in {dst.relative_to(STUDY.parent)} until its evaluation is written")
    elif what:
        log(f"{run.name}: unfinished run saved to {dst.relative_to(STUDY.parent)} (continues next session)")


def restore_partial(run: Path) -> None:
    src = partial_dir(run)
    if src.is_dir() and not run.exists():
        shutil.copytree(src, run)
        log(f"{run.name}: continuing the run saved in {src.relative_to(STUDY.parent)}")


def run_training(run: Path, cfg, budget: Budget, until: int | None = None, keep_partial: bool = False) -> None:
    """Train ``cfg`` in ``run`` one epoch per call of clat.train, resuming, until done (or ``until``).
    When the budget ends first, the run is saved to study/partial/ for the next session. ``keep_partial``:
    leave a saved copy there (the caller drops it once the item is finished: an arm's evaluation follows)."""
    restore_partial(run)
    try:
        _train_epochs(run, cfg, budget, until)
    except OutOfTime:
        save_partial(run)
        raise
    if not keep_partial:
        shutil.rmtree(partial_dir(run), ignore_errors=True)


def best_row(rows: list[dict]) -> dict:
    """The epoch of the highest validation PGD accuracy (the earlier one on ties): the branch point rule."""
    return max(rows, key=lambda r: (r["val"]["pgd_acc"], -r["epoch"]))


def prune_checkpoints(run: Path) -> None:
    """Keep the latest epoch checkpoint (to resume) and the one of the best validation epoch so far (a possible
    branch point); the others go. A WRN-34-10 checkpoint with its optimizer state is ~370 MB."""
    from clat.runs import RunDir

    rows = rows_of(run)
    keep = {len(rows) - 1}
    if rows and "val" in rows[0]:
        keep.add(best_row(rows)["epoch"] - 1)
    RunDir(run).checkpoints().prune(keep)


def _train_epochs(run: Path, cfg, budget: Budget, until: int | None) -> None:
    from clat.loop import train

    total = cfg.pretrain.epochs + cfg.finetune.epochs
    stop = min(until or total, total)
    while True:
        done = len(rows_of(run))
        finished = RunDir(run).finished()
        if finished or done >= stop:
            return
        budget.check()
        started = (run / "config.yaml").is_file()
        t0 = time.time()
        note_device(run)
        if started:
            train(None, run, resume=True, until_epoch=done + 1)
        else:
            train(cfg, run, until_epoch=done + 1, force=True)
        prune_checkpoints(run)
        log(f"{run.name}: epoch {done + 1}/{stop} in {time.time() - t0:.0f} s")


def pretrain_cfg(method: str = "pgd_at"):
    from clat.config import load_config

    return load_config(PRETRAIN_CFG, [f"pretrain.method={method}", *EXTRA, *([TRADES_TRAIN_MODE] if method == "trades" else [])])


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
    best = best_row(rows)
    p = best["epoch"]
    CKPTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(RunDir(run).checkpoints().weights(p - 1), CKPTS / "pgd_at_branch.safetensors")
    write_json(RESULTS / "pgd_at_pretrain.json", {"config": str(PRETRAIN_CFG.relative_to(REPO)), "rows": rows,
                                                 "summary": RunDir(run).summary(), "train_devices": train_devices(run)})
    b = {"epoch": p, "val": best["val"], "rule": "epoch of the highest validation PGD-10 accuracy (earliest on ties)",
         "last_val": rows[-1]["val"], "epochs": len(rows)}
    write_json(RESULTS / "branch.json", b)
    log(f"branch point: epoch {p} (val PGD {best['val']['pgd_acc']:.3f}, last epoch {rows[-1]['val']['pgd_acc']:.3f})")
    return b


def do_pilot(budget: Budget) -> None:
    if PILOT is None or (RESULTS / f"{PILOT[0]}.json").is_file():
        return
    from clat.config import load_config

    run = RUNS / PILOT[0]
    run_training(run, load_config(PILOT[1], EXTRA), budget)
    write_json(RESULTS / f"{PILOT[0]}.json", {"config": str(PILOT[1].relative_to(REPO)), "rows": rows_of(run),
                                             "summary": RunDir(run).summary()})


def do_trades_pretraining(budget: Budget, p: int) -> None:
    if (CKPTS / "trades_branch.safetensors").is_file():
        return
    run = RUNS / "trades_pretrain"
    run_training(run, pretrain_cfg("trades"), budget, until=p)
    shutil.copy(RunDir(run).checkpoints().weights(p - 1), CKPTS / "trades_branch.safetensors")
    write_json(RESULTS / "trades_pretrain.json", {"rows": rows_of(run), "stopped_at": p})


def arm_cfg(arm: str, seed: int, lam: float | None):
    from clat.config import load_config

    branch, method, extra, _ = ARMS[arm]
    over = [f"init={CKPTS / f'{branch}_branch.safetensors'}", f"finetune.method={method}", f"seed={seed}",
            *(f"{k}={v}" for k, v in ARM_SETTINGS.items()), *extra]
    if branch == "trades":
        over.append("pretrain.method=trades")  # CLAT's base method (used only with clat.ce_on=base)
    if lam is not None:
        over.append(f"clat.lam={lam}")
    return load_config(PRETRAIN_CFG, [*EXTRA, *over])


# -- evaluation ----------------------------------------------------------------------------
def test_data():
    from clat.data import load_cifar

    return load_cifar(DATASET, DATA_ROOT, False, download=DOWNLOAD, verify=VERIFY)


def load_weights(path: Path):
    from clat.checkpoint import load_model

    model, _ = load_model(str(path), device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
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
        r = [evaluate(model, x[a:b], y[a:b], eps=THREAT.eps, alpha=THREAT.alpha, norm=THREAT.norm, steps=PGD["steps"], restarts=PGD["restarts"],
                      batch_size=500, seed=0, index_offset=a) for a, b in parts if b > a]
        n = sum(p["n"] for p in r)
        r = {"n": n, "clean_acc": sum(p["clean_correct"] for p in r) / n, "pgd_acc": sum(p["pgd_correct"] for p in r) / n,
             "pgd_acc_aa_images": r[0]["pgd_acc"], "n_aa_images": r[0]["n"], "attack": r[0]["attack"], "time_s": sum(p["time_s"] for p in r),
             "device": device_label()}
        write_json(pgd_file, r)
        log(f"{name}: clean {r['clean_acc']:.3f} PGD {r['pgd_acc']:.3f} ({r['time_s']:.0f} s)")
    chunks = []
    for i in range(0, N_TEST_AA, AA_CHUNK):
        f = out_dir / f"aa_{i:05d}.json"
        if not f.is_file():
            budget.check()
            r = autoattack(model, x[i : i + AA_CHUNK], y[i : i + AA_CHUNK], eps=THREAT.eps, norm=THREAT.norm, version="standard", batch_size=AA_CHUNK, seed=i)
            write_json(f, {**r, "device": device_label()})
            log(f"{name}: AutoAttack images {i}-{i + AA_CHUNK}: {r['robust_acc']:.3f} ({r['time_s']:.0f} s)")
        chunks.append(read_json(f))
    pgd = read_json(pgd_file)
    n = sum(c["n"] for c in chunks)
    return {
        "clean_acc": pgd["clean_acc"], "pgd20x5_acc": pgd["pgd_acc"], "n_pgd": pgd["n"], "pgd20x5_acc_aa_images": pgd["pgd_acc_aa_images"],
        "aa_acc": sum(c["robust_acc"] * c["n"] for c in chunks) / n, "aa_clean_acc": sum(c["clean_acc"] * c["n"] for c in chunks) / n,
        "n_aa": n, "aa_library": chunks[0]["library"], "aa_warnings": sorted({w for c in chunks for w in c["warnings"]}),
        "eval_time_s": pgd["time_s"] + sum(c["time_s"] for c in chunks),
        "eval_devices": sorted({c.get("device", LEGACY_DEVICE) for c in (pgd, *chunks)}),
    }


def do_reference(name: str, budget: Budget) -> None:
    """The branch checkpoints themselves, evaluated like the arms ("before")."""
    out = RESULTS / f"{name}_branch_eval.json"
    if out.is_file():
        return
    res = evaluate_weights(CKPTS / f"{name}_branch.safetensors", STUDY / "eval" / f"{name}_branch", budget, f"{name} branch")
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
    if arm == "clat" and seed == 0 and RunDir(RUNS / f"lam_{lam:g}").finished() and not run.exists():
        shutil.copytree(RUNS / f"lam_{lam:g}", run)  # the sweep's run with the chosen λ is this arm's seed-0 run
    run_training(run, arm_cfg(arm, seed, lam if arm in CLAT_ARMS else None), budget, keep_partial=True)
    # The trained weights go to study/partial/ before the evaluation and stay until the result is written: a
    # session that ends or is killed during it must not leave them only in runs/, which is not committed.
    # (The finished attack chunks are kept in study/eval/ as they are done.)
    if not RunDir(partial_dir(run)).finished():
        save_partial(run)
    res = evaluate_weights(RunDir(run).weights_path, STUDY / "eval" / run.name, budget, run.name)
    summary = RunDir(run).summary()
    rows = rows_of(run)
    write_json(out, {"arm": arm, "seed": seed, "label": ARMS[arm][3], "lam": lam if arm in CLAT_ARMS else None, "test": res,
                     "trainable_params": summary["trainable_params_last"], "total_params": summary["total_params"],
                     "train_time_s": summary["train_time_s"], "train_devices": train_devices(run),
                     "rows": rows, "selection_history": summary["selection_history"]})
    shutil.rmtree(partial_dir(run), ignore_errors=True)
    log(f"{arm} seed {seed}: done")


def supersede(items: list[str], why: str) -> None:
    """Set finished arm items aside to be redone: their result goes to study/superseded/ (with ``why``), their
    attack chunks and any saved run with it, so that the next run of the study trains and evaluates them again."""
    for item in items:
        res = RESULTS / f"{item}.json"
        if not res.is_file():
            raise SystemExit(f"study.py: --redo {item}: no finished item of that name in {_rel_study(RESULTS)} (names look like clat_s2)")
    dst = STUDY / "superseded"
    for item in items:
        d = read_json(RESULTS / f"{item}.json")
        write_json(dst / f"{item}.json", {**d, "superseded_because": why, "superseded_on": time.strftime("%Y-%m-%d")})
        (RESULTS / f"{item}.json").unlink()
        if (STUDY / "eval" / item).is_dir():
            shutil.rmtree(dst / "eval" / item, ignore_errors=True)
            (dst / "eval").mkdir(parents=True, exist_ok=True)
            shutil.move(str(STUDY / "eval" / item), str(dst / "eval" / item))
        shutil.rmtree(partial_dir(RUNS / item), ignore_errors=True)
        shutil.rmtree(RUNS / item, ignore_errors=True)
        log(f"{item}: set aside in {_rel_study(dst)} ({why}); the study redoes it")


def _rel_study(p: Path) -> str:
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def plan() -> list[tuple[str, bool]]:
    items = [(PILOT[0], (RESULTS / f"{PILOT[0]}.json").is_file())] if PILOT else []
    items += [("pgd_at_pretrain", (RESULTS / "branch.json").is_file()),
             ("trades_pretrain (to P)", (CKPTS / "trades_branch.safetensors").is_file()),
             ("lambda sweep", (RESULTS / "lambda.json").is_file()),
             ("eval pgd_at branch", (RESULTS / "pgd_at_branch_eval.json").is_file()),
             ("eval trades branch", (RESULTS / "trades_branch_eval.json").is_file())]
    items += [(f"{a} seed {s}", (RESULTS / f"{a}_s{s}.json").is_file()) for s in SEEDS for a in ARMS]
    return items


def run_all(budget: Budget, seeds: tuple[int, ...] | None = None, arms: list[str] | None = None) -> None:
    """Every work item in order. ``seeds``/``arms`` restrict the arm items to a subset: parallel workers (one
    per arm, say, on a GPU) each take their own; the shared items before them must be done already then."""
    b = do_pretraining(budget)
    do_trades_pretraining(budget, b["epoch"])
    lam = do_lambda_sweep(budget)
    do_reference("pgd_at", budget)
    do_reference("trades", budget)
    for seed in seeds or SEEDS:
        for arm in arms or ARMS:
            do_arm(arm, seed, lam, budget)
    if arms is None and seeds is None:
        do_pilot(budget)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hours", type=float, default=2.0, help="time budget of this session (default 2)")
    ap.add_argument("--plan", action="store_true", help="list the work items and their state")
    ap.add_argument("--report", action="store_true", help="only render docs/results.md")
    ap.add_argument("--scale", choices=sorted(PAPER_SCALE), help="the same study at paper scale on a GPU (configs/study/paper/)")
    ap.add_argument("--data-root", default=str(REPO / "data"), help="with --scale: where full CIFAR lives or is downloaded to")
    ap.add_argument("--smoke", metavar="DIR", help="the whole pipeline at toy size in DIR (a check of this script, ~2 min)")
    ap.add_argument("--seeds", type=int, nargs="+", metavar="N", help=f"run the arms with these seeds only (default {' '.join(map(str, SEEDS))})")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), metavar="ARM", help="run these arms only: " + ", ".join(ARMS))
    ap.add_argument("--no-report", action="store_true", help="do not render docs/results.md (parallel workers)")
    ap.add_argument("--check-shared", action="store_true", help="only check that the items all arms share are done (exit 1 if not)")
    ap.add_argument("--redo", nargs="+", metavar="ITEM", help="set these finished items aside (study/superseded/) and redo them, e.g. clat_s2")
    ap.add_argument("--why", help="with --redo: the reason, kept with the superseded result and shown in the report")
    args = ap.parse_args(argv)
    if args.redo and not args.why:
        ap.error("--redo needs --why: the report says why each superseded item was redone")
    if (args.seeds or args.arms) and not args.no_report:
        ap.error("--seeds/--arms start a worker on a subset of the items: add --no-report (render once, after all workers, with --report)")
    if args.seeds and min(args.seeds) < 0:
        ap.error("--seeds: seeds are non-negative integers")
    if args.scale:
        configure_paper(args.scale, Path(args.data_root).resolve())
    if args.smoke:
        configure_smoke(Path(args.smoke).resolve())
    sys.modules.setdefault("study", sys.modules[__name__])  # study_report reads this module's (possibly --smoke) settings
    if args.seeds or args.arms or args.check_shared:
        missing = [name for name, done in plan() if not done and " seed " not in name and name != (PILOT[0] if PILOT else None)]
        if missing:  # else every worker would run them itself, in the same folders
            print(f"study.py: the items all arms share are not done yet ({', '.join(missing)}): run `python scripts/study.py` "
                  "(without --seeds/--arms) until the arms start, then start the workers", file=sys.stderr)
            return 1
        if args.check_shared:
            return 0
    if args.redo:
        supersede(args.redo, args.why)
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
            run_all(Budget(args.hours), tuple(args.seeds) if args.seeds else None, args.arms)
            log("the study is complete" if not (args.seeds or args.arms) else "this worker's items are done")
        except OutOfTime:
            log(f"time budget used ({(time.time() - t0) / 3600:.2f} h): run the same command again to continue")
    if args.no_report:
        return 0
    from study_report import render

    render()
    done = sum(d for _, d in plan())
    log(f"{done}/{len(plan())} items done; report: {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
