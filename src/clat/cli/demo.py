"""``clat demo``: the whole CLAT story on a CPU in a few minutes, offline.

On the CIFAR-10 subset bundled with the package (real images, JPEG-recovered):

1. adversarial pretraining of a narrow VGG-11 (``vgg11_w16``) with PGD-AT,
2. the criticality table of the pretrained model,
3. two equal-length continuations from that checkpoint: CLAT (only the critical
   layers train) and, as the control, PGD-AT on the full model,
4. clean and PGD-10 accuracy on the bundled test images before and after,
5. a markdown report with plots in the output folder.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from clat.analysis.plots import plot_criticality, plot_curves
from clat.analysis.report import criticality_rows, markdown_table, read_run, run_report, selection_history
from clat.attacks.threat import ThreatModel
from clat.base.errors import ConfigError
from clat.config.load import variant
from clat.criticality.index import compute_criticality
from clat.data.loader import to_unit_float
from clat.data.prepare import prepare_data
from clat.eval.accuracy import evaluate
from clat.layers.discovery import find_layers
from clat.runs.folder import RunDir
from clat.runs.loading import load_model
from clat.training.loop import train


@dataclass(frozen=True)
class DemoSettings:
    # VGG-11 at 1/4 width: a plain chain of 11 layers where picking one matters (the layer oracle found single
    # layers that gain on it, and Eq. 6 ranking them well: docs/criticality.md), as fast on a CPU as small_cnn
    model: str = "vgg11_w16"
    pretrain_epochs: int = 10
    finetune_epochs: int = 4
    train_size: int = 3000  # all bundled training images; 500 are held out for validation
    val_size: int = 500
    attack_steps: int = 3  # training attack: PGD-3 with step 3/255 (ε = 8/255); evaluation uses PGD-10
    attack_alpha: float = 3 / 255
    pretrain_lr: float = 0.05
    finetune_lr: float = 0.01
    lam: float = 0.1  # the default, chosen by the λ sweep (docs/lambda_sweep.md); 0.01 behaves like λ = 0 there
    reselect_every: int = 2
    test_size: int = 1000
    eval_steps: int = 10
    val_steps: int = 5  # per-epoch held-out PGD (curves only; the test table uses eval_steps)
    val_examples: int = 250  # of the held-out images, evaluated each epoch


FAST = DemoSettings(model="tiny_cnn", pretrain_epochs=1, finetune_epochs=2, train_size=1000, val_size=200, test_size=200, eval_steps=3,
                    reselect_every=1)


def _base_values(s: DemoSettings, progress: bool) -> dict:
    """The config values every run of the demo shares (typed values: :func:`clat.config.load.variant`)."""
    return {
        "data.dataset": "bundled", "model.name": s.model, "data.train_size": s.train_size, "data.val_size": s.val_size,
        "data.test_size": s.test_size, "attack.steps": s.attack_steps, "attack.alpha": s.attack_alpha,
        "eval.n_examples": min(s.val_examples, s.val_size), "eval.steps": s.val_steps, "progress": progress, "seed": 0,
        "channels_last": True,  # 1.4x faster steps for this CNN on a 2-core CPU (measured)
    }


DEMO_FILES = ("pretrain", "clat", "pgd_at_continued", "criticality.json", "criticality.png", "results.json", "report.md",
              "curves_clat.png", "curves_pgd_at.png")


def _legacy_demo(out: Path) -> bool:
    """A demo folder written by clat 0.1 (no manifest): its report and run folders are clat's."""
    rep = out / "report.md"
    runs = [out / d for d in ("pretrain", "clat", "pgd_at_continued") if (out / d).exists()]
    return (not RunDir(out).has_manifest() and rep.is_file() and rep.read_text(errors="replace").startswith("# clat demo")
            and all(RunDir(r).is_legacy_run() or RunDir(r).has_manifest() for r in runs))


def run_demo(out: str | Path = "runs/demo", *, force: bool = False, fast: bool = False, progress: bool = True) -> Path:
    """The demo in ``out``. A folder may hold other files: they are never touched. A previous demo there is
    replaced only with ``force``, and then only the files clat wrote (its manifest) are removed; a folder that
    another command made (a training run) is never replaced, ``force`` or not."""
    s = FAST if fast else DemoSettings()
    out = Path(out)
    rd = RunDir(out)
    with rd.lock("demo"):
        _make_room(rd, force)
        out.mkdir(parents=True, exist_ok=True)
        rd.record(*DEMO_FILES, made_by="demo")
        return _run_demo(out, s, progress)


def _make_room(rd: RunDir, force: bool) -> None:
    """Check that the demo may write into ``rd`` and, with ``force``, remove a previous demo's files (only those)."""
    out = rd.path
    maker = rd.made_by()
    if rd.holds_run() or maker not in (None, "demo"):
        raise ConfigError(f"{out} holds {rd.describe()}; clat demo never replaces it{', --force or not' if force else ''}: "
                          "choose another --out")
    present = [n for n in DEMO_FILES if (out / n).exists()]
    if not present:
        return
    legacy = maker is None and _legacy_demo(out)
    mine = set(DEMO_FILES) if legacy else {p.name for p in rd.removable()} if maker == "demo" else set()
    foreign = [n for n in present if n not in mine]
    if foreign:
        what = "a demo with files of your own" if mine else rd.describe()
        raise ConfigError(f"{out} holds {', '.join(foreign)} that clat did not write ({what}); "
                          "clat demo never replaces them, --force or not: move them, or choose another --out")
    if not force:
        raise ConfigError(f"{out} already holds a demo (made by `clat demo`); pass --force to replace it (only the files the demo wrote "
                          "are removed) or choose another --out")
    for n in present:
        p = out / n
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    rd.clear()


def _n(n: int, word: str) -> str:
    """``1 epoch``, ``2 epochs``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def _run_demo(out: Path, s: DemoSettings, progress: bool) -> Path:
    t0 = time.time()
    base = _base_values(s, progress)

    # 1. adversarial pretraining
    cfg = variant(None, {**base, "pretrain.method": "pgd_at", "pretrain.epochs": s.pretrain_epochs, "pretrain.lr": s.pretrain_lr,
                         "finetune.epochs": 0})
    train(cfg, out / "pretrain")
    t_pre = time.time() - t0
    ckpt = out / "pretrain" / "model.safetensors"

    # 2. criticality of the pretrained model, on 100 training images
    splits = prepare_data(cfg)
    model, _ = load_model(ckpt)
    layers = find_layers(model)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(splits.x_train), generator=g)[:100]
    crit = compute_criticality(model, layers, to_unit_float(splits.x_train[idx]), splits.y_train[idx], cfg.attack.threat())
    crit_data = crit.to_dict(1)
    (out / "criticality.json").write_text(json.dumps(crit_data, indent=2))
    plot_criticality(crit_data, out / "criticality.png", f"Criticality after PGD-AT pretraining ({s.model}, 100 images)")

    # 3. equal-length continuations: CLAT vs PGD-AT (full model)
    arms = {
        "clat": {"finetune.method": "clat", "clat.lam": s.lam, "clat.reselect_every": s.reselect_every},
        "pgd_at_continued": {"finetune.method": "pgd_at"},
    }
    for arm, extra in arms.items():
        c = variant(None, {**base, "pretrain.epochs": 0, "finetune.epochs": s.finetune_epochs, "finetune.lr": s.finetune_lr,
                           "init": str(ckpt), **extra})
        train(c, out / arm)

    # 4. test-set evaluation before / after
    results = {}
    for name, path in [("pretrained (PGD-AT)", ckpt), ("+ CLAT", out / "clat" / "model.safetensors"),
                       ("+ PGD-AT continued", out / "pgd_at_continued" / "model.safetensors")]:
        m, _ = load_model(path)
        torch.manual_seed(0)
        r = evaluate(m, splits.x_test, splits.y_test, ThreatModel(steps=s.eval_steps), batch_size=250, progress=progress, desc=name)
        results[name] = r
    (out / "results.json").write_text(json.dumps(results, indent=2))
    for d in ("pretrain", "clat", "pgd_at_continued"):
        run_report(out / d)
    total = time.time() - t0
    return _write_report(out, s, crit_data, results, total, t_pre, splits.name)


def _verdict(results: dict, s: DemoSettings) -> str:
    """What the table shows, in words, with the noise it carries."""

    cl, ctl = results["+ CLAT"], results["+ PGD-AT continued"]
    d_clean, d_pgd = 100 * (cl["clean_acc"] - ctl["clean_acc"]), 100 * (cl["pgd_acc"] - ctl["pgd_acc"])
    p, n = ctl["pgd_acc"], ctl["n"]
    se = 100 * math.sqrt(max(p * (1 - p), 1e-12) / n)
    return (f"CLAT minus PGD-AT continued: {d_clean:+.1f} clean and {d_pgd:+.1f} PGD-{s.eval_steps} points on {n} test images, from "
            f"one seed (the standard error of one accuracy here is about ±{se:.1f} points). So this demo shows the mechanics (which "
            "layer CLAT picks, how few parameters it trains, what it costs), not whether CLAT helps: the controlled study "
            "(docs/results.md, 4 seeds, AutoAttack) and the layer oracle (docs/criticality.md) answer that.")


def _write_report(out: Path, s: DemoSettings, crit: dict, results: dict, total: float, t_pre: float, data_name: str) -> Path:
    pre, cl, ctl = read_run(out / "pretrain"), read_run(out / "clat"), read_run(out / "pgd_at_continued")
    # one curve per arm: pretraining followed by each continuation
    off = len(pre["rows"])
    rows_clat = pre["rows"] + [{**r, "epoch": r["epoch"] + off} for r in cl["rows"]]
    plot_curves(rows_clat, out / "curves_clat.png", "PGD-AT pretraining, then CLAT (held-out split)")
    rows_ctl = pre["rows"] + [{**r, "epoch": r["epoch"] + off} for r in ctl["rows"]]
    plot_curves(rows_ctl, out / "curves_pgd_at.png", "PGD-AT pretraining, then PGD-AT continued (held-out split)")
    total_params = cl["rows"][-1]["total_params"]
    train_time = {
        "+ CLAT": sum(r["epoch_time_s"] for r in cl["rows"]),
        "+ PGD-AT continued": sum(r["epoch_time_s"] for r in ctl["rows"]),
    }
    trainable = {
        "pretrained (PGD-AT)": pre["rows"][-1]["trainable_params"],
        "+ CLAT": max(r["trainable_params"] for r in cl["rows"]),
        "+ PGD-AT continued": ctl["rows"][-1]["trainable_params"],
    }
    table = [
        [
            name, f"{100 * r['clean_acc']:.1f}", f"{100 * r['pgd_acc']:.1f}", f"{trainable[name]:,} "
                                                                              f"({100 * trainable[name] / total_params:.1f}%)",
            f"{train_time[name]:.1f}" if name in train_time else "",
        ]
        for name, r in results.items()
    ]
    h, crows = criticality_rows(crit)
    sel = selection_history(cl["summary"], cl["rows"])
    lines = [
        "# clat demo",
        "",
        f"Data: {data_name}: {s.train_size - s.val_size} training images, {s.val_size} held out (per-epoch metrics on "
        f"{min(s.val_examples, s.val_size)} of them, PGD-{s.val_steps}), "
        f"{s.test_size} test images for the table below. Model `{s.model}` ({total_params:,} parameters).",
        f"Pretraining: PGD-AT for {_n(s.pretrain_epochs, 'epoch')} (PGD-{s.attack_steps}, ε = 8/255, step {s.attack_alpha * 255:.0f}/255). "
        f"Then {_n(s.finetune_epochs, 'epoch')} of CLAT (k = 1, λ = {s.lam}, re-selection every {_n(s.reselect_every, 'epoch')}) or, as "
        f"the "
        f"control, {_n(s.finetune_epochs, 'more epoch')} of PGD-AT on the full model; both with lr {s.finetune_lr}, cosine.",
        "",
        f"## Test accuracy (PGD-{s.eval_steps}, ε = 8/255, step 2/255)",
        "",
        markdown_table(["model", "clean (%)", f"PGD-{s.eval_steps} (%)", "trainable params", "fine-tuning time (s)"], table),
        "",
        f"Total demo time: {total:.0f} s (pretraining {t_pre:.0f} s) on {_n(torch.get_num_threads(), 'CPU thread')}.",
        "",
        _verdict(results, s),
        "",
        "## Criticality of the pretrained model",
        "",
        "![criticality](criticality.png)",
        "",
        markdown_table(h, crows),
        "",
        "## CLAT's critical layers over time",
        "",
        markdown_table(["epoch", "selected", "trainable params"],
                       [[e.epoch, ", ".join(e.selected), f"{e.trainable_params:,}"] for e in sel]),
        "",
        "## Training curves",
        "",
        "![CLAT](curves_clat.png)",
        "",
        "![PGD-AT](curves_pgd_at.png)",
        "",
        "Run folders: `pretrain/`, `clat/`, `pgd_at_continued/` (each with config.yaml, metrics.jsonl, checkpoints, report.md).",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
