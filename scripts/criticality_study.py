"""Which layers should CLAT train? The layer oracle on two architectures, and the criticality
estimators scored against it (docs/criticality.md), with one command.

    python scripts/criticality_study.py --hours 2    # continue: vgg11_w16's pretraining, then the sweeps
    python scripts/criticality_study.py --report     # only render docs/criticality.md from study/criticality/

Design: from a PGD-AT checkpoint at its best validation epoch (the study's branch point), every
eligible layer is fine-tuned alone for 5 epochs with the CLAT objective and automatic λ (the same
balance of CE and feature term whatever the layer), seeds 0-2, and measured on the 1,000 held-out
validation images under PGD-20; 5 epochs of full-model PGD-AT from the same checkpoint are the
reference (`clat layer-sweep`, src/clat/analysis/oracle.py). Two architectures: the study's ResNet-18 at 1/4
width (its branch checkpoint, study/checkpoints/pgd_at_branch.safetensors) and VGG-11 at 1/4 width,
a plain chain, pretrained by the same recipe (configs/study/vgg11_w16_pretrain.yaml). A third sweep starts the
ResNet from its last pretraining epoch, after robust overfitting (the start of the study's resnet18_w16_last variant),
with a fixed λ = 0.1 instead of automatic λ: which layer repairs overfitting. Everything
finished is kept in study/criticality/ (committed), so a fresh clone continues where a session stopped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
OUT = REPO / "study" / "criticality"
DOC = REPO / "docs" / "criticality.md"
IMG = REPO / "docs" / "img"
DATA_ROOT = REPO.parent / "shared" / "data"
FINETUNE = ["pretrain.epochs=0", "finetune.epochs=5", "finetune.lr=0.01", "finetune.schedule=cosine", f"data.root={DATA_ROOT}"]
SWEEPS = {
    "resnet18_w16": {"config": REPO / "configs" / "study" / "pgd_at_pretrain.yaml",
                     "init": REPO / "study" / "checkpoints" / "pgd_at_branch.safetensors",
                     "title": "ResNet-18 at 1/4 width (the study's branch checkpoint)"},
    "vgg11_w16": {"config": REPO / "configs" / "study" / "vgg11_w16_pretrain.yaml", "init": OUT / "vgg11_w16_branch.safetensors",
                  "title": "VGG-11 at 1/4 width (a chain), pretrained by the study's recipe", "pretrain": True},
    # issue 34: from the last pretraining epoch, after robust overfitting (the start of `study.py --variant resnet18_w16_last`,
    # which writes this checkpoint), with a fixed λ (the CPU study's, 0.1): which layer repairs overfitting, each at the
    # same feature weight, rather than which hurts least
    "resnet18_w16_last": {"config": REPO / "configs" / "study" / "pgd_at_pretrain.yaml",
                          "init": REPO / "study" / "variants" / "resnet18_w16_last" / "checkpoints" / "pgd_at_branch.safetensors",
                          "title": "ResNet-18 at 1/4 width from its last pretraining epoch (after overfitting), fixed λ = 0.1",
                          "lam": 0.1, "waits_for": "python scripts/study.py --variant resnet18_w16_last"},
}


def settings(spec: dict | None = None):
    """The sweep's settings: automatic λ (the same balance of CE and feature term whatever the layer), or the fixed λ a
    sweep names."""
    from clat.analysis.oracle import SweepSettings

    lam = (spec or {}).get("lam")
    return SweepSettings(epochs=5, seeds=[0, 1, 2], lam_mode="auto" if lam is None else "fixed", lam=lam, val_steps=20)


def pretrain(name: str, budget) -> None:
    """PGD-AT by the study's recipe; the checkpoint of the best validation epoch becomes the sweep's start."""
    import study
    from clat.config.load import load_config
    from clat.runs.folder import RunDir

    spec = SWEEPS[name]
    if Path(spec["init"]).is_file():
        return
    s = study.StudySettings.cpu()  # its runs/ and its study/partial/ for a pretraining cut short
    run = s.runs / f"{name}_pretrain"
    study.run_training(s, run, load_config(spec["config"], [f"data.root={DATA_ROOT}"]), budget)
    rows = study.rows_of(run)
    best = study.best_row(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.copy(RunDir(run).checkpoints().weights(epoch=best["epoch"]), spec["init"])
    (OUT / f"{name}_pretrain.json").write_text(json.dumps({"config": str(spec["config"].relative_to(REPO)), "rows": rows,
                                                            "branch_epoch": best["epoch"], "branch_val": best["val"]}, indent=1))
    print(f"{name}: pretrained, best validation epoch {best['epoch']} (PGD {best['val']['pgd_acc']:.3f})", flush=True)


def run_all(hours: float) -> None:
    import study
    from clat.config.load import load_config
    from clat.analysis.oracle import layer_sweep

    t_end = time.time() + 3600 * hours
    budget = study.Budget(hours)
    for name, spec in SWEEPS.items():
        if spec.get("pretrain"):
            try:
                pretrain(name, budget)
            except study.OutOfTime:
                print("time budget used during the pretraining: run the same command again to continue", flush=True)
                return
        left = (t_end - time.time()) / 3600
        if left <= 0:
            print("time budget used: run the same command again to continue", flush=True)
            return
        if not Path(spec["init"]).is_file():
            init = Path(spec["init"])
            print(f"{name}: waits for its start, {init.relative_to(REPO) if init.is_relative_to(REPO) else init} (`{spec['waits_for']}` "
                  "writes it)", flush=True)
            continue
        cfg = load_config(spec["config"], [*FINETUNE, f"init={spec['init']}"])
        res = layer_sweep(cfg, OUT / name, settings(spec), hours=left, log=lambda m,
                          n=name: print(f"[{n} {time.strftime('%H:%M:%S')}] {m}", flush=True))
        if res["done"] < res["total"]:
            return


def without_first_layer() -> list[str]:
    """A robustness check of the scores: the first layer reads the image, so Eq. 6 gives it C = W (a weakness, not a
    ratio of weaknesses, on another scale) and every Eq. 6 variant ranks it last; where the oracle also ranks it
    last, that one layer alone lifts ρ. Here each estimator is scored again without it."""
    from clat.criticality.estimators import LABELS, score
    from clat.analysis.oracle import load, oracle

    done = [n for n in SWEEPS if (OUT / n / "sweep.json").is_file()]
    L = ["## Without the first layer", "",
         "The first layer reads the image, so Eq. 6 gives it C = W (a weakness, not a ratio of weaknesses, on another scale): every "
         "Eq. 6 variant ranks it last whatever the network. Where the oracle also ranks it last, that one layer lifts ρ. Here the "
         "estimators are scored again on the other layers only (same bootstrap).", "",
         "| estimator | " + " | ".join(f"ρ {n} (95% CI)" for n in done) + " |", "|---|" + "---|" * len(done)]
    rows: dict[str, list[str]] = {}
    for name in done:
        sw = load(OUT / name)
        gains = oracle(sw)
        idx = sorted(gains)[1:]  # layer 0 reads the image in both networks
        est = (sw["estimators"] or {}).get("scores", {})
        for key in ["paper", "input", "exact_eq5", "fisher", "rift", "params", "depth"]:
            if key in est and len(idx) >= 3:
                r = score([est[key][i] for i in idx], [gains[i] for i in idx])
                rows.setdefault(key, []).append(f"{r['rho']:+.2f} [{r['rho_ci'][0]:+.2f}, {r['rho_ci'][1]:+.2f}]")
    for key, cells in rows.items():
        L.append(f"| {LABELS[key]} | " + " | ".join(cells) + " |")
    return L + [""]


def render() -> None:
    from clat.analysis.oracle import load, render as render_sweep

    IMG.mkdir(parents=True, exist_ok=True)
    L = ["# Which layers should CLAT train? The criticality index against the truth", "",
         "<!-- generated by scripts/criticality_study.py from study/criticality/; do not edit by hand -->", ""]
    L += [line.strip() for line in __doc__.split("Design:")[1].split("\n\n")[0].splitlines()]
    L += [""]
    for name, spec in SWEEPS.items():
        out = OUT / name
        L += [f"## {spec['title']}", ""]
        if not (out / "sweep.json").is_file():
            L += ["Not run yet." + (f" It starts from the checkpoint `{spec['waits_for']}` writes." if "waits_for" in spec else ""), ""]
            continue
        sw = load(out)
        total = len(sw["meta"]["settings"]["seeds"]) * (sum(l["eligible"] for l in sw["meta"]["layers"]) + 1)
        n_items = sum(len(v) for v in sw["by_layer"].values()) + len(sw["reference"])
        report = render_sweep(out, spec["title"])
        shutil.copy(out / "oracle.png", IMG / f"criticality_{name}.png") if (out / "oracle.png").is_file() else None
        body = report.read_text().split("\n", 2)[2].replace("![oracle](oracle.png)", f"![oracle](img/criticality_{name}.png)")
        L += [f"**{n_items} of {total} items done.**", "", body, ""]
    L += without_first_layer()
    conclusions = OUT / "conclusions.md"
    L += ["## What the oracle says", "", conclusions.read_text().strip() if conclusions.is_file() else
          "Not drawn yet: the sweeps are incomplete.", ""]
    L += ["## Reproduce", "",
          "<!-- doc-test: skip a repository script that runs for hours: about 90 sweep items of 1.5-2 minutes each on 2 CPU cores -->",
          "```bash", "python scripts/criticality_study.py --hours 2   # repeat until every sweep is done", "```", "",
          "One sweep item (5 epochs of one layer, then PGD-20 on 1,000 validation images) takes 1.5-2 minutes on 2 CPU cores.", ""]
    DOC.write_text("\n".join(L))
    print(f"-> {DOC}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hours", type=float, default=2.0)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args(argv)
    if not args.report:
        import logging
        import warnings

        logging.basicConfig(level=logging.WARNING)
        warnings.filterwarnings("ignore", message=".*without checking their checksums.*")
        run_all(args.hours)
    render()
    return 0


if __name__ == "__main__":
    sys.exit(main())
