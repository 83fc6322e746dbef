"""The study's verdict: every comparison with an interval over seeds and one over seeds and test images -> study/verdict.json.

Each comparison ``a − b`` (two arms, or an arm and the branch checkpoint it started from) is measured on the test
images with the same attack. Three numbers per metric:
- the mean per-seed difference with a Student-t interval over seeds (what docs/results.md showed before issue 34:
  it leaves out that every seed is scored on the same images);
- where both sides kept per-image records, a two-way bootstrap over seeds and images (:func:`clat.base.stats.seeds_images_bootstrap`),
  which covers both sources of noise, and its p-value;
- the same difference on the validation split (PGD-10 at the last epoch, over seeds): does validation point the same way?
The primary comparisons are declared in ``study_settings.PRIMARY`` before their re-runs; Holm's adjustment is over that
family only, and every other comparison is labelled exploratory.

Imported by study_report (never by study_settings); it reads only what the study wrote.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from clat.eval.records import EvalRecord, load_record, record_path
from clat.base.stats import holm, seeds_images_bootstrap, t_interval
from study_settings import ARMS, SCREEN_STAGES, StudySettings, read_json

BRANCH = "branch"  # the checkpoint every PGD-AT arm starts from (early stopping), as the right-hand side of a comparison
# metric -> (the result's test key, the record's outcome, the record file(s) it is in)
METRICS = {"aa": ("aa_acc", "aa", "aa"), "pgd": ("pgd20x5_acc", "pgd", "pgd"), "clean": ("clean_acc", "clean", "pgd")}
# Exploratory comparisons beyond the report's paired tables: what the λ arms and the extra seeds were run for.
EXPLORATORY = [("clat_paper_auto", "clat_paper_lam21"), ("clat_paper_lam21", "clat_random_lam21"), ("clat_paper_lam21", "clat_paper"),
               ("clat_random_auto", "clat_random_lam21"), ("clat_paper_lam21", "pgd_at_cont"), ("clat_paper_lam21", BRANCH),
               ("clat_paper", "pgd_at_cont"), ("clat_random_auto", "pgd_at_cont"), ("clat_random", "pgd_at_cont"),
               ("clat_deepest_auto", "clat_paper_auto"), ("pgd_at_cont", BRANCH), ("clat_paper", BRANCH)]


def label(arm: str) -> str:
    return "branch checkpoint (early stopping)" if arm == BRANCH else ARMS[arm][3]


def _eval_dir(s: StudySettings, item: str) -> Path:
    return s.study / "eval" / item


def item_record(s: StudySettings, item: str, which: str) -> EvalRecord | None:
    """The per-image record of one evaluated model (``item``: ``clat_paper_auto_s0`` or ``pgd_at_branch``): ``pgd`` (clean
    and PGD on every test image) or ``aa`` (AutoAttack's chunks joined). None where the item kept none."""
    d = _eval_dir(s, item)
    if which == "pgd":
        f = record_path(d / "pgd.json")
        return load_record(f) if f.is_file() else None
    chunks = sorted(d.glob("aa_*.json"))
    files = [record_path(c) for c in chunks]
    if not chunks or not all(f.is_file() for f in files):
        return None
    return EvalRecord.concat([load_record(f) for f in files])


def outcome_for(s: StudySettings, a: str, b: str, metric: str) -> str:
    """The record outcome a metric compares: AutoAttack's final verdict, or its APGD-T stage when either side was screened
    with AutoAttack's first stages only (so that both sides face the same attacks)."""
    if metric == "aa" and s.aa_version == "apgd-ce":
        return "apgd-ce"  # the smoke check's stand-in for AutoAttack (StudySettings.smoke)
    if metric == "aa" and (a in s.screen_arms or b in s.screen_arms) and s.aa_version == "standard":
        return f"aa/{SCREEN_STAGES[-1]}"
    return METRICS[metric][1]


def _test_value(s: StudySettings, test: dict, metric: str, outcome: str, item: str) -> float:
    """A model's test accuracy for the comparison: from its result's ``test`` dict, or, where the comparison uses a stage of
    AutoAttack, the accuracy after that stage (the result's, else its chunks' logged ones)."""
    if outcome in ("aa", "pgd", "clean", "apgd-ce"):
        return test[METRICS[metric][0]]
    stage = outcome.split("/", 1)[1]
    after = test.get("aa_acc_after") or {}
    if stage in after:
        return after[stage]
    chunks = [read_json(p) for p in sorted(_eval_dir(s, item).glob("aa_*.json"))]
    if not chunks or any(stage not in (c.get("robust_acc_after") or {}) for c in chunks):
        raise KeyError(stage)
    return sum(c["robust_acc_after"][stage] * c["n"] for c in chunks) / sum(c["n"] for c in chunks)


def _bootstrap(ra: list[EvalRecord], rb: list[EvalRecord], outcome: str, branch: bool, n_boot: int) -> dict:
    """The seeds x images bootstrap of ``a − b`` on the images every record holds (``rb``: one model, the branch, when ``branch``)."""
    common = ra[0].indices
    for r in ra[1:] + rb:
        common = np.intersect1d(common, r.indices)
    A = np.stack([r.select(common)[outcome] for r in ra])
    B = rb[0].select(common)[outcome] if branch else np.stack([r.select(common)[outcome] for r in rb])
    return seeds_images_bootstrap(A, B, n_boot=n_boot).to_dict()


def _val(row_or_branch: dict) -> float:
    return row_or_branch["pgd_acc"]


def compare(s: StudySettings, res: dict[str, dict[int, dict]], branch_eval: dict | None, branch_point: dict | None,
            a: str, b: str, family: str, n_boot: int = 10_000) -> dict | None:
    """One comparison ``a − b`` (see the module docstring); None when nothing of it is finished."""
    seeds = sorted(set(res.get(a, {})) & (set(res.get(b, {})) if b != BRANCH else set(res.get(a, {}))))
    if not seeds or (b == BRANCH and branch_eval is None):
        return None
    out = {"a": a, "b": b, "label": f"{label(a)} − {label(b)}", "family": family, "seeds": seeds, "metrics": {}}
    for metric in METRICS:
        outcome = outcome_for(s, a, b, metric)
        try:
            va = [_test_value(s, res[a][sd]["test"], metric, outcome, f"{a}_s{sd}") for sd in seeds]
            vb = ([_test_value(s, branch_eval, metric, outcome, "pgd_at_branch")] * len(seeds) if b == BRANCH else
                  [_test_value(s, res[b][sd]["test"], metric, outcome, f"{b}_s{sd}") for sd in seeds])
        except KeyError:
            continue  # a first-run result that does not hold this stage
        over_seeds = t_interval([x - y for x, y in zip(va, vb)])
        m = {"outcome": outcome, "a": statistics.fmean(va), "b": statistics.fmean(vb), "over_seeds": over_seeds.to_dict(),
             "seeds_images": None}
        which = METRICS[metric][2]
        ra = {sd: item_record(s, f"{a}_s{sd}", which) for sd in seeds}
        rb = ({sd: item_record(s, "pgd_at_branch", which) for sd in seeds} if b == BRANCH else
              {sd: item_record(s, f"{b}_s{sd}", which) for sd in seeds})
        recorded = [sd for sd in seeds if ra[sd] is not None and rb[sd] is not None]
        if recorded:
            iv = _bootstrap([ra[sd] for sd in recorded], [rb[sd] for sd in recorded], outcome, b == BRANCH, n_boot)
            # all seeds recorded: the interval of the comparison; some only (the others still to be re-run with records):
            # shown beside it, with its seeds, and not used for p
            m["seeds_images" if recorded == seeds else "seeds_images_partial"] = {**iv, "seeds": recorded}
        out["metrics"][metric] = m
    # validation: PGD-10 on the held-out split at the last epoch (the branch: at the branch point)
    vals_a = [_val(res[a][sd]["rows"][-1]["val"]) for sd in seeds]
    vals_b = ([_val(branch_point["val"])] * len(seeds) if b == BRANCH else [_val(res[b][sd]["rows"][-1]["val"]) for sd in seeds])
    v = t_interval([x - y for x, y in zip(vals_a, vals_b)])
    aa = out["metrics"].get("aa")
    vd = v.to_dict()
    out["validation_pgd10"] = {**vd, "agrees_with_test": None if aa is None else
                               _agreement(v.estimate, vd["ci"], aa["over_seeds"]["estimate"], aa["over_seeds"]["ci"])}
    return out


def _agreement(ve: float, vci, te: float, tci) -> str:
    """How the validation difference and the test (AutoAttack) difference relate, in words the report uses (an interval
    of None: one seed, no interval over seeds, so only the signs are compared)."""
    excl = lambda ci: ci[0] > 0 or ci[1] < 0
    if vci is None or tci is None:
        return ("same sign" if np.sign(ve) == np.sign(te) else "opposite sign") + " (1 seed: no interval)"
    if np.sign(ve) == np.sign(te):
        return "same sign" + (", both intervals exclude 0" if excl(vci) and excl(tci) else "")
    return "opposite sign" + (" (both intervals exclude 0: they disagree)" if excl(vci) and excl(tci) else " (at least one interval spans "
                                                                                                           "0)")


def primary_p(c: dict) -> float | None:
    """The p-value a comparison enters Holm's family with: over seeds and images where records allow, else over seeds."""
    aa = c["metrics"].get("aa")
    if aa is None:
        return None
    return (aa["seeds_images"] or aa["over_seeds"])["p"]


def verdict(s: StudySettings, res: dict[str, dict[int, dict]], pairs: list[tuple[str, str]], n_boot: int = 10_000) -> dict:
    """Every comparison of the study (the primary family first), with Holm-adjusted p over the primary family."""
    branch_eval = read_json(s.results / "pgd_at_branch_eval.json")
    branch_point = read_json(s.results / "branch.json")
    wanted = [(a, b, "primary") for a, b in s.primary]
    wanted += [(a, b, "exploratory") for a, b in [*pairs, *EXPLORATORY] if (a, b) not in s.primary]
    seen, comps = set(), []
    for a, b, fam in wanted:
        if (a, b) in seen or (a != BRANCH and a not in s.arms) or (b != BRANCH and b not in s.arms):
            continue
        seen.add((a, b))
        c = compare(s, res, branch_eval, branch_point, a, b, fam, n_boot)
        if c is not None:
            comps.append(c)
    prim = [c for c in comps if c["family"] == "primary" and primary_p(c) is not None]
    for c, p in zip(prim, holm([primary_p(c) for c in prim])):
        c["p_holm"] = p
    declared = [f"{label(a)} − {label(b)}" for a, b in s.primary]
    return {"generated_by": "scripts/study_report.py (scripts/study_verdict.py)", "network": s.text.get("network", "resnet18_w16"),
            "start": s.text.get("branch", "the pretraining epoch with the highest validation PGD-10 accuracy") + " (P)",
            "images": {"pgd": s.n_test_pgd, "aa": s.n_test_aa, "split": "test"},
            "primary_family": declared, "primary_complete": len(prim) == len(s.primary),
            "method": {"over_seeds": "mean of per-seed differences, Student-t 95% interval, paired t-test p",
                       "seeds_images": f"two-way bootstrap over seeds and test images ({n_boot:,} replicates, percentile 95% interval; "
                                       "p from the normal approximation with the bootstrap standard error); needs per-image records",
                       "holm": "Holm's step-down adjustment over the primary family, each entering with its seeds x images p "
                               "(over-seeds p where a side has no records)"},
            "comparisons": comps}


def stage_gains(s: StudySettings) -> dict:
    """Did FAB-T and Square ever fool an image that APGD-CE and APGD-T had not? Counted over every standard AutoAttack chunk
    the study ran (the first run's, set aside or not, from the library's logged accuracies after each stage: 2 decimals of a
    percent, i.e. exact for chunks of 250) and, image by image, over the per-image records."""
    chunks = [p for root in (s.study / "eval", s.study / "superseded" / "eval") for p in sorted(root.glob("*/aa_*.json"))]
    n_chunks = gained = images = 0
    for p in chunks:
        c = read_json(p)
        after = c.get("robust_acc_after") or {}
        if c.get("version") != "standard" or "square" not in after or "apgd-t" not in after:
            continue
        n_chunks += 1
        images += c["n"]
        gained += round((after["apgd-t"] - after["square"]) * c["n"])
    rec_images = rec_gained = rec_chunks = 0
    for p in [p for p in chunks if record_path(p).is_file()]:
        r = load_record(record_path(p))
        if "aa/square" in r.outcomes and "aa/apgd-t" in r.outcomes:
            rec_chunks += 1
            rec_images += r.n
            rec_gained += int((r["aa/apgd-t"] & ~r["aa"]).sum())
    return {"chunks": n_chunks, "images": images, "images_fooled_only_by_fab_t_or_square": gained,
            "record_chunks": rec_chunks, "record_images": rec_images, "record_images_fooled_only_by_fab_t_or_square": rec_gained}


def aa_time_per_chunk(s: StudySettings) -> dict[str, list[float]]:
    """Seconds per AutoAttack chunk of the records-era evaluations, standard against screening (the same machine kind)."""
    out: dict[str, list[float]] = {"standard": [], "screening": []}
    for p in sorted((s.study / "eval").glob("*/aa_*.json")):
        c = read_json(p)
        if c.get("records") and c.get("version") == "standard":
            out["screening" if c.get("attacks") == list(SCREEN_STAGES) else "standard"].append(c["time_s"] - c.get("paused_s", 0.0))
    return out


def later_stage_time(s: StudySettings) -> dict:
    """What standard AutoAttack spends after APGD-CE and APGD-T (FAB-T and Square), over the chunks that timed each stage
    (``time_s_by_attack``, recorded since it was added): the time a screening with the first stages saves."""
    chunks = [c for c in (read_json(p) for p in sorted((s.study / "eval").glob("*/aa_*.json")))
              if c.get("version") == "standard" and c.get("time_s_by_attack") and not c.get("paused_s")]
    total = sum(c["time_s"] for c in chunks)
    later = sum(v for c in chunks for a, v in c["time_s_by_attack"].items() if a not in SCREEN_STAGES)
    return {"chunks": len(chunks), "total_s": total, "later_s": later}
