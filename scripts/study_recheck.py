"""Which of the study's layer selections did the layer-discovery bug of clat 0.1 change?

clat 0.1 flagged a layer as "reading the model input" when its input tensor happened to be
allocated at the address of the stem's (freed) input, and then set its criticality to its weakness
(C_i = W_i, about 1e-3 instead of 1-2): that layer could not be selected. A recorded selection was
hit exactly when C_i == W_i for some layer i > 0. For each such selection this script

1. replays the item's training up to the epoch of that selection (``clat.train`` with
   ``until_epoch``, the item's own config from ``scripts/study.py``), in a subprocess whose
   ``PYTHONPATH`` may point at an older checkout (``--code``) so that the arm trains exactly as it did;
2. recomputes the criticality at that epoch with the fixed discovery of this checkout, on the same
   batch and the same PGD start (the checkpoint's RNG state), with the arm's own denominator;
3. compares: the replay's W against the recorded W (how faithful the replay is), the flagged layer's
   recorded C against its fixed C, and the recorded choice against the fixed top-k.

    python scripts/study_recheck.py                      # every hit selection -> study/discovery_recheck.json
    python scripts/study_recheck.py --code ../old/src    # replay with another clat (e.g. the one that ran the study)

A random-layers arm draws its layers without looking at C: its hits cannot change a choice and are
listed without a replay.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))



def stage_epoch_of(sel: dict) -> int:
    """A selection's epoch within its stage, from 0 (clat's records before schema 2 wrote ``stage_epoch``, from 0; since
    then ``epoch_in_stage``, from 1)."""
    return sel["stage_epoch"] if "stage_epoch" in sel else sel["epoch_in_stage"] - 1

def hits(results: Path) -> list[dict]:
    """Selections with C_i == W_i for a layer i > 0, in the results and in the results superseded since (study/superseded/)."""
    out = []
    files = {f.name: f for d in (results.parent / "superseded", results) for f in sorted(d.glob("*_s[0-9]*.json"))}
    for f in files.values():
        d = json.loads(f.read_text())
        for sel in d.get("selection_history") or []:
            c, w = sel["criticality"], sel.get("weakness")
            if w is None:
                continue  # RiFT records its own measure
            flagged = [i for i in range(1, len(c)) if c[i] == w[i]]
            if flagged:
                out.append({"item": f.stem, "arm": d["arm"], "seed": d["seed"], "stage_epoch": stage_epoch_of(sel),
                            "flagged_index": flagged,
                            "recorded_selected": sel["selected"], "recorded": sel})
    return out


REPLAY = """
import sys, json
sys.path.insert(0, {scripts!r})
import study
from clat.training.loop import train
arm, seed, until, run = {arm!r}, {seed}, {until}, {run!r}
if hasattr(study, "StudySettings"):
    s = study.StudySettings.cpu()
    cfg = study.arm_cfg(s, arm, seed, study.chosen_lambda(s) if arm in study.CLAT_ARMS else None)
else:  # an older checkout's study.py (--code), whose settings were module globals
    cfg = study.arm_cfg(arm, seed, study.chosen_lambda() if arm in study.CLAT_ARMS else None)
cfg.keep_checkpoints, cfg.progress = 1000, False
train(cfg, run, until_epoch=until, force=True)
"""


def replay(arm: str, seed: int, until: int, run: Path, code: str | None) -> None:
    env = dict(os.environ)
    if code:
        env["PYTHONPATH"] = os.pathsep.join([code, env.get("PYTHONPATH", "")])
    scripts = Path(code).resolve().parent / "scripts" if code else REPO / "scripts"  # the study script of the same checkout
    script = REPLAY.format(scripts=str(scripts), arm=arm, seed=seed, until=until, run=str(run))
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=REPO)


def recompute(run: Path, arm: str, stage_epoch: int, branch: Path) -> dict:
    import torch

    from clat.runs.checkpoint import load_into, load_state, read_state_dict
    from clat.criticality.index import compute_criticality
    from clat.data.loader import to_unit_float
    from clat.layers.discovery import find_layers
    from clat.runs.folder import RunDir
    from clat import rng as clat_rng
    from clat.data.prepare import prepare_data
    from clat.training.warmstart import build_model

    cfg = RunDir(run).read_config()
    cfg.init = None
    splits = prepare_data(cfg)
    model = build_model(cfg, splits.num_classes, torch.device("cpu"))
    if stage_epoch > 0:
        ck = RunDir(run).checkpoints()
        load_into(model, read_state_dict(ck.weights(epoch=stage_epoch)))  # the checkpoint after epoch stage_epoch (from 1)
        clat_rng.set_state(load_state(ck.state(ck.dir(epoch=stage_epoch)))["rng"])
    else:
        load_into(model, read_state_dict(branch))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    layers = find_layers(model, to_unit_float(splits.x_train[:2]))
    cc = cfg.clat.criticality
    x, y = splits.sampler(lambda: clat_rng.epoch_generator(cfg.seed, stage_epoch, 2))(cc.batch_size)
    rng = torch.get_rng_state()
    out = {}
    for den in dict.fromkeys([cc.denominator, "upstream"]):
        torch.set_rng_state(rng)  # the same PGD start for both
        out[den] = compute_criticality(model, layers, x, y, cfg.attack.threat().replace(steps=cc.steps), denominator=den,
                                       scaling=cc.scaling,
                                       point=cc.point, include_classifier=cc.include_classifier)
    return {"layers": layers, "results": out, "denominator": cc.denominator, "k": len(cfg.clat.layers) or (cfg.clat.k or 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", help="PYTHONPATH entry of the clat that replays the training (default: this checkout's)")
    ap.add_argument("--code-label", help="how the report names that code (e.g. 'clat 0.1, commit 36472b9')")
    ap.add_argument("--work", help="folder for the replayed runs (default: a temporary folder)")
    ap.add_argument("--out", default=str(REPO / "study" / "discovery_recheck.json"))
    args = ap.parse_args(argv)
    import study

    s = study.StudySettings.cpu()
    work = Path(args.work or tempfile.mkdtemp(prefix="clat_recheck_"))
    rows = []
    for h in hits(s.results):
        row = {k: v for k, v in h.items() if k != "recorded"}
        rec = h["recorded"]
        if "clat.selection=random" in study.ARMS[h["arm"]][2]:
            from clat.layers.discovery import find_layers
            from clat.models import create_model

            names = [l.name for l in find_layers(create_model(study.arm_cfg(s, h["arm"], h["seed"], None).model.name))]
            row.update({"flagged": [names[i] for i in h["flagged_index"]], "changed": False,
                        "why": "random layers: the draw does not look at the criticality"})
            rows.append(row)
            continue
        run = work / h["item"]
        if h["stage_epoch"] > 0:
            replay(h["arm"], h["seed"], h["stage_epoch"], run, args.code)
        branch = s.ckpts / f"{study.ARMS[h['arm']][0]}_branch.safetensors"
        r = recompute(run, h["arm"], h["stage_epoch"], branch)
        fixed = r["results"][r["denominator"]]
        names = [l.name for l in r["layers"]]
        top = [l.name for l in fixed.top_k(r["k"])]
        others = [i for i in range(len(names)) if i not in h["flagged_index"] and fixed.eligible[i]]
        row.update({
            "flagged": [names[i] for i in h["flagged_index"]],
            "denominator": r["denominator"],
            "replay_max_rel_diff_weakness": max(abs(a - b) / b for a, b in zip(fixed.weakness, rec["weakness"])),
            "replay_max_rel_diff_criticality_others": max(abs(fixed.criticality[i] - rec["criticality"][i]) / rec["criticality"][i]
                                                          for i in others),
            "recorded_criticality_flagged": [rec["criticality"][i] for i in h["flagged_index"]],
            "fixed_criticality_flagged": [fixed.criticality[i] for i in h["flagged_index"]],
            "recorded_top3": [[names[i], rec["criticality"][i]] for i in sorted(others + h["flagged_index"],
                                                                                key=lambda i: -rec["criticality"][i])[:3]],
            "fixed_top3": [[l.name, fixed.criticality[l.index]] for l in fixed.top_k(3)],
            "fixed_selected": top,
            "changed": top != h["recorded_selected"],
            "upstream_top3": [[l.name, r["results"]["upstream"].criticality[l.index]] for l in r["results"]["upstream"].top_k(3)],
            "replayed_with": args.code_label or args.code or "this checkout",
        })
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"hits": rows}, indent=1))
    print(f"{len(rows)} hit selections, {sum(r['changed'] for r in rows)} changed -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
