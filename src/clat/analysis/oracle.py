"""The layer oracle (``clat layer-sweep``): fine-tune each eligible layer alone, measure what it buys.

CLAT's claim (Proposition 3.2) is that the layers with the largest criticality index are the ones
whose fine-tuning makes a model most robust. The sweep measures the truth directly: from one
checkpoint, every eligible layer is fine-tuned alone (k = 1, pinned, CLAT's objective with the given
λ or ``lam_mode=auto``; or, with ``objective="pgd_at"``, the PGD-AT loss on that layer) for E epochs
with each of S seeds, and the validation split's clean and PGD accuracy are measured (PGD-20 by
default, the same seeded starts for every item, so differences are paired). The same budget spent on
full-model PGD-AT gives the reference line, and the checkpoint itself the starting point.

Every (layer, seed) item is one JSON file in ``OUT/items/``; a sweep stopped by its time budget (or
killed) continues where it stopped, an unfinished item from its last epoch checkpoint. The training
runs live in ``OUT/runs/`` (not needed once an item's JSON is written). ``OUT/estimators.json`` holds
the scores of :mod:`clat.criticality.estimators` on the checkpoint
(and of any other selector named in ``SweepSettings.estimators``), and :func:`render` writes ``OUT/report.md``
with the oracle table, the estimators' ρ and regrets, and a bar plot.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import fmean, stdev
from typing import Literal

import numpy as np
import torch

from clat.analysis.plots import figure, save_figure
from clat.analysis.report import markdown_table
from clat.base.distributed import resolve_device
from clat.base.errors import ConfigError
from clat.config.load import config_from_dict
from clat.config.schema import Config, to_dict
from clat.criticality.estimators import ESTIMATORS, LABELS, compute_estimates, score
from clat.criticality.index import eligible_mask
from clat.criticality.selectors import SELECTORS, label
from clat.data.loader import to_unit_float
from clat.data.prepare import prepare_data
from clat.eval.accuracy import evaluate_outcomes
from clat.eval.records import EvalRecord, record_path, save_record
from clat.runs.checkpoint import atomic_write_text, load_into, read_state_dict, sha256
from clat.runs.folder import RunDir
from clat.training.loop import train
from clat.training.warmstart import build_model, run_layers

Objective = Literal["clat", "pgd_at"]


@dataclass
class SweepSettings:
    epochs: int = 5
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    objective: Objective = "clat"
    lam: float | None = None  # fixed λ (default: the config's clat.lam); ignored with lam_mode=auto
    lam_mode: Literal["fixed", "auto"] = "fixed"
    val_steps: int = 20  # PGD steps of the validation measurement (ε and step from the config's threat model)
    n_val: int | None = None  # validation images measured (default: the whole validation split)
    layers: list[int] | None = None  # a subset of layer indices (default: every eligible layer)
    estimator_images: int = 500  # training images the estimators are computed on
    reference: bool = True  # full-model PGD-AT with the same budget, every seed
    estimators: list[str] = field(default_factory=list)  # selectors scored besides ESTIMATORS (`clat list selectors`)


def _json(p: Path):
    return json.loads(p.read_text()) if p.is_file() else None


def _write(p: Path, obj) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, json.dumps(obj, indent=1))


class OutOfTime(Exception):
    pass


def _item_cfg(base: Config, s: SweepSettings, layer: int | None, seed: int) -> Config:
    d = to_dict(base)
    d["pretrain"]["epochs"] = 0
    d["finetune"]["epochs"] = s.epochs
    d["seed"] = seed
    d["eval"]["n_examples"] = 0  # the item is measured once, at its end, with PGD-{val_steps}
    d["progress"] = False
    d["keep_checkpoints"] = 1
    if layer is None:  # the reference: full-model PGD-AT
        d["finetune"]["method"] = "pgd_at"
    else:
        d["finetune"]["method"] = "clat"
        c = d["clat"]
        c.update({"layers": [layer], "dynamic": False, "k": 1})
        if s.objective == "pgd_at":  # PGD-AT's loss on that layer alone: CLAT's base loss, no feature term
            c.update({"ce_on": "base", "base": "pgd_at", "lam": 0.0, "lam_mode": "fixed"})
        else:
            c["lam_mode"] = s.lam_mode
            if s.lam is not None:
                c["lam"] = s.lam
    return config_from_dict(d)


def _measure(model, splits, cfg: Config, s: SweepSettings, record: Path | None = None, **meta) -> dict:
    """Clean and PGD-{val_steps} accuracy on the validation split; ``record``: where to keep the per-image outcomes
    (:mod:`clat.records`, keyed by the images' positions in the validation split), written before the caller's JSON."""

    n = len(splits.x_val) if s.n_val is None else min(s.n_val, len(splits.x_val))
    if n == 0:
        raise ConfigError("the layer sweep measures on the validation split, but it is empty: set data.val_size > 0")
    threat = cfg.attack.threat()
    r, outcomes = evaluate_outcomes(model, splits.x_val[:n], splits.y_val[:n], threat.replace(alpha=threat.eps / 4, steps=s.val_steps),
                                    batch_size=cfg.data.eval_batch_size, seed=0)
    if record is not None:
        record.parent.mkdir(parents=True, exist_ok=True)
        data = {"data": f"{cfg.data.dataset} ({Path(cfg.data.root).name})", "split": "val", "split_seed": cfg.data.split_seed}
        save_record(record, EvalRecord(np.arange(n), {k: v.numpy() for k, v in outcomes.items()},
                                       {"protocol": r["attack"], **data, **meta}))
    return {"n": n, "clean_acc": r["clean_acc"], "pgd_acc": r["pgd_acc"], "attack": r["attack"]}


def layer_sweep(base: Config, out: str | Path, settings: SweepSettings, *, hours: float | None = None, log=print) -> dict:
    """Run (or continue) the sweep of ``base`` (a config whose ``init`` is the checkpoint) into ``out``.
    Returns ``{"done": n, "total": m}``; raises nothing when the time budget ends (the next call continues)."""

    out = Path(out)
    if not base.init:
        raise ConfigError("the layer sweep starts from a checkpoint: give init=PATH (weights to fine-tune)")
    if settings.epochs < 1 or not settings.seeds or settings.val_steps < 1:
        raise ConfigError("the layer sweep needs epochs >= 1, at least one seed and val_steps >= 1")
    deadline = time.time() + 3600 * hours if hours else None
    device = resolve_device(base.device)
    splits = prepare_data(base)
    model = build_model(base, splits.num_classes, device)
    layers = run_layers(model, base, splits.x_train[:2].to(device))
    eligible = [l.index for l, ok in zip(layers, eligible_mask(layers, include_classifier=base.clat.criticality.include_classifier)) if ok]
    chosen = settings.layers if settings.layers is not None else eligible
    bad = [i for i in chosen if i not in eligible]
    if bad:
        raise ConfigError(f"layers {bad} are not eligible for selection (eligible: {eligible})")

    names = [*ESTIMATORS, *(n for n in settings.estimators if n not in ESTIMATORS)]
    for n in names:
        SELECTORS.entry(n)  # a typo stops here, before anything is trained
    recorded = {k: v for k, v in asdict(settings).items() if k != "estimators" or v}  # a sweep of clat 0.2 records none
    meta = {"settings": recorded, "init": _shown(base.init), "init_sha256": sha256(base.init), "config": _cfg_dict(base),
            "layers": [{"index": l.index, "name": l.name, "params": l.num_params, "eligible": l.index in eligible} for l in layers]}
    old = _json(out / "sweep.json")
    if old is not None and (old["settings"] != meta["settings"] or old.get("init_sha256") != meta["init_sha256"]):
        raise ConfigError(f"{out} holds a sweep with other settings or another checkpoint; choose another output folder")
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "sweep.json", meta)
    (out / ".gitignore").write_text("runs/\n")

    if not (out / "start.json").is_file():
        model.eval()
        _write(out / "start.json", _measure(model, splits, base, settings, record_path(out / "start.json"), item="start"))
        log(f"start: {_json(out / 'start.json')}")
    if not (out / "estimators.json").is_file():
        g = torch.Generator().manual_seed(12345)
        idx = torch.randperm(len(splits.x_train), generator=g)[: settings.estimator_images]
        x, y = to_unit_float(splits.x_train[idx].to(device)), splits.y_train[idx].to(device)
        t0 = time.time()
        est = compute_estimates(model, layers, x, y, base.attack.threat().replace(steps=base.clat.criticality.steps), names=names)
        _write(out / "estimators.json", {"images": settings.estimator_images, "scores": est, "time_s": time.time() - t0})
        log(f"estimators computed in {time.time() - t0:.0f} s")

    # seed by seed, each seed's reference (full-model PGD-AT) right after its layers: a partial sweep is already a whole comparison
    items = [(i, s) for s in settings.seeds for i in [*chosen, *([None] if settings.reference else [])]]
    done = 0
    for layer, seed in items:
        name = f"{'full' if layer is None else f'{layer:02d}'}_s{seed}"
        f = out / "items" / f"{name}.json"
        if f.is_file():
            done += 1
            continue
        if deadline is not None and time.time() > deadline:
            log(f"time budget used: {done} of {len(items)} items done; run the same command again to continue")
            return {"done": done, "total": len(items)}
        run = out / "runs" / name
        cfg = _item_cfg(base, settings, layer, seed)
        t0 = time.time()
        if RunDir(run).config_path.is_file() and not RunDir(run).finished():
            summary = train(None, run, resume=True)
        else:
            summary = train(cfg, run, force=True)
        trained = build_model(cfg, splits.num_classes, device)
        load_into(trained, read_state_dict(RunDir(run).weights_path), source=str(run))
        trained.eval()
        res = {"layer": layer, "name": "full model (PGD-AT)" if layer is None else layers[layer].name, "seed": seed,
               "val": _measure(trained, splits, cfg, settings, record_path(f), item=name),
               "trainable_params": summary["trainable_params_last"],
               "train_time_s": summary["train_time_s"], "lam": [h.get("lam") for h in summary["selection_history"]]}
        _write(f, res)
        done += 1
        log(f"{name} ({res['name']}): val clean {res['val']['clean_acc']:.3f} PGD {res['val']['pgd_acc']:.3f} "
            f"({time.time() - t0:.0f} s; {done}/{len(items)})")
    return {"done": done, "total": len(items)}


def _cfg_dict(cfg: Config) -> dict:
    d = to_dict(cfg)
    d["init"], d["data"]["root"] = _shown(d["init"]), _shown(d["data"]["root"])
    return d


def _shown(path: str | None) -> str | None:
    """A path as the report shows it: relative to the working directory when inside it (a clone may live anywhere)."""
    if path is None:
        return None
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# -- analysis and report -------------------------------------------------------------------------
def load(out: str | Path) -> dict:
    """Everything a sweep folder holds: settings, start, items by layer, the reference, estimator scores."""
    out = Path(out)
    meta = _json(out / "sweep.json")
    if meta is None:
        raise ConfigError(f"{out} holds no layer sweep (no sweep.json)")
    items = [json.loads(p.read_text()) for p in sorted((out / "items").glob("*.json"))]
    by_layer: dict[int, list[dict]] = {}
    for it in items:
        if it["layer"] is not None:
            by_layer.setdefault(it["layer"], []).append(it)
    return {"meta": meta, "start": _json(out / "start.json"), "by_layer": by_layer,
            "reference": [it for it in items if it["layer"] is None], "estimators": _json(out / "estimators.json")}


def oracle(sweep: dict, metric: str = "pgd_acc") -> dict[int, list[float]]:
    """Per layer, the gain of each seed over the starting checkpoint (fractions)."""
    start = sweep["start"][metric]
    return {i: [it["val"][metric] - start for it in its] for i, its in sorted(sweep["by_layer"].items())}


def scores_table(sweep: dict) -> list[dict]:
    """Each estimator's ρ (95% CI) and top-1/top-2 regret against the oracle's PGD gains."""

    gains = oracle(sweep)
    idx = sorted(gains)
    if len(idx) < 3:
        return []
    rows = []
    est = (sweep["estimators"] or {}).get("scores", {})
    for name in [*ESTIMATORS, *(n for n in est if n not in ESTIMATORS), "random"]:
        if name != "random" and name not in est:
            continue
        s = score(None if name == "random" else [est[name][i] for i in idx], [gains[i] for i in idx])
        rows.append({"estimator": name, "label": LABELS.get(name) or label(name), **s,
                     "top1": None if name == "random" else sweep["meta"]["layers"][max(idx, key=lambda i: est[name][i])]["name"]})
    return rows


def render(out: str | Path, title: str | None = None) -> Path:
    """``OUT/report.md`` and ``OUT/oracle.png`` from the sweep's JSON."""

    out = Path(out)
    sw = load(out)
    meta, st = sw["meta"], sw["meta"]["settings"]
    gains = oracle(sw)
    clean = oracle(sw, "clean_acc")
    names = {l["index"]: l["name"] for l in meta["layers"]}
    params = {l["index"]: l["params"] for l in meta["layers"]}
    ref = [it["val"]["pgd_acc"] - sw["start"]["pgd_acc"] for it in sw["reference"]]
    ref_c = [it["val"]["clean_acc"] - sw["start"]["clean_acc"] for it in sw["reference"]]
    est = (sw["estimators"] or {}).get("scores", {})

    def mci(v: list[float]) -> str:
        if not v:
            return "—"
        if len(v) == 1:
            return f"{100 * v[0]:+.1f}"
        t = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}.get(len(v), 2.0)
        return f"{100 * fmean(v):+.1f} ± {100 * t * stdev(v) / len(v) ** 0.5:.1f}"

    rows = [[i, names[i], f"{params[i]:,}", len(gains[i]), mci(gains[i]), mci(clean[i]),
             *(f"{est[e][i]:.3g}" for e in ("paper", "input") if e in est)]
            for i in sorted(gains, key=lambda i: -sum(gains[i]) / len(gains[i]))]
    lam = str(st['lam']) if st['lam'] is not None else str(meta['config']['clat']['lam'])
    objective = (f"CLAT objective, λ = {lam}" if st['lam_mode'] == 'fixed' else "CLAT objective, automatic λ") \
        if st['objective'] == 'clat' else "PGD-AT objective on that layer"
    lines = [f"# Layer oracle{': ' + title if title else ''}", "",
             f"From `{meta['init']}`: each layer fine-tuned alone for {st['epochs']} epochs "
             f"({objective}), "
             f"seeds {', '.join(map(str, st['seeds']))}; validation accuracy under PGD-{st['val_steps']} on {sw['start']['n']} held-out "
             f"images. "
             f"Gains in percentage points over the checkpoint itself (clean {100 * sw['start']['clean_acc']:.1f}%, PGD "
             f"{100 * sw['start']['pgd_acc']:.1f}%), "
             "mean ± 95% t-interval over seeds.", ""]
    if ref:
        lines += [f"Reference, the same budget on the full model (PGD-AT): PGD {mci(ref)}, clean {mci(ref_c)} ({len(ref)} seeds).", ""]
    lines += [markdown_table(["idx", "layer", "params", "seeds", "PGD gain", "clean gain", *(["C (paper)"] if "paper" in est else []),
                              *(["C (input)"] if "input" in est else [])], rows), ""]
    table = scores_table(sw)
    if table:
        lines += ["## Estimators against the oracle", "",
                  "Spearman's ρ between each estimator's score and the mean PGD gain per layer (95% bootstrap interval over layers "
                  "and seeds), and the regret of choosing by it: the mean gain of the truly best k layers minus that of the k it "
                  "ranks first (percentage points; 0 is perfect).", "",
                  markdown_table(["estimator", "ρ", "95% CI", "regret top-1", "regret top-2", "its top-1"],
                                 [[r["label"], f"{r['rho']:+.2f}", f"[{r['rho_ci'][0]:+.2f}, {r['rho_ci'][1]:+.2f}]",
                                   f"{100 * r['regret_top1']:.2f}",
                                   f"{100 * r['regret_top2']:.2f}", r["top1"] or "—"] for r in table]), ""]
    png = plot_oracle(sw, out / "oracle.png", title)
    if png is not None:
        lines += ["![oracle](oracle.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    _write(out / "scores.json", table)
    return out / "report.md"


def plot_oracle(sw: dict, path: Path, title: str | None = None) -> Path | None:
    gains = oracle(sw)
    if not gains:
        return None
    idx = sorted(gains)
    names = {l["index"]: l["name"] for l in sw["meta"]["layers"]}
    fig = figure(max(7.0, 0.4 * len(idx) + 2), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    m = [100 * sum(gains[i]) / len(gains[i]) for i in idx]
    ax.bar(range(len(idx)), m, color="#4c72b0", label="PGD gain of fine-tuning the layer alone (mean over seeds)")
    for k, i in enumerate(idx):
        ax.scatter([k] * len(gains[i]), [100 * g for g in gains[i]], color="black", s=8, zorder=3)
    ref = [it["val"]["pgd_acc"] - sw["start"]["pgd_acc"] for it in sw["reference"]]
    if ref:
        ax.axhline(100 * sum(ref) / len(ref), color="#c44e52", ls="--", label="full-model PGD-AT, same budget")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(idx)))
    ax.set_xticklabels([names[i] for i in idx], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("validation PGD accuracy gain (points)")
    est = (sw["estimators"] or {}).get("scores", {})
    if "paper" in est:
        ax2 = ax.twinx()
        for key, color in (("paper", "#55a868"), ("input", "#8172b2"), ("exact_eq5", "#ccb974")):
            if key in est:
                ax2.plot(range(len(idx)), [est[key][i] for i in idx], marker="o", ms=3, color=color, label=f"criticality: {key}")
        ax2.set_ylabel("criticality index")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    else:
        ax.legend(fontsize=7)
    ax.set_title(title or "layer oracle")
    return save_figure(fig, path)
