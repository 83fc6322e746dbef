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
import threading
import time
from pathlib import Path

import torch

from clat.attacks.threat import ThreatModel
from clat.runs.folder import RunDir

# What a study is (its folders, seeds, epochs, attack sizes, the report's wording) is one StudySettings: the CPU
# study, a paper-scale preset (--scale), a variant (--variant) or the toy check (--smoke). Every function below that depends on it takes
# it as its first argument ``s``.
from study_settings import (ARMS, CLAT_ARMS, DEVICE_FILE, LEGACY_DEVICE, PAPER_SCALE, REPO, SCREEN_STAGES, TRADES_TRAIN_MODE, VARIANTS,
                            StudySettings, arm_items, best_row, branch_row, item_done, plan, read_json, reference_done, uses_trades)

# The threat model of every evaluation of the study (ℓ∞ 8/255, step 2/255: the paper's; the arms train under the same ε)
THREAT = ThreatModel()


class OutOfTime(Exception):
    pass


class PauseMeter:
    """Seconds this process did not run (stopped with SIGSTOP while timings or CI had the cores, or starved), told by a
    thread that wakes every second: a wake-up over ``GAP`` s late is time the process was stopped. The study records
    it beside each epoch and attack chunk and the report subtracts it from their wall times (their cost on this
    machine, undisturbed). Torch releases the GIL in its kernels, so a busy process still wakes the thread on time."""

    GAP = 30.0

    def __init__(self) -> None:
        self.stopped = 0.0
        self.running = False
        self.last: float | None = None

    def start(self) -> None:
        if not self.running:
            self.running = True
            threading.Thread(target=self._tick, daemon=True).start()

    def observe(self, now: float) -> None:
        """One wake-up of the thread at monotonic time ``now`` (it sleeps 1 s between wake-ups)."""
        if self.last is not None and now - self.last > self.GAP:
            self.stopped += now - self.last - 1.0
        self.last = now

    def _tick(self) -> None:
        while True:
            self.observe(time.monotonic())
            time.sleep(1.0)


PAUSES = PauseMeter()  # started by main(): the scripts that import this module measure nothing


def paused_since(mark: float) -> float:
    return round(PAUSES.stopped - mark, 1)


def pause_mark() -> float:
    return PAUSES.stopped


PAUSED_FILE = "study_paused.json"  # in a run folder: {epoch: seconds the process was stopped during it}


def train_paused_s(run: Path) -> float:
    return round(sum((read_json(run / PAUSED_FILE) or {}).values()), 1)


def log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_json(p: Path, obj) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(p)


def device_label() -> str:
    """Where this process trains and evaluates, as the study records it (seeds can run on different machines)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    n = torch.get_num_threads()
    return f"CPU ({n} thread{'s' if n > 1 else ''})"


def note_device(run: Path) -> None:
    f = run / DEVICE_FILE
    seen = (read_json(f) or {"train": []})["train"]
    if device_label() not in seen:
        write_json(f, {"train": [*seen, device_label()]})


def train_devices(run: Path) -> list[str]:
    d = read_json(run / DEVICE_FILE)
    return d["train"] if d else [LEGACY_DEVICE]


def rows_of(run: Path) -> list[dict]:
    from clat.runs.folder import RunDir

    return RunDir(run).metrics()


class Budget:
    def __init__(self, hours: float) -> None:
        self.deadline = time.time() + 3600 * hours

    def check(self) -> None:
        if time.time() > self.deadline:
            raise OutOfTime


# -- training in chunks --------------------------------------------------------------------
def partial_dir(s: StudySettings, run: Path) -> Path:
    """Where an unfinished item's run is kept across sessions (committed; runs/ is not)."""
    return s.study / "partial" / run.name


def save_partial(s: StudySettings, run: Path) -> None:
    """Keep an unfinished run across sessions (runs/ is not committed): its config, metrics, latest
    checkpoint and the weights of its best validation epoch go to study/partial/<run>/."""
    from clat.runs.folder import RunDir

    rows = rows_of(run)
    best = {best_row(rows)["epoch"]} if rows and "val" in rows[0] else set()
    dst = partial_dir(s, run)
    what = RunDir(run).export(dst, weights_of_epochs=best, extra=(DEVICE_FILE,))
    if what == "finished":
        log(f"{run.name}: trained weights kept in {dst.relative_to(s.study.parent)} until its evaluation is written")
    elif what:
        log(f"{run.name}: unfinished run saved to {dst.relative_to(s.study.parent)} (continues next session)")


def restore_partial(s: StudySettings, run: Path) -> None:
    src = partial_dir(s, run)
    if src.is_dir() and not run.exists():
        shutil.copytree(src, run)
        log(f"{run.name}: continuing the run saved in {src.relative_to(s.study.parent)}")


def run_training(s: StudySettings, run: Path, cfg, budget: Budget, until: int | None = None, keep_partial: bool = False) -> None:
    """Train ``cfg`` in ``run`` one epoch per call of clat.train, resuming, until done (or ``until``).
    When the budget ends first, the run is saved to study/partial/ for the next session. ``keep_partial``:
    leave a saved copy there (the caller drops it once the item is finished: an arm's evaluation follows)."""
    restore_partial(s, run)
    try:
        _train_epochs(run, cfg, budget, until)
    except OutOfTime:
        save_partial(s, run)
        raise
    if not keep_partial:
        shutil.rmtree(partial_dir(s, run), ignore_errors=True)


def prune_checkpoints(run: Path) -> None:
    """Keep the latest epoch checkpoint (to resume) and the one of the best validation epoch so far (a possible
    branch point); the others go. A WRN-34-10 checkpoint with its optimizer state is ~370 MB."""
    from clat.runs.folder import RunDir

    rows = rows_of(run)
    keep = {rows[-1]["epoch"]} if rows else set()  # epochs count from 1, as in metrics.jsonl
    if rows and "val" in rows[0]:
        keep.add(best_row(rows)["epoch"])
    RunDir(run).checkpoints().prune(keep=keep)


def _train_epochs(run: Path, cfg, budget: Budget, until: int | None) -> None:
    from clat.training.loop import train

    total = cfg.pretrain.epochs + cfg.finetune.epochs
    stop = min(until or total, total)
    while True:
        done = len(rows_of(run))
        finished = RunDir(run).finished()
        if finished or done >= stop:
            return
        budget.check()
        started = (run / "config.yaml").is_file()
        t0, mark = time.time(), pause_mark()
        note_device(run)
        if started:
            train(None, run, resume=True, until_epoch=done + 1)
        else:
            train(cfg, run, until_epoch=done + 1, force=True)
        if (paused := paused_since(mark)) > 0:
            write_json(run / PAUSED_FILE, {**(read_json(run / PAUSED_FILE) or {}), str(done + 1): paused})
        prune_checkpoints(run)
        log(f"{run.name}: epoch {done + 1}/{stop} in {time.time() - t0:.0f} s")


def pretrain_cfg(s: StudySettings, method: str = "pgd_at"):
    from clat.config.load import load_config

    return load_config(s.pretrain_cfg, [f"pretrain.method={method}", *s.extra, *([TRADES_TRAIN_MODE] if method == "trades" else [])])


def branch_point(s: StudySettings) -> dict | None:
    return read_json(s.results / "branch.json")


def do_pretraining(s: StudySettings, budget: Budget) -> dict:
    """PGD-AT for the whole schedule; P = the epoch of best validation PGD accuracy."""
    b = branch_point(s)
    if b is not None:
        return b
    run = s.runs / "pgd_at_pretrain"
    cfg = pretrain_cfg(s)
    run_training(s, run, cfg, budget)
    rows = rows_of(run)
    best = branch_row(s, rows)
    p = best["epoch"]
    s.ckpts.mkdir(parents=True, exist_ok=True)
    shutil.copy(RunDir(run).checkpoints().weights(epoch=p), s.ckpts / "pgd_at_branch.safetensors")
    write_json(s.results / "pgd_at_pretrain.json", {"config": str(s.pretrain_cfg.relative_to(REPO)), "rows": rows,
                                                   "summary": RunDir(run).summary(), "train_devices": train_devices(run)})
    rule = "epoch of the highest validation PGD-10 accuracy (earliest on ties)" if s.branch == "best" else "the last epoch"
    b = {"epoch": p, "val": best["val"], "rule": rule,
         "last_val": rows[-1]["val"], "epochs": len(rows)}
    write_json(s.results / "branch.json", b)
    log(f"branch point: epoch {p} (val PGD {best['val']['pgd_acc']:.3f}, last epoch {rows[-1]['val']['pgd_acc']:.3f})")
    return b


def do_pilot(s: StudySettings, budget: Budget) -> None:
    if s.pilot is None or (s.results / f"{s.pilot[0]}.json").is_file():
        return
    from clat.config.load import load_config

    run = s.runs / s.pilot[0]
    run_training(s, run, load_config(s.pilot[1], s.extra), budget)
    write_json(s.results / f"{s.pilot[0]}.json", {"config": str(s.pilot[1].relative_to(REPO)), "rows": rows_of(run),
                                                 "summary": RunDir(run).summary()})


def do_trades_pretraining(s: StudySettings, budget: Budget, p: int) -> None:
    if (s.ckpts / "trades_branch.safetensors").is_file():
        return
    run = s.runs / "trades_pretrain"
    run_training(s, run, pretrain_cfg(s, "trades"), budget, until=p)
    shutil.copy(RunDir(run).checkpoints().weights(epoch=p), s.ckpts / "trades_branch.safetensors")
    write_json(s.results / "trades_pretrain.json", {"rows": rows_of(run), "stopped_at": p})


def arm_cfg(s: StudySettings, arm: str, seed: int, lam: float | None):
    from clat.config.load import load_config, variant

    branch, method, extra, _ = ARMS[arm]
    over = [f"init={s.ckpts / f'{branch}_branch.safetensors'}", f"finetune.method={method}", f"seed={seed}",
            *(f"{k}={v}" for k, v in s.arm_settings.items()), *extra]
    if branch == "trades":
        over.append("pretrain.method=trades")  # CLAT's base method (used only with clat.ce_on=base)
    cfg = load_config(s.pretrain_cfg, [*s.extra, *over])
    # the swept λ as the number itself, not through text (a float like 1e-05 would not read back from YAML as one)
    return variant(cfg, {"clat.lam": lam}) if lam is not None and not own_lam(arm) else cfg


def own_lam(arm: str) -> float | None:
    """The fixed λ an arm sets itself (``clat.lam=...`` among its overrides), else None (it takes the swept λ)."""
    vals = [float(o.split("=", 1)[1]) for o in ARMS[arm][2] if o.startswith("clat.lam=")]
    return vals[-1] if vals else None


# -- evaluation ----------------------------------------------------------------------------
def test_data(s: StudySettings):
    from clat.data.loader import load_cifar

    return load_cifar(s.dataset, s.data_root, False, download=s.download, verify=s.verify)


def load_weights(path: Path):
    from clat.runs.loading import load_model

    model, _ = load_model(str(path), device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(memory_format=torch.channels_last).eval()


def _done(f: Path, records: bool) -> bool:
    """An evaluation part is done when its JSON is written, and its per-image records beside it where they are kept."""
    from clat.eval.records import record_path

    return f.is_file() and (not records or record_path(f).is_file())


def evaluate_weights(s: StudySettings, weights: Path, out_dir: Path, budget: Budget, name: str, *, records: bool = False,
                     stages: tuple[str, ...] | None = None) -> dict:
    """Clean + PGD-20 (worst of 5) on all test images, standard AutoAttack on the first 1,000 (in chunks): clat's
    evaluation protocol (:func:`clat.run_protocol`, what ``clat eval`` runs), in resumable parts. ``records``: keep each
    part's per-image outcomes beside its JSON (``pgd.records.npz``, ``aa_00000.records.npz``); ``stages``: run only these
    first stages of AutoAttack (a screening evaluation)."""
    from clat.runs.checkpoint import sha256
    from clat.eval.attacks import APGDCE, PGD, AutoAttack
    from clat.eval.protocol import EvalProtocol, run_protocol
    from clat.eval.records import EvalRecord, record_path, save_record

    x, y = test_data(s)
    model = load_weights(weights)
    meta = {"data": f"{s.dataset} ({Path(s.data_root).name})", "split": "test", "item": name, "weights_sha256": sha256(weights)}
    pgd_file = out_dir / "pgd.json"
    if not _done(pgd_file, records):
        budget.check()
        mark = pause_mark()
        # in two parts, so that PGD is also known on exactly the images AutoAttack sees
        parts = [(0, s.n_test_aa), (s.n_test_aa, s.n_test_pgd)]
        protocol = EvalProtocol(THREAT.replace(steps=s.pgd["steps"]), [PGD(s.pgd["restarts"])], batch_size=500, seed=0)
        results = [run_protocol(model, x[a:b], y[a:b], protocol, index_offset=a) for a, b in parts if b > a]
        r = [p.to_dict() for p in results]
        n = sum(p["n"] for p in r)
        r = {"n": n, "clean_acc": sum(p["clean_correct"] for p in r) / n, "pgd_acc": sum(p["pgd_correct"] for p in r) / n,
             "pgd_acc_aa_images": r[0]["pgd_acc"], "n_aa_images": r[0]["n"], "attack": r[0]["attack"],
             "time_s": sum(p["time_s"] for p in r), "paused_s": paused_since(mark),
             "device": device_label(), "records": records}
        if records:
            save_record(record_path(pgd_file), EvalRecord.concat([p.record(**meta) for p in results]))
        write_json(pgd_file, r)
        log(f"{name}: clean {r['clean_acc']:.3f} PGD {r['pgd_acc']:.3f} ({r['time_s']:.0f} s)")
    chunks = []
    for i in range(0, s.n_test_aa, s.aa_chunk):
        f = out_dir / f"aa_{i:05d}.json"
        if not _done(f, records):
            budget.check()
            mark = pause_mark()
            alone = s.aa_version == "apgd-ce"  # the smoke check's cheap stand-in (StudySettings.smoke)
            attack = APGDCE() if alone else AutoAttack(s.aa_version, stages)
            protocol = EvalProtocol(THREAT, [attack], batch_size=s.aa_chunk, seed=i)
            result = run_protocol(model, x[i : i + s.aa_chunk], y[i : i + s.aa_chunk], protocol, index_offset=i)
            r = result.to_dict()["apgd_ce" if alone else "autoattack"]
            if records:
                save_record(record_path(f), result.record(**meta))
            write_json(f, {**r, "paused_s": paused_since(mark), "device": device_label(), "records": records})
            log(f"{name}: AutoAttack images {i}-{i + s.aa_chunk}: {r['robust_acc']:.3f} ({r['time_s']:.0f} s)")
        chunks.append(read_json(f))
    pgd = read_json(pgd_file)
    n = sum(c["n"] for c in chunks)
    after = {a: sum(c["robust_acc_after"][a] * c["n"] for c in chunks) / n for a in chunks[0].get("robust_acc_after", {})}
    return {
        "clean_acc": pgd["clean_acc"], "pgd20x5_acc": pgd["pgd_acc"], "n_pgd": pgd["n"], "pgd20x5_acc_aa_images": pgd["pgd_acc_aa_images"],
        "aa_acc": sum(c["robust_acc"] * c["n"] for c in chunks) / n, "aa_clean_acc": sum(c["clean_acc"] * c["n"] for c in chunks) / n,
        "n_aa": n, "aa_library": chunks[0]["library"], "aa_warnings": sorted({w for c in chunks for w in c["warnings"]}),
        "aa_attacks": chunks[0].get("attacks"), "aa_acc_after": after,
        "eval_time_s": pgd["time_s"] + sum(c["time_s"] for c in chunks),
        "eval_paused_s": round(sum(c.get("paused_s", 0.0) for c in (pgd, *chunks)), 1),
        "eval_devices": sorted({c.get("device", LEGACY_DEVICE) for c in (pgd, *chunks)}),
        "records": records,
    }


def set_aside(s: StudySettings, result: Path, eval_dir: Path, why: str) -> None:
    """Move a finished result (and its attack chunks) to study/superseded/ with ``why``, so that it is redone."""
    dst = s.study / "superseded"
    d = read_json(result)
    write_json(dst / result.name, {**d, "superseded_because": why, "superseded_on": time.strftime("%Y-%m-%d")})
    result.unlink()
    if eval_dir.is_dir():
        shutil.rmtree(dst / "eval" / eval_dir.name, ignore_errors=True)
        (dst / "eval").mkdir(parents=True, exist_ok=True)
        shutil.move(str(eval_dir), str(dst / "eval" / eval_dir.name))
    log(f"{result.stem}: set aside in {_rel_study(dst)} ({why}); the study redoes it")


RECORDS_WHY = "re-run to keep per-image records and the final weights (issue 34); the first run kept neither"


def do_reference(s: StudySettings, name: str, budget: Budget) -> None:
    """The branch checkpoints themselves, evaluated like the arms ("before")."""
    out = s.results / f"{name}_branch_eval.json"
    records = name in s.record_refs
    if reference_done(s, name):
        return
    if out.is_file():
        set_aside(s, out, s.study / "eval" / f"{name}_branch", RECORDS_WHY)
    res = evaluate_weights(s, s.ckpts / f"{name}_branch.safetensors", s.study / "eval" / f"{name}_branch", budget, f"{name} branch",
                           records=records)
    write_json(out, res)


def keep_weights(src: Path, dst: Path) -> None:
    """An arm's final weights, kept in the study in float16 (half the size; enough to re-evaluate or probe the model)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={**meta, "study_copy": "float16 copy of the run's float32 final weights"})
    tmp.replace(dst)


# -- λ and the arms ------------------------------------------------------------------------
def chosen_lambda(s: StudySettings) -> float | None:
    d = read_json(s.results / "lambda.json")
    return None if d is None else d["chosen"]


def do_lambda_sweep(s: StudySettings, budget: Budget) -> float:
    lam = chosen_lambda(s)
    if lam is not None:
        return lam
    finals = {}
    for value in s.lambdas:
        run = s.runs / f"lam_{value:g}"
        run_training(s, run, arm_cfg(s, "clat", 0, value), budget)
        finals[value] = rows_of(run)[-1]["val"]
    best = max(s.lambdas, key=lambda v: (finals[v]["pgd_acc"], finals[v]["clean_acc"]))
    write_json(s.results / "lambda.json", {"chosen": best, "final_val": {f"{v:g}": finals[v] for v in s.lambdas}, "seed": 0,
                                           "rule": "highest final validation PGD-10 accuracy (clean accuracy breaks ties)"})
    log(f"λ = {best:g} ({ {f'{v:g}': round(finals[v]['pgd_acc'], 3) for v in s.lambdas} })")
    return best


def do_arm(s: StudySettings, arm: str, seed: int, lam: float, budget: Budget) -> None:
    out = s.results / f"{arm}_s{seed}.json"
    if item_done(s, arm, seed):
        return
    if out.is_file():  # a result of the first run, without the per-image records this arm needs now
        supersede(s, [f"{arm}_s{seed}"], RECORDS_WHY)
    run = s.runs / f"{arm}_s{seed}"
    if arm == "clat" and seed == 0 and RunDir(s.runs / f"lam_{lam:g}").finished() and not run.exists():
        shutil.copytree(s.runs / f"lam_{lam:g}", run)  # the sweep's run with the chosen λ is this arm's seed-0 run
    run_training(s, run, arm_cfg(s, arm, seed, lam if arm in CLAT_ARMS else None), budget, keep_partial=True)
    # The trained weights go to study/partial/ before the evaluation and stay until the result is written: a
    # session that ends or is killed during it must not leave them only in runs/, which is not committed.
    # (The finished attack chunks are kept in study/eval/ as they are done.)
    if not RunDir(partial_dir(s, run)).finished():
        save_partial(s, run)
    records = arm in s.record_arms
    weights = s.study / "weights" / f"{run.name}.safetensors"
    if records:
        keep_weights(RunDir(run).weights_path, weights)
    stages = SCREEN_STAGES if arm in s.screen_arms and s.aa_version == "standard" else None
    res = evaluate_weights(s, RunDir(run).weights_path, s.study / "eval" / run.name, budget, run.name, records=records, stages=stages)
    summary = RunDir(run).summary()
    rows = rows_of(run)
    lam_used = (own_lam(arm) if own_lam(arm) is not None else lam) if arm in CLAT_ARMS else None
    write_json(out, {"arm": arm, "seed": seed, "label": ARMS[arm][3], "lam": lam_used, "test": res,
                     "trainable_params": summary["trainable_params_last"], "total_params": summary["total_params"],
                     "train_time_s": summary["train_time_s"], "train_paused_s": train_paused_s(run), "train_devices": train_devices(run),
                     "rows": rows, "selection_history": summary["selection_history"], "records": records,
                     **({"weights": _rel_study(weights)} if records else {})})
    shutil.rmtree(partial_dir(s, run), ignore_errors=True)
    log(f"{arm} seed {seed}: done")


def supersede(s: StudySettings, items: list[str], why: str) -> None:
    """Set finished arm items aside to be redone: their result goes to study/superseded/ (with ``why``), their
    attack chunks and any saved run with it, so that the next run of the study trains and evaluates them again."""
    for item in items:
        res = s.results / f"{item}.json"
        if not res.is_file():
            raise SystemExit(f"study.py: --redo {item}: no finished item of that name in {_rel_study(s.results)} (names look like clat_s2)")
    for item in items:
        set_aside(s, s.results / f"{item}.json", s.study / "eval" / item, why)
        shutil.rmtree(partial_dir(s, s.runs / item), ignore_errors=True)
        shutil.rmtree(s.runs / item, ignore_errors=True)


def _rel_study(p: Path) -> str:
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def run_all(s: StudySettings, budget: Budget, seeds: tuple[int, ...] | None = None, arms: list[str] | None = None) -> None:
    """Every work item in order. ``seeds``/``arms`` restrict the arm items to a subset: parallel workers (one
    per arm, say, on a GPU) each take their own; the shared items before them must be done already then."""
    b = do_pretraining(s, budget)
    if uses_trades(s):
        do_trades_pretraining(s, budget, b["epoch"])
    lam = do_lambda_sweep(s, budget)
    do_reference(s, "pgd_at", budget)
    if uses_trades(s):
        do_reference(s, "trades", budget)
    items = arm_items(s)
    items += [(a, sd) for sd in seeds or () for a in s.arms if (a, sd) not in items]  # a worker's seeds beyond the plan
    for arm, seed in items:
        if (seeds is None or seed in seeds) and (arms is None or arm in arms):
            do_arm(s, arm, seed, lam, budget)
    if arms is None and seeds is None:
        do_pilot(s, budget)


def settings_of(args: argparse.Namespace) -> StudySettings:
    """The study the command line names: the CPU study, a paper-scale preset (--scale), either at toy size (--smoke)."""
    if args.scale and args.variant:
        raise SystemExit("study.py: --scale and --variant name two different studies: give one")
    s = (StudySettings.paper(args.scale, Path(args.data_root).resolve()) if args.scale else
         StudySettings.variant(args.variant) if args.variant else StudySettings.cpu())
    return StudySettings.smoke(Path(args.smoke).resolve(), base=s) if args.smoke else s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hours", type=float, default=2.0, help="time budget of this session (default 2)")
    ap.add_argument("--plan", action="store_true", help="list the work items and their state")
    ap.add_argument("--report", action="store_true", help="only render docs/results.md")
    ap.add_argument("--scale", choices=sorted(PAPER_SCALE), help="the same study at paper scale on a GPU (configs/study/paper/)")
    ap.add_argument("--variant", choices=sorted(VARIANTS), help="a variant of the CPU study: a second network or the overfitted start")
    ap.add_argument("--data-root", default=str(REPO / "data"), help="with --scale: where full CIFAR lives or is downloaded to")
    ap.add_argument("--smoke", metavar="DIR", help="the whole pipeline at toy size in DIR (a check of this script, ~2 min)")
    ap.add_argument("--seeds", type=int, nargs="+", metavar="N", help=f"run the arms with these seeds only (default "
                                                                      f"{' '.join(map(str, StudySettings.cpu().seeds))})")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), metavar="ARM", help="run these arms only: " + ", ".join(ARMS))
    ap.add_argument("--no-report", action="store_true", help="do not render docs/results.md (parallel workers)")
    ap.add_argument("--check-shared", action="store_true", help="only check that the items all arms share are done (exit 1 if not)")
    ap.add_argument("--redo", nargs="+", metavar="ITEM", help="set these finished items aside (study/superseded/) and redo them, e.g. "
                                                              "clat_s2")
    ap.add_argument("--why", help="with --redo: the reason, kept with the superseded result and shown in the report")
    args = ap.parse_args(argv)
    if args.redo and not args.why:
        ap.error("--redo needs --why: the report says why each superseded item was redone")
    if (args.seeds or args.arms) and not args.no_report:
        ap.error("--seeds/--arms start a worker on a subset of the items: add --no-report (render once, after all workers, with --report)")
    if args.seeds and min(args.seeds) < 0:
        ap.error("--seeds: seeds are non-negative integers")
    s = settings_of(args)
    if args.seeds or args.arms or args.check_shared:
        missing = [name for name, done in plan(s) if not done and " seed " not in name and name != (s.pilot[0] if s.pilot else None)]
        if missing:  # else every worker would run them itself, in the same folders
            print(f"study.py: the items all arms share are not done yet ({', '.join(missing)}): run `python scripts/study.py` "
                  "(without --seeds/--arms) until the arms start, then start the workers", file=sys.stderr)
            return 1
        if args.check_shared:
            return 0
    if args.redo:
        supersede(s, args.redo, args.why)
    if args.plan:
        for name, done in plan(s):
            print(f"[{'x' if done else ' '}] {name}")
        return 0
    if not args.report:
        import logging
        import warnings

        logging.basicConfig(level=logging.WARNING)
        warnings.filterwarnings("ignore", message=".*without checking their checksums.*")
        PAUSES.start()
        t0 = time.time()
        try:
            run_all(s, Budget(args.hours), tuple(args.seeds) if args.seeds else None, args.arms)
            log("the study is complete" if not (args.seeds or args.arms) else "this worker's items are done")
        except OutOfTime:
            log(f"time budget used ({(time.time() - t0) / 3600:.2f} h): run the same command again to continue")
    if args.no_report:
        return 0
    from study_report import render

    render(s)
    done = sum(d for _, d in plan(s))
    log(f"{done}/{len(plan(s))} items done; report: {s.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
