"""The PNG plots of runs and studies (criticality, selection history, training curves, ε sweep, transfer).

matplotlib's object API with the Agg canvas: no pyplot global state, no display needed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from clat.attacks.threat import DEFAULT_THREAT, eps_str
from clat.base.run_records import SelectionEvent
from clat.methods.registry import label as method_name

SELECTED, ELIGIBLE, EXCLUDED = "#d62728", "#1f77b4", "#bbbbbb"


def figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def plot_criticality(crit: dict, path: str | Path, title: str = "Layer criticality") -> Path:
    layers = crit["layers"]
    fig = figure(max(6.0, 0.32 * len(layers) + 2), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    xs = [l["index"] for l in layers]
    cs = [max(l["criticality"], 1e-12) for l in layers]
    colors = [SELECTED if l["selected"] else (EXCLUDED if not l["eligible"] else ELIGIBLE) for l in layers]
    ax.bar(xs, cs, color=colors)
    ax.set_yscale("log")
    ax.set_xlabel("layer index (execution order)")
    ax.set_ylabel("criticality index C (log scale)")
    ax.set_title(title)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs], fontsize=7)
    from matplotlib.patches import Patch

    ax.legend(
        handles=[Patch(color=SELECTED, label="selected (top-k)"), Patch(color=ELIGIBLE, label="eligible"),
                 Patch(color=EXCLUDED, label="excluded")],
        fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
    )
    fig.tight_layout()
    return save_figure(fig, path)


def plot_selection_history(history: Sequence[SelectionEvent | dict], path: str | Path, layer_names: Sequence[str] | None = None,
                           title: str = "Critical layers over time") -> Path:
    """Criticality of every layer (columns) at each re-selection (rows, labelled with the epoch it trains), log colour
    scale; the selected layers are boxed. ``history``: selection events, or their dicts in any record schema."""
    history = [SelectionEvent.of(h) for h in history]
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    c = np.array([[max(v, 1e-12) if math.isfinite(v) else np.nan for v in h.criticality or []] for h in history], dtype=float)
    n_layers = c.shape[1]
    fig = figure(max(6.0, 0.35 * n_layers + 2.5), 1.4 + 0.42 * len(history))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(c, aspect="auto", cmap="viridis", norm=LogNorm(vmin=np.nanmin(c), vmax=np.nanmax(c)), interpolation="nearest")
    for r, h in enumerate(history):
        for i in h.selected_index:
            ax.add_patch(Rectangle((i - 0.5, r - 0.5), 1, 1, fill=False, edgecolor=SELECTED, lw=2.2))
        if n_layers <= 30:
            for i, v in enumerate(h.criticality or []):
                ax.text(i, r, f"{v:.2g}", ha="center", va="center", fontsize=6.5,
                        color="white" if im.norm(max(v, 1e-12)) < 0.5 else "black")
    ax.set_xticks(range(n_layers))
    ax.set_xticklabels([str(i) for i in range(n_layers)], fontsize=7)
    ax.set_yticks(range(len(history)))
    ax.set_yticklabels([f"epoch {h.epoch}" for h in history], fontsize=8)
    ax.set_xlabel("layer index (execution order); red box = selected")
    ax.set_title(title)
    cb = fig.colorbar(im, ax=ax, pad=0.02)
    cb.set_label("criticality C (log)")
    fig.tight_layout()
    return save_figure(fig, path)


# -- training curves -------------------------------------------------------------------------
def plot_curves(rows: list[dict], path: str | Path, title: str = "Training curves") -> Path:
    """Held-out clean and PGD accuracy per epoch (top) and each epoch's training loss
    (bottom; every method's own objective, so values are comparable only within a
    stage); stage boundaries and CLAT's re-selection epochs marked. Legends sit
    outside the axes so they never hide a curve."""
    fig = figure(9.0, 5.6)
    ax, ax2 = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2, sharex=None)
    ev = [r for r in rows if "val" in r]
    if ev:
        ax.plot([r["epoch"] for r in ev], [100 * r["val"]["clean_acc"] for r in ev], "o-", color="#1f77b4", label="clean (held-out)")
        ax.plot([r["epoch"] for r in ev], [100 * r["val"]["pgd_acc"] for r in ev], "s-", color="#ff7f0e", label="PGD (held-out)")
    stages: dict[str, list[dict]] = {}
    for r in rows:
        stages.setdefault(r["stage"], []).append(r)
    for i, (name, srows) in enumerate(stages.items()):
        first = min(r["epoch"] for r in srows)
        if i > 0:
            for a in (ax, ax2):
                a.axvline(first - 0.5, color="#444444", lw=2.0, alpha=0.6, zorder=1)
        ax.text(first - 0.4, 1.02, f"{name}: {method_name(srows[0]['method'])}", transform=ax.get_xaxis_transform(),
                va="bottom", fontsize=8)
        ax2.plot([r["epoch"] for r in srows], [r["train"].get("loss", float("nan")) for r in srows], "o-",
                 color=f"C{i + 2}", label=f"{method_name(srows[0]['method'])} objective")
    sel = [r["epoch"] for r in rows if "selection" in r]
    for j, e in enumerate(sel):
        for a in (ax, ax2):
            a.axvline(e - 0.5, color=SELECTED, ls="--", lw=1.0, zorder=3, label="layer (re-)selection" if j == 0 else None)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, pad=16)
    ax.grid(alpha=0.3)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("training loss\n(each method's own objective)")
    ax2.grid(alpha=0.3)
    epochs = [r["epoch"] for r in rows]
    if epochs:
        for a in (ax, ax2):
            a.set_xlim(min(epochs) - 0.7, max(epochs) + 0.7)
            if len(epochs) <= 30:
                a.set_xticks(epochs)
    for a in (ax, ax2):
        a.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return save_figure(fig, path)


# -- evaluation plots ------------------------------------------------------------------------
def plot_eps_sweep(sweeps: Mapping[str, dict], path: str | Path, title: str = "Accuracy under PGD over ε",
                   train_eps: float | None = DEFAULT_THREAT.eps) -> Path:
    """Accuracy (%) against the attack radius for one or more models (paper Figure 4)."""
    fig = figure(7.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    norm = next(iter(sweeps.values()))["norm"] if sweeps else "linf"
    scale = 255 if norm == "linf" else 1
    for i, (name, s) in enumerate(sweeps.items()):
        pts = s["points"]
        ax.plot([p["eps"] * scale for p in pts], [100 * p["acc"] for p in pts], "o-", color=f"C{i}", label=f"{name} (n={s['n']})")
    if train_eps and norm == "linf":
        ax.axvline(train_eps * scale, color="#777777", ls=":", lw=1, label=f"training ε = {eps_str(train_eps)}")
    ax.set_xlabel("attack radius ε (ℓ∞, in 1/255)" if norm == "linf" else "attack radius ε (ℓ2)")
    steps = {s["steps"] for s in sweeps.values()}
    ax.set_ylabel(f"accuracy under PGD-{'/'.join(map(str, sorted(steps)))} (%)")
    top = max((100 * p["acc"] for s in sweeps.values() for p in s["points"]), default=100)
    ax.set_ylim(-2, min(102, 1.15 * top + 5))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_transfer(transfer: dict, path: str | Path, title: str = "Black-box transfer: accuracy of the victim (%)") -> Path:
    """The transfer matrix as a heat map: rows attack, columns are attacked; the
    diagonal (framed) is white-box accuracy."""
    from matplotlib.patches import Rectangle

    names = transfer["names"]
    m = 100 * np.array(transfer["matrix"], dtype=float)
    k = len(names)
    fig = figure(2.2 + 1.25 * k, 1.6 + 1.0 * k)
    ax = fig.add_subplot(1, 1, 1)
    top = 100 * max([*transfer.get("clean_acc", {}).values(), *[v for row in transfer["matrix"] for v in row]])
    im = ax.imshow(m, cmap="RdYlGn", vmin=0, vmax=max(top, 1e-6))  # colour scale up to the best clean accuracy
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{m[i, j]:.1f}", ha="center", va="center", fontsize=10, color="black")
        ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", lw=1.5))
    ax.set_xticks(range(k))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=9)
    ax.set_yticks(range(k))
    ax.set_yticklabels(names, fontsize=9)
    ax.set_xlabel("victim (evaluated model)")
    ax.set_ylabel("attacker (PGD examples crafted on)")
    a = transfer["attack"]
    ax.set_title(f"{title}\nPGD-{a['steps']}, ε = {eps_str(a['eps'], a['norm'])}, n = {transfer['n']}; diagonal = white-box", fontsize=10)
    cb = fig.colorbar(im, ax=ax, pad=0.03, fraction=0.05)
    cb.set_label("accuracy (%)")
    fig.tight_layout()
    return save_figure(fig, path)


# -- reading runs ------------------------------------------------------------------------------
