"""Results (JSON) -> markdown tables and PNG plots. Nothing here trains or attacks.

A run folder's report is rendered from the files ``clat train`` and the evaluation
commands wrote into it: ``metrics.jsonl`` and ``summary.json`` (training),
``eval*.json`` (``clat eval``: PGD, AutoAttack, ε sweep, sanity checks),
``criticality.json``, ``stability.json`` (``clat stability``) and ``transfer*.json``
(``clat transfer``). Several run folders also give a comparison in the paper's
layout (Table 1: method rows, clean / PGD / AutoAttack columns per data set;
Table 6: parameters; Figure 4: accuracy over ε; Table 2: the transfer matrix).

Plots use matplotlib's object API with the Agg canvas (no pyplot global state,
no display needed).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from clat.analysis.plots import eps_str, plot_criticality, plot_curves, plot_eps_sweep, plot_selection_history, plot_transfer
from clat.analysis.tables import fmt_bytes, markdown_table, pct, rel_path, text_table  # noqa: F401  (also imported from here)
from clat.base.errors import ClatError
from clat.base.run_records import SelectionEvent
from clat.config.schema import to_dict
from clat.methods.registry import label as method_name
from clat.runs.folder import REPORT_FILES, RunDir
from clat.runs.metrics import epoch_ranges
from clat.training.early_stop import ValHistory


# -- criticality -------------------------------------------------------------------------
def layer_label(name: str, bn: str | None) -> str:
    """``layer3.0.conv2 + bn2`` (the norm's own name where it is a sibling's), ``features.0 + features.1`` (a bare index
    alone would read as a count)."""
    if not bn:
        return name
    short = bn.rsplit(".", 1)[-1]
    return f"{name} + {bn if short.isdigit() or bn.rsplit('.', 1)[0] != name.rsplit('.', 1)[0] else short}"


def criticality_rows(crit: dict) -> tuple[list[str], list[list[Any]]]:
    with_src = any(l.get("denominator_source") for l in crit["layers"])
    headers = ["idx", "layer", "output", "params", "weakness W", "criticality C", "rank",
               "selected"] + (["C = W / W of"] if with_src else [])
    rows = []
    for l in crit["layers"]:
        rows.append(
            [
                l["index"],
                layer_label(l["name"], l.get("bn")),
                "x".join(map(str, l["out_shape"])),
                f"{l['params']:,}",
                float(l["weakness"]),
                float(l["criticality"]),
                l["rank"] if l["rank"] is not None else "excl.",
                "*" if l["selected"] else "",
            ] + ([l.get("denominator_source") or ""] if with_src else [])
        )
    return headers, rows


def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ClatError(f"could not read {p}: {e}") from None


def read_run(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    rd = RunDir(run_dir)
    if not rd.metrics_path.is_file():
        raise ClatError(f"{run_dir} holds no metrics.jsonl; is it a run folder written by `clat train`?")
    rows, damaged = rd.read_metrics()
    summary = rd.summary()
    evals = {p.stem: _read_json(p) for p in sorted(run_dir.glob("eval*.json"))}
    crit = _read_json(run_dir / "criticality.json") if (run_dir / "criticality.json").is_file() else None
    stability = _read_json(run_dir / "stability.json") if (run_dir / "stability.json").is_file() else None
    transfers = {p.stem: _read_json(p) for p in sorted(run_dir.glob("transfer*.json"))}
    config = None
    if rd.config_path.is_file():
        config = to_dict(rd.read_config())  # one-line error for a damaged or foreign config.yaml
    return {"rows": rows, "summary": summary, "evals": evals, "criticality": crit, "stability": stability, "transfers": transfers,
            "config": config, "damaged": damaged}


def method_label(rows: list[dict]) -> str:
    """"PGD-AT + CLAT" from the methods of a run's stages (a continued method counts once)."""
    out: list[str] = []
    for r in rows:
        name = method_name(r["method"])
        if not out or out[-1] != name:
            out.append(name)
    return " + ".join(out) or "?"


def main_eval(evals: Mapping[str, dict]) -> dict | None:
    """The evaluation a summary shows: the most complete one (AutoAttack > APGD-CE >
    PGD only), then the one on most images, then ``eval.json``."""
    if not evals:
        return None

    def score(item: tuple[str, dict]) -> tuple:
        k, e = item
        return ("autoattack" in e, "apgd_ce" in e, "pgd_acc" in e, e.get("n", 0), k == "eval")

    return max(evals.items(), key=score)[1]


def eval_section(evals: Mapping[str, dict], key: str) -> dict | None:
    """``key`` ("eps_sweep", "sanity", ...) of the main evaluation, else of any other
    evaluation file of the run that has it."""
    main = main_eval(evals)
    if main is not None and key in main:
        return main[key]
    return next((e[key] for e in evals.values() if key in e), None)


def parameter_efficiency(rows: list[dict]) -> dict:
    """Trainable vs total parameters and optimizer-state bytes per stage (paper Table 6),
    from a run's ``metrics.jsonl`` rows."""
    stages: dict[str, list[dict]] = {}
    for r in rows:
        stages.setdefault(r["stage"], []).append(r)
    out = []
    full_bytes = None
    for name, srows in stages.items():
        tr = [r["trainable_params"] for r in srows]
        total = srows[-1]["total_params"]
        ob = [r.get("optimizer_state_bytes") for r in srows if r.get("optimizer_state_bytes") is not None]
        times = [r["epoch_time_s"] for r in srows if "epoch_time_s" in r]
        st = {
            "stage": name,
            "method": srows[0]["method"],
            "epochs": len(srows),
            "trainable_min": min(tr),
            "trainable_max": max(tr),
            "trainable_last": tr[-1],
            "total_params": total,
            "fraction_max": max(tr) / total,
            "optimizer_state_bytes_max": max(ob) if ob else None,
            "epoch_time_s_mean": sum(times) / len(times) if times else None,
        }
        if full_bytes is None and st["trainable_max"] == total and ob:
            full_bytes = max(ob)
        out.append(st)
    for st in out:
        known = full_bytes and st["optimizer_state_bytes_max"] is not None
        st["optimizer_state_vs_full"] = st["optimizer_state_bytes_max"] / full_bytes if known else None
    return {"stages": out, "full_model_optimizer_state_bytes": full_bytes}


def _param_rows(pe: dict) -> list[list[Any]]:
    rows = []
    for s in pe["stages"]:
        tr = f"{s['trainable_max']:,}" if s["trainable_min"] == s["trainable_max"] else f"{s['trainable_min']:,}–{s['trainable_max']:,}"
        rows.append([
            s["stage"], method_name(s["method"]), s["epochs"], tr, f"{s['total_params']:,}", f"{100 * s['fraction_max']:.1f}%",
            fmt_bytes(s["optimizer_state_bytes_max"]),
            f"{100 * s['optimizer_state_vs_full']:.1f}%" if s["optimizer_state_vs_full"] is not None else "",
            f"{s['epoch_time_s_mean']:.1f}" if s["epoch_time_s_mean"] is not None else "",
        ])
    return rows


PARAM_HEADERS = ["stage", "method", "epochs", "trainable params", "total", "% trained", "optimizer state", "vs full model", "epoch time "
                                                                                                                            "(s)"]


# -- evaluation sections ---------------------------------------------------------------------
def attack_str(e: dict) -> str:
    a = e.get("attack")
    if not a:
        return ""
    eps, alpha = eps_str(a['eps'], a['norm']), eps_str(a['alpha'], a['norm'])
    return f"PGD-{a['steps']} ({a['norm']}, ε={eps}, α={alpha}, {a['restarts']} restart(s))"


def _aa_str(aa: dict) -> str:
    after = ", ".join(f"{k} {100 * v:.1f}%" for k, v in aa.get("robust_acc_after", {}).items())
    return f"{aa['library']}, {aa['version']} ({after}), {aa['time_s']:.0f} s"


def eval_rows(evals: Mapping[str, dict]) -> tuple[list[str], list[list[Any]]]:
    headers = ["file", "weights", "n", "clean", "PGD (worst case)", "PGD (lowest run)", "APGD-CE", "AutoAttack", "attack"]
    rows = []
    for k, e in evals.items():
        rows.append([
            k, f"best (epoch {e['best']['epoch']})" if "best" in e else e.get("which", ""), e["n"], pct(e.get("clean_acc"), 2),
            pct(e.get("pgd_acc"), 2), pct(e.get("pgd_acc_lowest_run"), 2),
            pct(e["apgd_ce"]["robust_acc"], 2) if "apgd_ce" in e else "",
            pct(e["autoattack"]["robust_acc"], 2) if "autoattack" in e else "",
            attack_str(e),
        ])
    return headers, rows


def flags_of(e: Mapping[str, Any]) -> list[str]:
    """Every raised flag of an evaluation: sanity checks, PGD vs AutoAttack, and the
    AutoAttack library's own reliability warnings."""
    return list(e.get("flags", []))


def sanity_section(s: dict) -> list[str]:
    out = []
    flags = [c for c in s["checks"] if c["flag"]]
    if flags:
        out += [f"> **WARNING: possible gradient masking** ({len(flags)} of {len(s['checks'])} checks raised a flag):", ">"]
        out += [f"> - **{c['title']}**: {c['message']}" for c in flags]
        out += [""]
    else:
        out += [f"No flag raised: {len(s['checks'])} of {len(s['checks'])} checks passed (n = {s['n']}, ε = "
                f"{eps_str(s['settings']['eps'], s['settings']['norm'])}).", ""]
    out += [markdown_table(["check", "result", "numbers"],
                           [[c["title"], "**FLAG**" if c["flag"] else "ok", c["message"]] for c in s["checks"]]), ""]
    return out


def stability_section(st: dict) -> list[str]:
    ref = st["reference"]
    out = [
        f"Reference top-{st['k']} from {ref['size']} training images: {', '.join(map(str, ref['top_k']))} ({', '.join(ref['names'])}). "
        f"{st['repeats']} random batches per size; PGD-{st['attack']['steps']}, ε = {eps_str(st['attack']['eps'])}."
        + (f" One PGD-AT epoch: {st['epoch_time_s']:.1f} s ({st.get('epoch_time_source', '')})." if st.get("epoch_time_s") else ""),
        "",
    ]
    headers = ["batch size", f"top-{st['k']} (first draw)", "overlap with reference", "same set", "same order", "top-1 agrees",
               "rank corr. (Spearman)", "time (s)", "% of an epoch"]
    rows = [
        [r["batch_size"], ", ".join(map(str, r["top_k"][0])), f"{100 * r['overlap_mean']:.0f}%", f"{100 * r['same_set']:.0f}%",
         f"{100 * r['same_order']:.0f}%" if "same_order" in r else "", f"{100 * r['top1_agrees']:.0f}%",
         f"{r['spearman_mean']:.2f}" if "spearman_mean" in r else "", f"{r['time_s_mean']:.3f}",
         f"{100 * r['fraction_of_epoch']:.2f}%" if "fraction_of_epoch" in r else ""]
        for r in st["rows"]
    ]
    return out + [markdown_table(headers, rows), ""]


def transfer_rows(t: dict) -> tuple[list[str], list[list[Any]]]:
    headers = ["attacker \\ victim", *t["names"]]
    rows = [[src, *[pct(v) for v in row]] for src, row in zip(t["names"], t["matrix"])]
    rows.append(["clean", *[pct(t["clean_acc"][n]) for n in t["names"]]])
    return headers, rows


# -- a run's report ---------------------------------------------------------------------------
def _best(summary: dict | None, rows: list[dict]) -> tuple[int | None, float | None]:
    """The best epoch and its held-out PGD accuracy: the summary's, else (an unfinished run) from the rows."""
    if summary and "best_epoch" in summary:
        return summary["best_epoch"], summary["best_value"]

    b = ValHistory.of(rows).best
    return (b["epoch"], b["value"]) if b else (None, None)


def best_lines(summary: dict | None, rows: list[dict]) -> list[str]:
    """Which epoch was best (``best/``), and whether the run stopped early."""
    epoch, value = _best(summary, rows)
    out = []
    if epoch is not None:
        out.append(f"Best held-out PGD accuracy (`val.pgd_acc`): **{pct(value)}** at epoch {epoch}; its weights are in `best/` "
                   "(`clat eval RUN --which best`).")
    elif summary and summary.get("best_note"):
        out.append(f"Best epoch: none ({summary['best_note']}).")
    if summary and summary.get("stopped_early"):
        es = summary.get("early_stop") or {}
        out.append(f"Stopped early after epoch {summary['epochs_done']} of {summary['epochs']}: the held-out PGD accuracy did not improve "
                   f"by "
                   f"more than {es.get('min_delta', 0):g} in {es.get('patience')} evaluations (early_stop).")
    return [" ".join(out), ""] if out else []


def selection_history(summary: dict | None, rows: list[dict]) -> list[SelectionEvent]:
    """The run's layer selections, typed: the summary's, else (an unfinished run) those of its rows; any record schema."""
    hist = (summary or {}).get("selection_history") or [r["selection"] for r in rows if "selection" in r]
    return [SelectionEvent.of(h) for h in hist]


def run_report(run_dir: str | Path) -> Path:
    """Render ``report.md`` and ``plots/*.png`` of a run folder from its JSON files, recorded in the run's manifest as
    they are written; never over a ``report.md`` or ``plots/`` that clat did not write. Lines of ``metrics.jsonl`` that
    are not rows are named in a warning and at the top of the report, with the epochs it shows."""

    run_dir, rd = Path(run_dir), RunDir(run_dir)
    run = read_run(run_dir)
    foreign = rd.foreign(list(REPORT_FILES)) if rd.has_manifest() else []
    if foreign:
        raise ClatError(f"{run_dir} holds {' and '.join(foreign)} that clat did not write; clat never replaces them: "
                        "move them away and run `clat report` again")
    with rd.recording(*REPORT_FILES):
        return _render_run_report(run_dir, run)


def damage_lines(damaged: Sequence[str], rows: list[dict]) -> list[str]:
    """The warning a report carries when lines of metrics.jsonl were skipped (also issued as a Python warning)."""


    shown = epoch_ranges([r["epoch"] for r in rows]) or "none"
    for d in damaged:
        warnings.warn(f"{d}; skipped: the report shows epochs {shown} only", stacklevel=3)
    return ["> **WARNING: metrics.jsonl is damaged.** " + "; ".join(damaged) + ". These lines were skipped: the tables and curves "
            f"below show epochs {shown} only.", ""] if damaged else []


def _render_run_report(run_dir: Path, run: dict) -> Path:
    rows = run["rows"]
    plots = run_dir / "plots"
    out = [f"# Run report: `{run_dir.name}` ({method_label(rows)})", ""]
    out += damage_lines(run.get("damaged", []), rows)
    if run["summary"]:
        s = run["summary"]
        out += [f"Model `{s['model']['model']}` ({s['total_params']:,} parameters, {s['layers']} layers) on {s['data']}, {s['epochs']} "
                f"epoch{'' if s['epochs'] == 1 else 's'}.", ""]
    out += best_lines(run["summary"], rows)
    if run["evals"]:
        out += ["## Evaluation", ""]
        h, r = eval_rows(run["evals"])
        out += [markdown_table(h, r), ""]
        for k, e in run["evals"].items():
            extra = []
            if "apgd_ce" in e:
                extra.append(f"APGD-CE: {_aa_str(e['apgd_ce'])}")
            if "autoattack" in e:
                extra.append(f"AutoAttack: {_aa_str(e['autoattack'])}")
            if extra:
                out += [f"`{k}`: " + "; ".join(extra) + ".", ""]
            other = [f for f in flags_of(e) if f not in e.get("sanity", {}).get("flags", [])]
            if other:
                out += [f"> **WARNING** (`{k}`): " + " ".join(other), ""]
            if "sanity" in e:
                out += [f"### Sanity checks against gradient masking (`{k}`)", ""] + sanity_section(e["sanity"])
        sweeps = {k: e["eps_sweep"] for k, e in run["evals"].items() if "eps_sweep" in e}
        if sweeps:
            p = plot_eps_sweep(sweeps, plots / "eps_sweep.png", f"{run_dir.name}: accuracy over ε")
            pts = next(iter(sweeps.values()))
            out += ["### Accuracy over ε", "", f"![accuracy over eps]({rel_path(p, run_dir)})", ""]
            out += [markdown_table(["ε", *sweeps],
                                   [[eps_str(pt["eps"], pts["norm"]), *[pct(s["points"][i]["acc"]) for s in sweeps.values()]]
                                                    for i, pt in enumerate(pts["points"])]), ""]

    plot = plot_curves(rows, plots / "curves.png", f"{run_dir.name}: held-out accuracy")
    out += ["## Training", "", f"![curves]({rel_path(plot, run_dir)})", ""]
    headers = ["epoch", "stage", "method", "loss", "val clean", "val PGD", "trainable", "layers", "time (s)"]
    table = []
    best_epoch = _best(run["summary"], rows)[0]
    for r in rows:
        v = r.get("val", {})
        table.append(
            [
                r["epoch"], r["stage"], r["method"], r["train"].get("loss", float("nan")),
                f"{100 * v['clean_acc']:.1f}%" if v else "",
                (f"{100 * v['pgd_acc']:.1f}%" + (" (best)" if r["epoch"] == best_epoch else "")) if v else "",
                f"{r['trainable_params']:,} ({100 * r['trainable_params'] / r['total_params']:.1f}%)",
                ", ".join(r.get("selected", [])) or "all", r["time_s"],
            ]
        )
    out += [markdown_table(headers, table), "", "The loss column is each method's own training objective (e.g. CE on PGD examples for "
                                                "PGD-AT, "
            "CE + λ·L_C for CLAT): compare it within a stage, not across stages.", ""]
    if rows:
        out += ["## Parameter efficiency", "", markdown_table(PARAM_HEADERS, _param_rows(parameter_efficiency(rows))), "",
                "Optimizer state: SGD momentum buffers, measured at the end of each epoch; frozen parameters keep none.", ""]
    hist = selection_history(run["summary"], rows)
    if hist:
        out += ["## Critical layers over time", ""]
        if all(h.criticality is not None for h in hist):
            p = plot_selection_history(hist, plots / "selection.png", title=f"{run_dir.name}: criticality at each re-selection")
            out += [f"![selection history]({rel_path(p, run_dir)})", ""]
        out += [markdown_table(["epoch", "selected", "indices", "trainable", "λ"],
                               [[h.epoch, ", ".join(h.selected), h.selected_index, f"{h.trainable_params:,}",
                                 "" if h.lam is None else h.lam] for h in hist]), ""]
    if run["criticality"]:
        p = plot_criticality(run["criticality"], plots / "criticality.png")
        h, r = criticality_rows(run["criticality"])
        out += ["## Criticality", "", f"![criticality]({rel_path(p, run_dir)})", "", markdown_table(h, r), ""]
    if run["stability"]:
        out += ["## Criticality stability (Table 7)", ""] + stability_section(run["stability"])
    for k, t in run["transfers"].items():
        p = plot_transfer(t, plots / f"{k}.png")
        h, r = transfer_rows(t)
        out += [f"## Black-box transfer (`{k}`)", "", f"![transfer]({rel_path(p, run_dir)})", "", markdown_table(h, r), ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(out))
    return path


# -- several runs: the paper's tables ------------------------------------------------------------
