"""Render docs/results.md and its plots from the study's JSON (study/results/), re-running nothing.

Called by scripts/study.py at the end of every session; `python scripts/study.py --report` alone
renders without training. ``render(s)`` renders the study ``s`` (a ``StudySettings``): one function per
section of the page, each given the settings and what is finished (``Finished``, read once).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import json

from clat.analysis.plots import figure, save_figure
from study_settings import ARMS, LEGACY_DEVICE, PAPER_SCALE, REPO, StudySettings, best_row, plan, read_json, uses_trades
from study_verdict import aa_time_per_chunk, later_stage_time, primary_p, stage_gains, verdict


def _rel(p: Path) -> Path:
    """``p`` relative to the repository where it lies inside it (the smoke study writes elsewhere)."""
    return p.relative_to(REPO) if p.is_relative_to(REPO) else p


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
REFERENCE = "pgd_at_cont"
PAIRS = [(a, REFERENCE) for a in ARMS if a != REFERENCE and ARMS[a][0] == "pgd_at"] + [("trades_clat", "trades_cont"),
                                                                                       ("trades_clat", REFERENCE)]
# Is it CLAT's own ingredients that help? CLAT against each ablation and the other parameter-efficient methods.
CLAT_PAIRS = [("clat", a) for a in ("clat_random", "clat_nondynamic", "clat_ce_adv", "rift", "lora")]
# The paper's Eq. 6 against clat 0.1's criticality, and each CLAT against random layers with the same λ rule
CLAT_PAIRS += [("clat_paper", "clat"), ("clat_paper", "clat_random"), ("clat_paper_auto", "clat_random_auto"), ("clat_paper", "rift"),
               ("clat_paper", "lora"), ("clat_paper_auto", "clat_paper")]
# the layer oracle's best predictor on this network (depth) against Eq. 6 and random layers, all with automatic λ
CLAT_PAIRS += [("clat_deepest_auto", "clat_paper_auto"), ("clat_deepest_auto", "clat_random_auto")]


def device_names(names: list[str] | None) -> str:
    """Recorded machines in full (``CPU (2 threads) + NVIDIA H100 80GB HBM3``); older records wrote "(1 threads)"."""
    return " + ".join(names or [LEGACY_DEVICE]).replace("(1 threads)", "(1 thread)")


def train_device(r: dict) -> str:
    return device_names(r.get("train_devices"))


def short_device(dev: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``H100``; ``CPU (2 threads)`` -> ``CPU``."""
    return dev.removeprefix("NVIDIA ").split()[0]


def devices_by_seed(res: dict[str, dict[int, dict]]) -> str:
    """Which machine trained which seeds, e.g. ``seeds 0, 1, 2 on CPU (2 threads); seed 3 on NVIDIA H100``."""
    by_dev: dict[str, set[int]] = {}
    for by_seed in res.values():
        for s, r in by_seed.items():
            by_dev.setdefault(train_device(r), set()).add(s)
    return "; ".join(f"seed{'s' if len(v) > 1 else ''} {', '.join(map(str, sorted(v)))} on {d}"
                     for d, v in sorted(by_dev.items(), key=lambda kv: min(kv[1])))


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% t-interval (None for a single value)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, None
    return m, T975[len(values) - 1] * statistics.stdev(values) / len(values) ** 0.5


def fmt(values: list[float]) -> str:
    if not values:
        return "—"
    m, h = mean_ci(values)
    return f"{100 * m:.1f}" + (f" ± {100 * h:.1f}" if h is not None else " (1 seed)")


def arm_results(s: StudySettings) -> dict[str, dict[int, dict]]:
    """Every finished arm run by seed: the planned seeds and any others a worker ran (``study.py --seeds``)."""
    out: dict[str, dict[int, dict]] = {a: {} for a in s.arms}
    for a in s.arms:
        seeds = {int(f.stem[len(a) + 2:]) for f in s.results.glob(f"{a}_s*.json") if f.stem[len(a) + 2:].isdigit()}
        for seed in sorted(seeds | set(s.seeds)):
            r = read_json(s.results / f"{a}_s{seed}.json")
            if r is not None:
                out[a][seed] = r
    return out


@dataclass(frozen=True)
class Finished:
    """What the study has finished, read once from its JSON."""

    items: list[tuple[str, bool]]  # the work items and whether each is done
    pre: dict | None  # the PGD-AT pretraining
    branch: dict | None  # the branch point P
    lam: dict | None  # the λ sweep
    res: dict[str, dict[int, dict]]  # arm -> seed -> result
    branches: dict[str, dict | None]  # the branch checkpoints (epoch P), evaluated

    @property
    def done(self) -> int:
        return sum(d for _, d in self.items)

    @property
    def complete(self) -> bool:
        return self.done == len(self.items)


def read_finished(s: StudySettings) -> Finished:
    return Finished(items=plan(s), pre=read_json(s.results / "pgd_at_pretrain.json"), branch=read_json(s.results / "branch.json"),
                    lam=read_json(s.results / "lambda.json"), res=arm_results(s),
                    branches={ref: read_json(s.results / f"{ref}_branch_eval.json") for ref in ("pgd_at", "trades")})


def plot_overfitting(s: StudySettings, pre: dict, branch: dict | None, title: str, name: str) -> str:
    rows = pre["rows"]
    ep = [r["epoch"] for r in rows]
    ax = figure(7, 4).subplots()
    ax.plot(ep, [100 * r["val"]["pgd_acc"] for r in rows], "o-", ms=3, label="validation PGD-10 accuracy")
    ax.plot(ep, [100 * r["val"]["clean_acc"] for r in rows], "s-", ms=3, label="validation clean accuracy")
    ax.plot(ep, [100 * r["train"]["adv_acc"] for r in rows], ":", label=f"training accuracy on {s.text['train_attack']} examples")
    total = pre["summary"]["epochs"] if pre.get("summary") else len(rows)
    for e in (total // 2, (3 * total) // 4):
        ax.axvline(e + 0.5, color="grey", lw=0.8, ls="--")
    if branch:
        ax.axvline(branch["epoch"], color="C3", lw=1.5, label=f"branch point P = epoch {branch['epoch']}")
    ax.set_xlabel("epoch of PGD-AT (lr 0.1, ÷10 at the dashed lines)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(ax.figure, s.img / f"{s.img_prefix}{name}.png").name


def overfitting_text(s: StudySettings, pre: dict, branch: dict | None, title: str, name: str) -> list[str]:
    """The plot of one pretraining run and what it shows: does validation robustness fall after its peak?"""
    rows = pre["rows"]
    best = best_row(rows)
    last = rows[-1]
    drop = best["val"]["pgd_acc"] - last["val"]["pgd_acc"]
    acc = [r["val"]["pgd_acc"] for r in rows]
    w = min(5, len(acc))  # 5-epoch averages: one 1,000-image accuracy has a binomial standard error of ~1.4 points
    avg = [statistics.fmean(acc[i : i + w]) for i in range(len(acc) - w + 1)]
    peak = max(range(len(avg)), key=lambda i: avg[i])
    drop_avg = avg[peak] - avg[-1]
    n, p = last["val"]["n"], last["val"]["pgd_acc"]
    se = (p * (1 - p) / n) ** 0.5
    out = [f"![{name}](img/{plot_overfitting(s, pre, branch, title, name)})", "",
           f"Validation PGD-10 accuracy peaks at epoch {best['epoch']} ({100 * best['val']['pgd_acc']:.1f}%) and ends at "
           f"{100 * last['val']['pgd_acc']:.1f}% after epoch {last['epoch']} ({100 * drop:.1f} points lower), while accuracy on the "
           f"training attack reaches {100 * last['train']['adv_acc']:.1f}% (training loss {last['train']['loss']:.2f}). "
           f"Averaged over {w} epochs, to damp the ±{100 * se:.1f}-point standard error of one {n:,}-image measurement: "
           f"{100 * avg[peak]:.1f}% at its best (epochs {peak + 1}–{peak + w}) against {100 * avg[-1]:.1f}% over the last {w} epochs, "
           f"a drop of {100 * drop_avg:.1f} points.", ""]
    if drop_avg >= 0.03:
        out.append("That is clear robust overfitting: validation robustness falls after its peak while training robustness keeps "
                   "rising — the regime CLAT targets.")
    elif drop_avg >= 0.01:
        out.append("That is **mild** robust overfitting: validation robustness falls after its peak while training robustness keeps "
                   "rising, but by little more than the noise of the measurement — far less than the drop of several points Rice et al. "
                   "report for a PreAct ResNet-18 on full CIFAR-10. The room for any method to reduce overfitting here is correspondingly "
                   "small.")
    else:
        out.append("This budget does **not** reach clear robust overfitting (a drop under 1 point).")
    return out


def plot_curves(s: StudySettings, res: dict[str, dict[int, dict]]) -> str | None:
    ax = figure(7, 4).subplots()
    drawn = False
    for i, (a, by_seed) in enumerate(res.items()):
        if not by_seed:
            continue
        curves = [[r["val"]["pgd_acc"] for r in v["rows"]] for v in by_seed.values()]
        n = min(len(c) for c in curves)
        mean = [100 * statistics.fmean(c[e] for c in curves) for e in range(n)]
        ax.plot(range(1, n + 1), mean, marker="o", ms=3, ls="-" if ARMS[a][0] == "pgd_at" else "--", color=f"C{i}",
                label=f"{ARMS[a][3]} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")
        drawn = True
    if not drawn:
        return None
    ax.set_xlabel("epoch after the branch point")
    ax.set_ylabel("validation PGD-10 accuracy (%), mean over seeds")
    ax.set_title("The arms after the branch point")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(ax.figure, s.img / f"{s.img_prefix}curves.png").name


def plot_criticality(s: StudySettings, run: dict) -> str | None:
    hist = run["selection_history"]
    if not hist:
        return None
    ax = figure(8, 3.8).subplots()
    n = len(hist[0]["criticality"]) - 1  # the classifier (last layer) is not eligible by default: left out
    width = 0.8 / len(hist)
    for j, h in enumerate(hist):
        xs = [i - 0.4 + (j + 0.5) * width for i in range(n)]
        bars = ax.bar(xs, h["criticality"][:n], width=width, label=f"epoch {h.get('epoch_in_stage', h.get('stage_epoch', 0) + 1)}: chose "
                                                                   f"{', '.join(h['selected'])}")
        for i in h["selected_index"]:
            if i < n:
                bars[i].set_edgecolor("black")
                bars[i].set_linewidth(1.5)
    ax.set_xticks(range(n), [str(i) for i in range(n)], fontsize=7)
    ax.set_xlabel("layer index (execution order; the classifier is not eligible and not shown)")
    ax.set_ylabel("criticality C_i")
    ax.set_title(f"Criticality at each re-selection, CLAT arm, seed {run['seed']} (chosen: black edge)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(ax.figure, s.img / f"{s.img_prefix}criticality.png").name


def diff_cell(d: list[float]) -> str:
    """Differences (fractions) as a table cell: mean ± 95% CI in points, ``*`` where the interval excludes 0. Differences that
    are identical in every seed get no interval (a "± 0.0" would read as infinite precision)."""
    m, h = mean_ci(d)
    if h is not None and round(100 * h, 1) == 0:
        return f"{round(100 * m, 1) + 0.0:+.1f} (equal in all {len(d)} seeds)"
    return (f"{round(100 * m, 1) + 0.0:+.1f}"  # + 0.0: no "-0.0"
            + (f" ± {100 * h:.1f}" if h is not None else "") + (" *" if h is not None and abs(m) > h else ""))


def train_time(x: dict) -> float:
    """An arm item's training time (s): the wall time of its epochs less the time its process was stopped during them
    (``train_paused_s``, measured by the study's PauseMeter while timings or CI had the cores)."""
    return x["train_time_s"] - x.get("train_paused_s", 0.0)


def eval_time(r: dict) -> float:
    """An evaluation's time (s), less the time its process was stopped (``eval_paused_s``)."""
    return r["eval_time_s"] - r.get("eval_paused_s", 0.0)


def devices(names: list[str] | None) -> str:
    """Recorded machines in short form (``CPU + H100``); results from before they were recorded ran on the CPU."""
    return " + ".join(dict.fromkeys(short_device(d) for d in names or [LEGACY_DEVICE]))  # CPU at 2 then 1 thread: "CPU"


def paired_table(res: dict[str, dict[int, dict]], pairs: list[tuple[str, str]], head: str) -> list[str]:
    """Markdown rows: per-seed differences ``a − ref`` over the seeds both have, mean ± 95% CI, ``*`` where it excludes 0."""
    L = [f"| {head} | seeds | Δ clean | Δ PGD | Δ AutoAttack |", "|---|---|---|---|---|"]
    for a, ref in pairs:
        common = sorted(set(res.get(a, {})) & set(res.get(ref, {})))
        if not common:
            continue
        cells = [diff_cell([res[a][s]["test"][key] - res[ref][s]["test"][key] for s in common])
                 for key in ("clean_acc", "pgd20x5_acc", "aa_acc")]
        L.append(f"| {ARMS[a][3]} − {ARMS[ref][3]} | {len(common)} | " + " | ".join(cells) + " |")
    if len(L) == 2:
        L.append("| (no pair finished yet) | | | | |")
    return L


def branch_table(res: dict[str, dict[int, dict]], branches: dict[str, dict | None]) -> list[str]:
    """Markdown rows: each arm minus the (single, seedless) evaluation of the checkpoint it branched from, i.e.
    what its extra epochs bought over stopping at P. The interval is over the arm's seeds only."""
    L = ["| arm − its branch checkpoint | seeds | Δ clean | Δ PGD | Δ AutoAttack |", "|---|---|---|---|---|"]
    for a, by_seed in res.items():
        ref = branches[ARMS[a][0]]
        if ref is None or not by_seed:
            continue
        cells = [diff_cell([x["test"][key] - ref[key] for x in by_seed.values()]) for key in ("clean_acc", "pgd20x5_acc", "aa_acc")]
        L.append(f"| {ARMS[a][3]} | {len(by_seed)} | " + " | ".join(cells) + " |")
    return L


def compute_total(s: StudySettings, res: dict[str, dict[int, dict]], branches: dict[str, dict | None], pre: dict | None) -> list[str]:
    """One line: the measured hours behind the page, by machine (training and evaluation of every arm, the pretraining);
    what it leaves out names only what the page's study ran (a TRADES pretraining, the pilot run)."""
    train: dict[str, float] = {}
    evals: dict[str, float] = {}
    for v in res.values():
        for x in v.values():
            d = devices(x.get("train_devices"))
            train[d] = train.get(d, 0.0) + train_time(x)
    for r in [x["test"] for v in res.values() for x in v.values()] + [b for b in branches.values() if b is not None]:
        d = devices(r.get("eval_devices"))
        evals[d] = evals.get(d, 0.0) + eval_time(r)
    if not train:
        return []
    hours = lambda t: ", ".join((f"{v / 3600:.1f} h" if v >= 3600 else f"{v / 60:.0f} min") + f" on {d}" for d, v in sorted(t.items()))
    pre_txt = ""
    if pre and "summary" in pre:
        pre_txt = f"; the PGD-AT pretraining {pre['summary']['train_time_s'] / 3600:.1f} h on {devices(pre.get('train_devices'))}"
    paused = {f"{ARMS[x['arm']][3]} seed {x['seed']}" + (" (estimated after the fact)" if "paused_estimated" in x else ""):
              x.get("train_paused_s", 0.0) + x["test"].get("eval_paused_s", 0.0) for v in res.values() for x in v.values()}
    paused = {k: v for k, v in paused.items() if v > 0}
    left_out = [*(["the TRADES pretraining to P"] if uses_trades(s) else []), "the λ sweep's other runs",
                *(["the first attempt"] if s.pilot is not None else [])]
    left_out = ", ".join(left_out[:-1]) + " and " + left_out[-1] if len(left_out) > 1 else left_out[0]
    paused_txt = (f" Times are wall times less the time a worker was stopped while timings or CI had the cores "
                  f"({sum(paused.values()) / 3600:.1f} h, in {', '.join(paused)})." if paused else "")
    return [f"In total, the runs behind this page took: training the arms {hours(train)}{pre_txt}; evaluating them and the "
            f"branch checkpoints {hours(evals)}. Not counted: {left_out}.{paused_txt}"]


def discovery_section(s: StudySettings, res: dict[str, dict[int, dict]]) -> list[str]:
    """What the layer-discovery bug of clat 0.1 changed (study/discovery_recheck.json, scripts/study_recheck.py) and
    the items redone because of it (study/superseded/), old against new."""
    check = read_json(s.study / "discovery_recheck.json")
    superseded = {k: v for k, v in superseded_items(s).items() if not v["superseded_because"].startswith("re-run to keep per-image")}
    if check is None and not superseded:
        return []
    n_sel = sum(len(r.get("selection_history") or []) for v in res.values() for r in v.values() if ARMS[r["arm"]][1] == "clat")
    L = ["## The layer-discovery bug of clat 0.1: what it changed", ""]
    if check is not None:
        hits = check["hits"]
        L += [f"clat 0.1 decided that a layer \"reads the model input\" by comparing memory addresses, so a layer whose input was "
              "allocated where the stem's freed input had been got C = W (about 0.002 instead of 1-2) and could not be selected. "
              f"{len(hits)} recorded selections were hit (C_i = W_i for a layer i > 0). `scripts/study_recheck.py` replayed each "
              f"item's training to that epoch with "
              f"{next((h['replayed_with'] for h in hits if 'replayed_with' in h), 'the code that ran it')} "
              "and recomputed the criticality there with the fixed discovery, on the same batch and PGD start, with the arm's own "
              "denominator (`input`). The replay is not bit-identical to the recorded run, but its weaknesses agree "
              "with the recorded ones to the last column's relative difference, far below the margins that decide a choice:", ""]
        L += ["| item | stage epoch | layer hit | its C: recorded → fixed | recorded choice (C) | choice with the fix (C) | changed | "
              "replay vs record (max rel. diff. of W) |",
              "|---|---|---|---|---|---|---|---|"]
        for h in hits:
            if "fixed_selected" not in h:
                L.append(f"| {h['item']} | {h['stage_epoch']} | {', '.join(h.get('flagged') or map(str, h['flagged_index']))} | — | "
                         f"{', '.join(h['recorded_selected'])} | {h['why']} | no | — |")
                continue
            rec_c = dict((n, c) for n, c in h["recorded_top3"])
            fix_c = dict((n, c) for n, c in h["fixed_top3"])
            changes = ', '.join(f'{a:.4f} → {b:.3f}' for a, b in zip(h['recorded_criticality_flagged'], h['fixed_criticality_flagged']))
            L.append(f"| {h['item']} | {h['stage_epoch']} | {', '.join(h['flagged'])} | "
                     f"{changes} | "
                     f"{', '.join(f'{n} ({rec_c[n]:.3f})' if n in rec_c else n for n in h['recorded_selected'])} | "
                     f"{', '.join(f'{n} ({fix_c[n]:.3f})' if n in fix_c else n for n in h['fixed_selected'])} | "
                     f"{'**yes**' if h['changed'] else 'no'} | {h['replay_max_rel_diff_weakness']:.1e} |")
        changed = [h["item"] for h in hits if h.get("changed")]
        L += ["", f"So the bug changed the layer CLAT trained in {len(changed)} of the {len(hits)} hit selections"
              + (f" ({', '.join(changed)}); {'that item was' if len(changed) == 1 else 'those items were'} redone with the fixed code "
                 "(`python scripts/study.py --redo ITEM --why ...`), the same arm settings and seed." if changed else "; no item had to "
                                                                                                                      "be redone.")]
        if n_sel:
            L += [f"The CLAT arms recorded {n_sel} selections in all; every other one had no layer with C = W."]
        L += [""]
    rows = []
    for item, old in superseded.items():
        new = res.get(old["arm"], {}).get(old["seed"])
        t_old = old["test"]
        cells = [f"{100 * t_old[k]:.1f}" for k in ("clean_acc", "pgd20x5_acc", "aa_acc")]
        if new is not None:
            t_new = new["test"]
            cells = [f"{o} → {100 * t_new[k]:.1f}" for o, k in zip(cells, ("clean_acc", "pgd20x5_acc", "aa_acc"))]
            layers = " → ".join(", ".join(h["selected"]) for h in new["selection_history"])
        else:
            cells = [f"{c} → (not redone yet)" for c in cells]
            layers = "—"
        rows.append(f"| {item} | {old['superseded_because']} | {' | '.join(cells)} | {layers} |")
    if rows:
        L += ["Items redone (old → new, test accuracy in %; the tables above use the new result):", "",
              "| item | why | clean | PGD-20×5 | AutoAttack | layers trained after the fix (per selection) |",
              "|---|---|---|---|---|---|", *rows, ""]
    return L


def superseded_items(s: StudySettings) -> dict[str, dict]:
    return {f.stem: read_json(f) for f in sorted((s.study / "superseded").glob("*.json"))}


def _pts(x: float) -> str:
    return f"{round(100 * x, 1) + 0.0:+.1f}"


def _ci_txt(iv: dict | None) -> str:
    """An interval as the verdict table shows it: ``+2.2 [+1.6, +2.7]`` in points (— where it was not computed)."""
    if iv is None:
        return "—"
    if iv["ci"] is None:  # one seed: no interval over seeds
        return f"{_pts(iv['estimate'])} (1 seed)"
    lo, hi = iv["ci"]
    if round(100 * (hi - lo), 1) == 0:
        return f"{_pts(iv['estimate'])} (equal in all {iv['n_seeds']} seeds)"
    return f"{_pts(iv['estimate'])} [{_pts(lo)}, {_pts(hi)}]"


def _si_txt(m: dict, n: int) -> str:
    """A metric's seeds x images interval; where only some seeds kept records yet, theirs, named (``(seeds 0, 1 of 4)``)."""
    if m["seeds_images"] is not None:
        return _ci_txt(m["seeds_images"])
    part = m.get("seeds_images_partial")
    if part is None:
        return "—"
    return f"{_ci_txt(part)} (seeds {', '.join(map(str, part['seeds']))} of {n})"


def _p_txt(p: float | None) -> str:
    return "—" if p is None else ("< 0.0001" if p < 1e-4 else f"{p:.4f}" if p < 0.01 else f"{p:.3f}")


def verdict_rows(v: dict, family: str) -> list[str]:
    L = ["| comparison | seeds | Δ AutoAttack, over seeds | over seeds × images | p | Holm p | Δ clean, over seeds × images | "
         "validation Δ PGD-10 (over seeds) | validation vs test |", "|---|---|---|---|---|---|---|---|---|"]
    for c in v["comparisons"]:
        if c["family"] != family or "aa" not in c["metrics"]:
            continue
        aa, clean = c["metrics"]["aa"], c["metrics"]["clean"]
        stage = "" if "/" not in aa["outcome"] else f" (after {aa['outcome'].split('/')[1].upper()})"
        p = primary_p(c)
        L.append(f"| {c['label']}{stage} | {len(c['seeds'])} | {_ci_txt(aa['over_seeds'])} | {_si_txt(aa, len(c['seeds']))} | "
                 f"{_p_txt(p)}{'' if aa['seeds_images'] else ' (seeds)'} | {_p_txt(c.get('p_holm'))} | "
                 f"{_si_txt(clean, len(c['seeds'])) if clean['seeds_images'] else _ci_txt(clean['over_seeds']) + ' (seeds)'} | "
                 f"{_ci_txt(c['validation_pgd10'])} | {c['validation_pgd10']['agrees_with_test'] or '—'} |")
    return L


def variants_rows(s: StudySettings, v: dict) -> list[str]:
    """The primary comparisons repeated by the variants of this study (a second network, the overfitted start: ``study.py
    --variant``), as far as they are done; each variant's verdict goes into ``v["variants"]`` (study/verdict.json) too."""
    if not s.variants:
        return []
    L = ["### The same primary comparisons on a second network and from the overfitted start", "",
         "Each variant runs the CPU study's recipe, λ sweep and evaluation with the arms of the primary comparisons only (4 seeds, "
         "per-image records, standard AutoAttack); its Holm adjustment is over its own four primary comparisons, declared with "
         "these. Its full page: `docs/results_<variant>.md`.", "",
         "| network, start | comparison | seeds | Δ AutoAttack, over seeds | over seeds × images | p | Holm p | Δ clean, over seeds |",
         "|---|---|---|---|---|---|---|---|"]
    v["variants"] = {}
    for name in s.variants:
        vs = StudySettings.variant(name)
        vv = v["variants"][name] = verdict(vs, arm_results(vs), [])
        where = f"{vs.text['title']} (`--variant {name}`)"
        prim = [c for c in vv["comparisons"] if c["family"] == "primary" and "aa" in c["metrics"]]
        items = plan(vs)
        if not prim:
            L.append(f"| {where} | none finished yet ({sum(d for _, d in items)} of {len(items)} work items done) | | | | | | |")
        for c in prim:
            aa = c["metrics"]["aa"]
            L.append(f"| {where} | {c['label']} | {len(c['seeds'])} | {_ci_txt(aa['over_seeds'])} | {_si_txt(aa, len(c['seeds']))} | "
                     f"{_p_txt(primary_p(c))}{'' if aa['seeds_images'] else ' (seeds)'} | {_p_txt(c.get('p_holm'))} | "
                     f"{_ci_txt(c['metrics']['clean']['over_seeds'])} |")
    return [*L, ""]


def verdict_section(s: StudySettings, f: Finished) -> list[str]:
    """study/verdict.json (every comparison, both intervals, Holm over the primary family) and its tables."""
    v = verdict(s, f.res, PAIRS + CLAT_PAIRS)
    across = variants_rows(s, v)
    s.study.mkdir(parents=True, exist_ok=True)
    (s.study / "verdict.json").write_text(json.dumps(v, indent=1, allow_nan=False) + "\n")  # strict JSON: jq and browsers read it
    g = stage_gains(s)
    times = aa_time_per_chunk(s)
    L = ["## Verdict: every comparison with its noise", "",
         f"Rendered from `{_rel(s.study)}/verdict.json`. Each row is `a − b` on the test images, in percentage points. "
         "**Over seeds**: the mean "
         "per-seed difference with its Student-t 95% interval; every seed is scored on the same images, so this interval leaves "
         "out which images the test set happens to hold. **Over seeds × images**: a two-way bootstrap that resamples seeds and "
         "test images independently (10,000 replicates; it needs both sides' per-image records, kept since issue 34; it is "
         "mildly conservative; where only some seeds have records yet, because the others wait for their re-run, it is shown over "
         "those seeds, named, and not used for p). **p**: two-sided, from the seeds × images bootstrap where records exist "
         "(else the paired t-test "
         "over seeds, marked); **Holm p**: adjusted over the primary family only. **Validation**: the same difference in "
         "validation PGD-10 accuracy at the last epoch (the branch checkpoint: at the branch point), which chose every setting; "
         "the last column says whether it points the same way as the test's AutoAttack difference.", "",
         f"### Primary comparisons (declared before their re-runs{'' if v['primary_complete'] else '; not all finished yet'})", "",
         *verdict_rows(v, "primary"), "", *across,
         "### Exploratory comparisons (not adjusted for multiplicity; read them as leads, not findings)", "",
         *verdict_rows(v, "exploratory"), "",
         "Rows marked *(after APGD-T)* compare a screening arm (scored with standard AutoAttack's first two stages) on those "
         "stages for both sides; a standard evaluation's record holds its state after every stage, so both face the same attacks.", ""]
    if g["chunks"]:
        L += [f"**Is standard AutoAttack's second half needed here?** In {g['chunks']} standard AutoAttack chunks of this study "
              f"({g['images']:,} image evaluations), FAB-T and Square fooled **{g['images_fooled_only_by_fab_t_or_square']}** images "
              "that APGD-CE and APGD-T had not (from the library's logged accuracy after each stage, exact at 250 images a chunk)"
              + (f"; the per-image records of {g['record_chunks']} chunks ({g['record_images']:,} images) confirm it image by image: "
                 f"{g['record_images_fooled_only_by_fab_t_or_square']} such images" if g["record_chunks"] else "")
              + (". The screening arms are therefore scored with APGD-CE + APGD-T only; the arms of the primary comparisons keep "
                 "standard AutoAttack." if s.screen_arms else ". Every arm of this study is scored with standard AutoAttack.")]
        if times["standard"] and times["screening"]:
            st, sc = statistics.fmean(times["standard"]), statistics.fmean(times["screening"])
            L[-1] += (f" Measured: {sc / 60:.1f} min per {s.aa_chunk}-image chunk against {st / 60:.1f} min for standard AutoAttack "
                      f"(means over {len(times['screening'])} and {len(times['standard'])} chunks of this study, same machine kind), "
                      f"a saving of {100 * (1 - sc / st):.0f}%.")
        lt = later_stage_time(s)
        if lt["chunks"]:
            per = lambda v: f"{v / lt['chunks'] / 60:.1f}"
            L[-1] += (f" Timed stage by stage in {lt['chunks']} standard chunks, FAB-T and Square took "
                      f"{100 * lt['later_s'] / lt['total_s']:.0f}% of standard AutoAttack's time ({per(lt['later_s'])} of "
                      f"{per(lt['total_s'])} min per chunk): what the screening saves.")
        L.append("")
    L += reproduction_rows(s, f)
    return L


def reproduction_rows(s: StudySettings, f: Finished) -> list[str]:
    """The first run's results of the re-run arms against the re-run (same code, settings and seed): does training reproduce?"""
    rows = []
    for item, old in superseded_items(s).items():
        if not old["superseded_because"].startswith("re-run to keep per-image") or "arm" not in old:
            continue
        new = f.res.get(old["arm"], {}).get(old["seed"])
        if new is None:
            continue
        same_layers = [h["selected"] for h in old["selection_history"]] == [h["selected"] for h in new["selection_history"]]
        cells = [f"{100 * old['test'][k]:.1f} → {100 * new['test'][k]:.1f}" for k in ("clean_acc", "pgd20x5_acc", "aa_acc")]
        rows.append(f"| {item} | {' | '.join(cells)} | {'yes' if same_layers else '**no**'} | "
                    f"{max(abs(a['val']['pgd_acc'] - b['val']['pgd_acc']) for a, b in zip(old['rows'], new['rows'])) * 100:.1f} |")
    if not rows:
        return []
    return ["**Does training reproduce?** The arms of the primary comparisons were re-trained (same code path, settings and seed; "
            "another CPU thread count changes only the order of sums) to keep per-image records and weights:", "",
            "| item | clean: first run → re-run | PGD-20×5 | AutoAttack | same layers selected | "
            "max |Δ| of validation PGD-10 over epochs (points) |",
            "|---|---|---|---|---|---|", *rows, ""]


def head(s: StudySettings, f: Finished) -> list[str]:
    status = f"**Status: {f.done} of {len(f.items)} work items done**" + (" — the study is complete." if f.complete else
             f" — the study is in progress; `{s.text['command'].replace('.venv/bin/', '')}` continues it (every finished piece is "
             f"kept in `{_rel(s.study)}/`).")
    return [f"# Does CLAT help? A controlled study on {s.text['title']}", "",
            "<!-- generated by scripts/study_report.py from study/results/*.json; do not edit by hand -->", "", status, ""]


def arms_text(s: StudySettings) -> list[str]:
    """The design's sentences on the arms, then its bullet on their criticality: the CPU study's narrative when it runs every
    arm, else the arms it runs (a variant: the arms of the primary comparisons)."""
    if set(s.arms) == set(ARMS):
        return [f"PGD-AT continued on the full model; CLAT ({s.text['k']}); CLAT with random layers; CLAT non-dynamic; "
         "CLAT with CE on x+δ*; RiFT; LoRA (rank 8 on every conv, peft). TRADES → TRADES + CLAT: a TRADES run of the same schedule "
         "stopped at P, then CLAT, against TRADES continued. Added with clat 0.2: CLAT with the paper's Eq. 6 (fixed λ, and automatic "
         "λ = ρ·CE/L_C set at each selection) and random layers with automatic λ, so that the random control gets the same λ rule; "
         "and CLAT on the deepest eligible layer with automatic λ (`clat.selection=deepest`), because depth predicted the layer "
         "oracle of docs/criticality.md better than Eq. 6 on this network. The deepest-layer rule does not depend on the model's "
         "state, so its re-selections always return the same layer: it is non-dynamic in effect, and cannot be otherwise.",
                "- **Criticality of the CLAT arms**: the arms of clat 0.1 (CLAT, its non-dynamic and CE-on-x+δ* ablations, TRADES + CLAT) "
         "use `clat.criticality.denominator=input` (each layer's W divided by the W of the tensor it reads, after its activation), "
         "clat 0.1's default, named in every such arm's config so that each arm stays one variant. The arms added with clat 0.2 "
         "use the paper's Eq. 6 (`denominator=upstream`, the default since clat 0.2), which ranks the layers differently (see the "
         "table of the bug below); the random-layer and deepest-layer arms choose their layers without it (criticality is still measured "
         "and logged). "
         "TRADES crafts its attack with batch statistics (`trades.attack_mode=train`, clat 0.1's choice; the reference code uses eval "
         "mode)."]
    return ["; ".join(ARMS[a][3] for a in s.arms) + f". CLAT: {s.text['k']}; automatic λ = ρ·CE/L_C set at each selection (ρ = 1: "
            "this project's rule, not the paper's). The Eq. 6 arms rank layers with the paper's Eq. 6 (`denominator=upstream`); the "
            "random-layer arms choose their layers without it (criticality is still measured and logged)."]


def design_section(s: StudySettings, f: Finished) -> list[str]:
    arms, *criticality = arms_text(s)
    L = ["## Design", "",
         f"- **Data**: {s.text['data']}",
         f"- **Model and pretraining**: {s.text['model']}",
         f"- **Branch point P**: {s.text.get('branch', 'the pretraining epoch with the highest validation PGD-10 accuracy')}. Every arm "
         f"starts from that "
         f"checkpoint and trains {s.f_epochs} more epochs with the same optimizer settings (SGD, lr 0.01 with cosine decay): "
         + arms, *criticality,
         f"- **λ** of CLAT: swept over {', '.join(f'{v:g}' for v in s.lambdas)} on the validation split (seed 0), the best used by every "
         f"CLAT arm with fixed λ (the arms with automatic λ set λ = ρ·CE/L_C at each selection, ρ = 1).",
         f"- **Seeds**: {len(s.seeds)} per arm (data order, augmentation, attack starts; the same seed gives two arms the same data "
         f"order). "
         "The final checkpoint of each arm is evaluated (no early stopping: every arm gets the same epochs)."]
    res = f.res
    if len({train_device(r) for v in res.values() for r in v.values()}) > 1:
        seeds = sorted({seed for v in res.values() for seed in v})
        kinds = {seed: sorted({short_device(d) for v in res.values() if seed in v
                               for d in v[seed].get("train_devices") or [LEGACY_DEVICE]}) for seed in seeds}
        mixed = [seed for seed in seeds if len(kinds[seed]) > 1]
        L.append(f"- **Machines**: trained with {devices_by_seed(res)} (the GPU with `scripts/study_gpu.sh`, one worker per arm), with the "
                 "same code, configs and fp32 arithmetic (a CPU's thread count changes only the order of its sums). "
                 + ("; ".join(f"Seed {seed}'s arms ran on {' and '.join(kinds[seed])}" for seed in mixed)
                    + ", so paired differences in that seed compare machines too." if mixed else
                    "All arms of a seed were trained on the same machine, so the paired comparison never compares machines.")
                 + " Where an arm's evaluation was split between machines, each attack chunk records its own (`study/eval/`).")
    aa_text = ("standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square; `pyautoattack`)" if s.aa_version == "standard"
               else f"AutoAttack version `{s.aa_version}` (`pyautoattack`)")
    L += [f"- **Evaluation** (test images): clean and PGD-{s.pgd['steps']} accuracy, worst case of {s.pgd['restarts']} restarts, on all "
          f"{s.n_test_pgd:,}; {aa_text} on the first {s.n_test_aa:,}. "
          "95% confidence intervals are Student-t intervals over seeds; the paired comparison takes per-seed differences.", ""]
    return L


def overfitting_section(s: StudySettings, f: Finished) -> list[str]:
    L = ["## Does PGD-AT overfit here?", ""]
    if s.pilot is not None and (pilot := read_json(s.results / f"{s.pilot[0]}.json")) is not None:
        L += [f"### {s.pilot[2]} (`{_rel(s.pilot[1])}`)", "", *overfitting_text(s, pilot, None, s.pilot[2], s.pilot[0]), "", s.pilot[3], "",
              f"### The study's pretraining (`{_rel(s.pretrain_cfg)}`)", ""]
    if f.pre is None:
        L.append("Not measured yet (the pretraining run is in progress).")
    else:
        L += overfitting_text(s, f.pre, f.branch, s.text["plot_title"], "overfitting")
    return L + [""]


def lambda_section(f: Finished) -> list[str]:
    if f.lam is None:
        return []
    return ["## λ (validation split, seed 0)", "", "| λ | final val clean | final val PGD-10 |", "|---|---|---|",
            *(f"| {v}{' (chosen)' if float(v) == f.lam['chosen'] else ''} | {100 * r['clean_acc']:.1f}% | {100 * r['pgd_acc']:.1f}% |"
              for v, r in f.lam["final_val"].items()), ""]


def arm_row(a: str, v: list[dict]) -> str:
    """One arm's row of the results table: its seeds' test accuracies, trainable parameters and training time."""
    if not v:
        return f"| {ARMS[a][3]} | 0 | — | — | — | — | — | — |"
    tps, tot = sorted({x["trainable_params"] for x in v}), v[0]["total_params"]
    # Layer choices can differ between seeds (random layers): show the range, not seed 0's count.
    tp_txt = (f"{tps[0]:,} ({100 * tps[0] / tot:.1f}%)" if len(tps) == 1 else
              f"{tps[0]:,}–{tps[-1]:,} ({100 * tps[0] / tot:.1f}–{100 * tps[-1] / tot:.1f}%)")
    by_dev: dict[str, list[float]] = {}
    for x in v:
        by_dev.setdefault(devices(x.get("train_devices")), []).append(train_time(x))
    t_txt = " · ".join(f"{statistics.fmean(ts) / 60:.1f} min ({d} ×{len(ts)})" for d, ts in by_dev.items())
    return (f"| {ARMS[a][3]} | {len(v)} | {fmt([x['test']['clean_acc'] for x in v])} | {fmt([x['test']['pgd20x5_acc'] for x in v])} | "
            f"{fmt([x['test']['pgd20x5_acc_aa_images'] for x in v])} | {fmt([x['test']['aa_acc'] for x in v])} | {tp_txt} | {t_txt} |")


def results_section(s: StudySettings, f: Finished) -> list[str]:
    L = ["## Results on the test images", "",
         "Mean ± 95% CI over seeds, in %. Trainable parameters are those of the last epoch; time is training time per arm, the mean "
         "on each machine (× the number of seeds it trained).", "",
         f"Clean and PGD on all {s.n_test_pgd:,} test images; AutoAttack on the first {s.n_test_aa:,}, with PGD on those same images "
         "beside it (AutoAttack should never be above it).", "",
         f"| arm | seeds | clean | PGD-{s.pgd['steps']} (worst of {s.pgd['restarts']}) | PGD, AA images | AutoAttack | trainable params | "
         f"train time |",
         "|---|---|---|---|---|---|---|---|"]
    for ref, r in f.branches.items():
        if r is not None:
            L.append(f"| *branch checkpoint ({'PGD-AT' if ref == 'pgd_at' else 'TRADES'}, epoch P)* | — | {100 * r['clean_acc']:.1f} | "
                     f"{100 * r['pgd20x5_acc']:.1f} | {100 * r['pgd20x5_acc_aa_images']:.1f} | {100 * r['aa_acc']:.1f} | — | — |")
    return L + [arm_row(a, list(by_seed.values())) for a, by_seed in f.res.items()] + [""]


def comparisons_section(f: Finished) -> list[str]:
    return ["### Paired comparison (per-seed difference, percentage points, mean ± 95% CI)", "",
            *paired_table(f.res, PAIRS, "arm − reference"), "",
            "### CLAT against its ablations and the other parameter-efficient methods (per-seed difference, same form)", "",
            *paired_table(f.res, CLAT_PAIRS, "CLAT − arm"), "",
            "### Each arm against early stopping (the branch checkpoint it started from; same form)", "",
            "What the arm's extra epochs bought over stopping at P. The branch checkpoint is one model evaluated on the same test "
            "images, so the interval covers only the arm's variation over seeds.", "",
            *branch_table(f.res, f.branches), "",
            "`*`: the 95% interval excludes 0.", ""]


def curves_and_layers_section(s: StudySettings, f: Finished) -> list[str]:
    """The training curves of the arms, and the layers the CLAT arm chose at each selection."""
    L = []
    img = plot_curves(s, f.res)
    if img:
        L += ["## Training curves", "", f"![curves](img/{img})", ""]
    clat_runs = [r for _, r in sorted(f.res.get("clat", {}).items())]
    if clat_runs:
        n = len(clat_runs[0]["selection_history"])
        L += ["## Critical layers over time (CLAT arm)", "",
              "| seed | " + " | ".join(f"selection {i + 1}" for i in range(n)) + " |", "|---|" + "---|" * n]
        L += [f"| {r['seed']} | " + " | ".join(f"{', '.join(h['selected'])} (C = "
                                               f"{max(h['criticality'][i] for i in h['selected_index']):.2f})"
                                              for h in r["selection_history"]) + " |" for r in clat_runs]
        L.append("")
        img = plot_criticality(s, clat_runs[0])
        if img:
            L += [f"![criticality](img/{img})", ""]
    return L


def conclusions_section(s: StudySettings, f: Finished) -> list[str]:
    conclusions = s.study / "conclusions.md"  # written by hand once the numbers are in
    if conclusions.is_file():
        text = conclusions.read_text().strip()
    elif not f.complete:
        text = "Not drawn yet: the study is incomplete, and partial numbers (fewer seeds, missing arms) would invite the wrong reading."
    else:
        text = "The study is complete; its conclusions are to be written into `study/conclusions.md` (rendered here)."
    return ["## Conclusions", "", text, ""]


def reproduce_section(s: StudySettings, f: Finished) -> list[str]:
    evals: dict[str, list[float]] = {}  # evaluation time per run, by the machine(s) that evaluated it
    for v in f.res.values():
        for x in v.values():
            evals.setdefault(device_names(x["test"].get("eval_devices")), []).append(eval_time(x["test"]))
    cost = ("; ".join(f"{statistics.fmean(t) / 60:.0f} min per run on {d} ({len(t)} runs)" for d, t in evals.items()) if evals
            else "its own time")
    return ["## Reproduce", "", "```bash",
            "make install                                   # the package (as `make test` does)",
            f"{s.text['command']} --hours 2    # repeat until it says the study is complete; resumes where it stopped",
            f"{s.text['command']} --report     # re-render this page from {_rel(s.results)}/",
            "```", "",
            f"A clean clone holds every finished piece in `{_rel(s.study)}/`, so these commands only re-render. To re-measure every number "
            f"from scratch, remove `{_rel(s.study)}/` and `{_rel(s.runs)}/` first: the same commands then redo the pretraining, the λ "
            f"sweep "
            "and every arm and evaluation." + (" A seed's arms can also be trained on one GPU, one worker per arm, with `bash "
                                               "scripts/study_gpu.sh SEED` (as seed 3 was)." if s.text.get("gpu_workers") else ""), "",
            *(["The same study at paper scale on a GPU (full CIFAR-10/100 downloaded and verified, 50 + 50 epochs): "
               + ", ".join(f"`python scripts/study.py --scale {p} --data-root DATA`" for p in PAPER_SCALE)
               + " (configs in `configs/study/paper/`; each renders its own `docs/results_<preset>.md`).", ""] if s.variants else []),
            f"Measured cost: the training times are in the table above; evaluation adds {cost}. " + s.text["sessions"], ""]


def render(s: StudySettings) -> None:
    """Write ``s.doc`` and its plots (in ``s.img``) from what the study has finished."""
    s.img.mkdir(parents=True, exist_ok=True)
    f = read_finished(s)
    L = [*head(s, f), *design_section(s, f), *overfitting_section(s, f), *lambda_section(f), *results_section(s, f),
         *verdict_section(s, f), *comparisons_section(f), *curves_and_layers_section(s, f), *discovery_section(s, f.res),
         *conclusions_section(s, f),
         *reproduce_section(s, f), *compute_total(s, f.res, f.branches, f.pre)]
    s.doc.write_text("\n".join(L) + "\n")


if __name__ == "__main__":
    render(StudySettings.cpu())
