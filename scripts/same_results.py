"""Do two commits of clat train the same models? Trains four tiny runs (PGD-AT -> CLAT with a re-selection every
epoch, TRADES, PGD-AT -> LoRA, PGD-AT -> RiFT; tiny_cnn on 256 bundled images, 2 + 2 epochs, one CPU thread) and
writes, per run, a sha256 of every weights tensor the run folder holds and the metrics rows without their timings.
Run it at both commits and compare the two files::

    git checkout OLD && python scripts/same_results.py old.json
    git checkout NEW && python scripts/same_results.py new.json
    python scripts/same_results.py --compare old.json new.json

``--compare`` says, per run, whether the weights are bit-identical and whether the metrics rows are, reading rows of
either record schema (clat 0.2's early rows numbered checkpoints and selections from 0: ``selection.epoch`` one less,
``stage_epoch`` from 0, where schema 2 writes ``epoch`` as in the row and ``epoch_in_stage`` from 1)."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

TINY = ["data.dataset=bundled", "data.train_size=256", "data.test_size=64", "data.val_size=64", "model.name=tiny_cnn",
        "pretrain.epochs=2", "finetune.epochs=2", "data.batch_size=64", "attack.steps=2", "eval.steps=2", "eval.n_examples=64",
        "progress=false", "log.csv=false", "log.console=false"]
RUNS = {"pgd_at_clat": ["pretrain.method=pgd_at", "finetune.method=clat", "clat.reselect_every=1"],
        "trades": ["pretrain.method=trades", "finetune.epochs=0"],
        "lora": ["pretrain.method=pgd_at", "finetune.method=lora"],
        "rift": ["pretrain.method=pgd_at", "finetune.method=rift"]}


def weights_digest(run: Path) -> str:
    """sha256 over every tensor of every .safetensors file in the run folder, in path order (file metadata and the
    names of checkpoint folders left out)."""
    h = hashlib.sha256()
    for p in sorted(run.rglob("*.safetensors")):
        tensors = load_file(str(p))
        for k in sorted(tensors):
            h.update(k.encode())
            h.update(tensors[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def rows_of(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    for r in rows:
        for k in [k for k in r if "time" in k or k in ("seconds", "img_per_s", "eta")]:
            r.pop(k)
    return rows


def train_all(out: str) -> None:
    import clat

    torch.set_num_threads(1)
    result = {}
    for name, overrides in RUNS.items():
        run = Path(tempfile.mkdtemp()) / name
        clat.train(clat.load_config(overrides=TINY + overrides), str(run))
        result[name] = {"weights": weights_digest(run), "rows": rows_of(run)}
        print(name, result[name]["weights"][:16], flush=True)
    Path(out).write_text(json.dumps(result, indent=1, sort_keys=True))


def _one_numbering(row: dict) -> dict:
    """A metrics row with schema 2's labels mapped to clat 0.2's first ones (the numbers untouched)."""
    row = json.loads(json.dumps(row))
    row.pop("schema", None)
    sel = row.get("selection")
    if sel:
        sel.pop("schema", None)
        if "epoch_in_stage" in sel:
            sel["stage_epoch"], sel["epoch"] = sel.pop("epoch_in_stage") - 1, sel["epoch"] - 1
        if "lam" in sel and sel["lam"] is None:  # RiFT has no λ: schema 2 leaves the key out
            sel.pop("lam")
    return row


def compare(a: str, b: str) -> int:
    old, new = json.loads(Path(a).read_text()), json.loads(Path(b).read_text())
    same = True
    for name in RUNS:
        w = old[name]["weights"] == new[name]["weights"]
        m = [_one_numbering(r) for r in old[name]["rows"]] == [_one_numbering(r) for r in new[name]["rows"]]
        print(f"{name:12s} weights {'identical' if w else 'DIFFER'}, metrics {'identical' if m else 'DIFFER'}")
        same &= w and m
    return 0 if same else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", help="where to write this commit's digests (JSON)")
    ap.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="compare two files written by this script")
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        ap.error("give OUT.json, or --compare OLD NEW")
    train_all(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
