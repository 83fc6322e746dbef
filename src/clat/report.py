"""Results (JSON) -> markdown tables and PNG plots. Nothing here trains or attacks.

Plots use matplotlib's object API with the Agg canvas (no pyplot global state,
no display needed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from clat.errors import ClatError


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = ["  ".join(c.ljust(w) if j <= 1 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def criticality_rows(crit: dict) -> tuple[list[str], list[list[Any]]]:
    headers = ["idx", "layer", "output", "params", "weakness W", "criticality C", "rank", "selected"]
    rows = []
    for l in crit["layers"]:
        rows.append(
            [
                l["index"],
                l["name"] + (f" + {l['bn'].rsplit('.', 1)[-1]}" if l.get("bn") else ""),
                "x".join(map(str, l["out_shape"])),
                f"{l['params']:,}",
                float(l["weakness"]),
                float(l["criticality"]),
                l["rank"] if l["rank"] is not None else "excl.",
                "*" if l["selected"] else "",
            ]
        )
    return headers, rows


def plot_criticality(crit: dict, path: str | Path, title: str = "Layer criticality") -> Path:
    layers = crit["layers"]
    fig = _figure(max(6.0, 0.32 * len(layers) + 2), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    xs = [l["index"] for l in layers]
    cs = [max(l["criticality"], 1e-12) for l in layers]
    colors = ["#d62728" if l["selected"] else ("#bbbbbb" if not l["eligible"] else "#1f77b4") for l in layers]
    ax.bar(xs, cs, color=colors)
    ax.set_yscale("log")
    ax.set_xlabel("layer index (execution order)")
    ax.set_ylabel("criticality index C (log scale)")
    ax.set_title(title)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs], fontsize=7)
    from matplotlib.patches import Patch

    ax.legend(
        handles=[Patch(color="#d62728", label="selected (top-k)"), Patch(color="#1f77b4", label="eligible"), Patch(color="#bbbbbb", label="excluded")],
        fontsize=8,
        loc="upper left",
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_curves(rows: list[dict], path: str | Path, title: str = "Training curves") -> Path:
    """Held-out clean and PGD accuracy per epoch; re-selection epochs and stages marked."""
    fig = _figure(7.5, 5.2)
    ax, ax2 = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    ev = [r for r in rows if "val" in r]
    if ev:
        ax.plot([r["epoch"] for r in ev], [100 * r["val"]["clean_acc"] for r in ev], "o-", label="clean (held-out)")
        ax.plot([r["epoch"] for r in ev], [100 * r["val"]["pgd_acc"] for r in ev], "s-", label="PGD (held-out)")
    stages: dict[str, list[int]] = {}
    for r in rows:
        stages.setdefault(r["stage"], []).append(r["epoch"])
    for i, (name, eps) in enumerate(stages.items()):
        if i > 0:
            for a in (ax, ax2):
                a.axvline(min(eps) - 0.5, color="k", lw=1)
            ax.text(min(eps) - 0.4, 0.98, f"{name}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    sel = [r["epoch"] for r in rows if "selection" in r]
    for j, e in enumerate(sel):
        for a in (ax, ax2):
            a.axvline(e - 0.5, color="#d62728", ls="--", lw=0.8, label="layer re-selection" if (j == 0 and a is ax) else None)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    ax2.plot([r["epoch"] for r in rows], [r["train"].get("loss", float("nan")) for r in rows], "o-", color="#555555")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("training loss")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def read_run(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise ClatError(f"{run_dir} holds no metrics.jsonl; is it a run folder written by `clat train`?")
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else None
    evals = {p.stem: json.loads(p.read_text()) for p in sorted(run_dir.glob("eval*.json"))}
    crit = json.loads((run_dir / "criticality.json").read_text()) if (run_dir / "criticality.json").is_file() else None
    return {"rows": rows, "summary": summary, "evals": evals, "criticality": crit}


def run_report(run_dir: str | Path) -> Path:
    """Render ``report.md`` and ``plots/*.png`` of a run folder from its JSON files."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    rows = run["rows"]
    out = [f"# Run report: `{run_dir.name}`", ""]
    if run["summary"]:
        s = run["summary"]
        out += [f"Model `{s['model']['model']}` ({s['total_params']:,} parameters, {s['layers']} layers) on {s['data']}, {s['epochs']} epochs.", ""]
    plot = plot_curves(rows, run_dir / "plots" / "curves.png", f"{run_dir.name}: held-out accuracy")
    out += ["## Training", "", f"![curves]({plot.relative_to(run_dir)})", ""]
    headers = ["epoch", "stage", "method", "loss", "val clean", "val PGD", "trainable", "layers", "time (s)"]
    table = []
    for r in rows:
        v = r.get("val", {})
        table.append(
            [
                r["epoch"], r["stage"], r["method"], r["train"].get("loss", float("nan")),
                f"{100 * v['clean_acc']:.1f}%" if v else "", f"{100 * v['pgd_acc']:.1f}%" if v else "",
                f"{r['trainable_params']:,} ({100 * r['trainable_params'] / r['total_params']:.1f}%)",
                ", ".join(r.get("selected", [])) or "all", r["time_s"],
            ]
        )
    out += [markdown_table(headers, table), ""]
    hist = (run["summary"] or {}).get("selection_history") or []
    if hist:
        out += ["## Critical layers over time", ""]
        out += [markdown_table(["epoch", "selected", "indices", "trainable", "λ"], [[h["epoch"] + 1, ", ".join(h["selected"]), h["selected_index"], f"{h['trainable_params']:,}", h["lam"]] for h in hist]), ""]
    if run["criticality"]:
        p = plot_criticality(run["criticality"], run_dir / "plots" / "criticality.png")
        h, r = criticality_rows(run["criticality"])
        out += ["## Criticality", "", f"![criticality]({p.relative_to(run_dir)})", "", markdown_table(h, r), ""]
    if run["evals"]:
        out += ["## Evaluation", ""]
        out += [markdown_table(["file", "n", "clean", "PGD", "attack"], [[k, e["n"], f"{100 * e['clean_acc']:.2f}%", f"{100 * e['pgd_acc']:.2f}%" if "pgd_acc" in e else "", _attack_str(e)] for k, e in run["evals"].items()]), ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(out))
    return path


def _attack_str(e: dict) -> str:
    a = e.get("attack")
    if not a:
        return ""
    return f"PGD-{a['steps']} ({a['norm']}, ε={a['eps']:.4f}, α={a['alpha']:.4f}, {a['restarts']} restart(s))"
