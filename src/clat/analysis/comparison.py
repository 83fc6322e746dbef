"""Several run folders side by side, in the paper's layout (``clat report RUN RUN ...``): Table 1's method rows with
clean / PGD / AutoAttack columns per data set, Table 6's parameters, Figure 4's accuracy over ε and Table 2's transfer
matrix. Rendered from the runs' JSON files, as :mod:`clat.report` renders one run; nothing here trains or attacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from clat.analysis.plots import eps_str, plot_eps_sweep, plot_transfer
from clat.analysis.report import (
    attack_str,
    eval_section,
    flags_of,
    fmt_bytes,
    main_eval,
    markdown_table,
    method_label,
    parameter_efficiency,
    pct,
    read_run,
    rel_path,
    stability_section,
    transfer_rows,
)
from clat.base.errors import ClatError


def _labels(runs: list[tuple[Path, dict]], names: Sequence[str] | None) -> list[str]:
    if names:
        if len(names) != len(runs):
            raise ClatError(f"{len(names)} names for {len(runs)} run folders")
        return list(names)
    labels = [method_label(r["rows"]) for _, r in runs]
    return [f"{l} ({d.name})" if labels.count(l) > 1 else l for l, (d, _) in zip(labels, runs)]


def _data_name(run: dict) -> str:
    cfg = run.get("config") or {}
    ds = (cfg.get("data") or {}).get("dataset")
    names = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "bundled": "CIFAR-10 (bundled subset)"}
    return names.get(ds, (run.get("summary") or {}).get("data", "?"))


def comparison_rows(runs: list[tuple[Path, dict]], labels: Sequence[str]) -> tuple[list[str], list[list[Any]], list[str]]:
    """Table 1 layout: one row per run (model, method), clean / PGD / AutoAttack per data set."""
    datasets: list[str] = []
    for _, r in runs:
        if _data_name(r) not in datasets:
            datasets.append(_data_name(r))
    aa_name = "AutoAttack"
    evs = [main_eval(r["evals"]) for _, r in runs]
    if not any(e and "autoattack" in e for e in evs) and any(e and "apgd_ce" in e for e in evs):
        aa_name = "APGD-CE"
    headers = ["model", "method"] + [f"{d} {c}" for d in datasets for c in ("clean", "PGD", aa_name)]
    rows, notes = [], []
    prev_model = None
    for (d, r), label, e in sorted(zip(runs, labels, evs),
                                   key=lambda t: ((t[0][1].get("summary") or {}).get("model", {}).get("model", ""),)):
        model = ((r.get("summary") or {}).get("model") or {}).get("model", "?")
        cells = ["", "", ""] * len(datasets)
        if not e:  # a blank row would read as a missing number: say why, and how to get it
            i = datasets.index(_data_name(r)) * 3
            cells[i : i + 3] = ["not evaluated", "—", "—"]
            notes.append(f"{label}: not evaluated yet (`clat eval {d}` measures it)")
        else:
            i = datasets.index(_data_name(r)) * 3
            aa = e.get("autoattack") or e.get("apgd_ce")
            cells[i : i + 3] = [pct(e.get("clean_acc"), 2), pct(e.get("pgd_acc"), 2), pct(aa["robust_acc"], 2) if aa else ""]
            note = f"{label}: n = {e['n']}, {attack_str(e)}"
            if aa:
                note += f"; {aa['library']} {aa['version']} ({', '.join(aa['attacks'])})"
            notes.append(note)
        rows.append([model if model != prev_model else "", label, *cells])
        prev_model = model
    return headers, rows, notes


def comparison_report(run_dirs: Sequence[str | Path], out: str | Path, *, names: Sequence[str] | None = None,
                      transfer: dict | None = None) -> Path:
    """``out/report.md`` and ``out/plots/*.png`` comparing several run folders."""
    out = Path(out)
    runs = [(Path(d), read_run(d)) for d in run_dirs]
    labels = _labels(runs, names)
    plots = out / "plots"
    lines = ["# Comparison", "", "Runs: " + ", ".join(f"{l} = `{d}`" for l, (d, _) in zip(labels, runs)), ""]
    h, rows, notes = comparison_rows(runs, labels)
    lines += ["## Accuracy (paper Table 1 layout)", "", markdown_table(h, rows), ""]
    lines += [f"- {n}" for n in notes] + [""]
    lines += ["PGD is the per-example worst case over the restarts; AutoAttack is computed by the independent `pyautoattack` "
              "package on the same images.", ""]
    # sanity flags
    flag_rows = []
    for l, (_, r) in zip(labels, runs):
        if not r["evals"]:
            continue
        fl = list(dict.fromkeys(f for e in r["evals"].values() for f in flags_of(e)))
        san = eval_section(r["evals"], "sanity")
        flag_rows.append([l, "not run" if san is None else f"{sum(not c['flag'] for c in san['checks'])}/{len(san['checks'])} passed",
                          "; ".join(f"**{f}**" for f in fl) or "none"])
    if flag_rows:
        lines += ["## Sanity checks", "", markdown_table(["method", "sanity checks", "flags"], flag_rows), ""]
        if any(row[2] != "none" for row in flag_rows):
            lines.insert(2, "> **WARNING: possible gradient masking or unreliable evaluation: see the sanity checks below.**\n")
    # parameters (Table 6)
    prow = []
    for l, (_, r) in zip(labels, runs):
        if not r["rows"]:
            continue
        pe = parameter_efficiency(r["rows"])
        last = pe["stages"][-1]
        prow.append([l, f"{last['total_params']:,}", f"{last['trainable_max']:,}", f"{100 * last['fraction_max']:.1f}%",
                     fmt_bytes(last["optimizer_state_bytes_max"]),
                     f"{100 * last['optimizer_state_vs_full']:.1f}%" if last["optimizer_state_vs_full"] else ""])
    if prow:
        lines += ["## Trainable parameters in the last stage (paper Table 6)", "",
                  markdown_table(["method", "total", "trainable", "% used", "optimizer state", "vs full model"], prow), ""]
    sweeps = {l: eval_section(r["evals"], "eps_sweep") for l, (_, r) in zip(labels, runs) if eval_section(r["evals"], "eps_sweep")}
    if sweeps:
        p = plot_eps_sweep(sweeps, plots / "eps_sweep.png")
        lines += ["## Accuracy over ε (paper Figure 4)", "", f"![accuracy over eps]({rel_path(p, out)})", ""]
        first = next(iter(sweeps.values()))
        if all([pt["eps"] for pt in s["points"]] == [pt["eps"] for pt in first["points"]] for s in sweeps.values()):
            lines += [markdown_table(["ε", *sweeps],
                                     [[eps_str(pt["eps"], first["norm"]), *[pct(s["points"][i]["acc"]) for s in sweeps.values()]]
                                                     for i, pt in enumerate(first["points"])]), ""]
    if transfer is not None:
        p = plot_transfer(transfer, plots / "transfer.png")
        th, tr = transfer_rows(transfer)
        lines += ["## Black-box transfer (paper Table 2)", "", f"![transfer]({rel_path(p, out)})", "", markdown_table(th, tr), "",
                  "Rows attack (PGD examples crafted on that model), columns are attacked; the diagonal is white-box accuracy.", ""]
    stab = [(l, r["stability"]) for l, (_, r) in zip(labels, runs) if r["stability"]]
    for l, st in stab:
        lines += [f"## Criticality stability: {l} (paper Table 7)", ""] + stability_section(st)
    lines += ["Per-run reports: " + ", ".join(f"[{l}]({rel_path(d / 'report.md', out)})" for l, (d, _) in zip(labels, runs)), ""]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
