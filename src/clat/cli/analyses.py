"""The analysis commands: ``clat criticality`` (rank a model's layers), ``clat stability`` (how stable that ranking is
over batches, paper Table 7) and ``clat transfer`` (black-box transfer between models, paper Table 2). ``clat eval``
and what every command shares (threat model, data, output safety) are in :mod:`clat.commands`."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from clat.analysis.plots import plot_criticality, plot_transfer
from clat.analysis.report import criticality_rows, text_table, transfer_rows
from clat.analysis.stability import criticality_stability, measure_pgd_at_epoch_time
from clat.base.errors import ClatError
from clat.cli.commands import data_config, eval_images, load_checkpoint, pick_device, run_config, status, threat_of, writing
from clat.criticality.index import compute_criticality, eligible_mask
from clat.data.loader import to_unit_float
from clat.data.prepare import prepare_data
from clat.eval.accuracy import transfer_matrix
from clat.methods.clat import resolve_k
from clat.models import create_model
from clat.runs.checkpoint import atomic_write_text
from clat.runs.folder import RunDir
from clat.training.warmstart import run_layers


def _criticality_settings(args: argparse.Namespace, cfg):
    """The run's criticality settings (``clat.criticality``; clat's defaults without a run), with the command line's
    --denominator, --scaling and --include-classifier over them."""

    cc = cfg.clat.criticality
    given = {"denominator": args.denominator, "scaling": getattr(args, "scaling", None),
             "include_classifier": True if getattr(args, "include_classifier", False) else None}
    return dataclasses.replace(cc, **{k: v for k, v in given.items() if v is not None})


def cmd_criticality(args: argparse.Namespace) -> int:

    if args.batch_size < 1:
        raise ClatError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.k is not None and args.k < 1:
        raise ClatError(f"--k must be >= 1, got {args.k}")
    run_cfg = run_config(args.checkpoint)
    cfg = data_config(args, run_cfg)
    threat, source = threat_of(args, run_cfg, run_step=True)
    out = Path(args.out) if args.out else (Path(args.checkpoint) if args.checkpoint and Path(args.checkpoint).is_dir() else Path("."))
    device = pick_device("auto")
    if args.checkpoint:
        model, meta = load_checkpoint(args.checkpoint, args, device)
    else:
        if not args.model:
            raise ClatError("give a checkpoint, or --model NAME for a freshly initialised model")
        model = create_model(args.model, args.num_classes or 10, normalize=not args.no_normalize).to(device)
        meta = {"model": args.model}
    splits = prepare_data(cfg)
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(splits.x_train), generator=g)[: args.batch_size]
    x = to_unit_float(splits.x_train[idx]).to(device)
    y = splits.y_train[idx].to(device)
    layers = run_layers(model, cfg, x)
    cc = _criticality_settings(args, cfg)
    k = resolve_k(args.k if args.k is not None else cfg.clat.k, layers, meta["model"])  # the k the run's CLAT trains (or would)
    n_ok = sum(eligible_mask(layers, include_classifier=cc.include_classifier))
    if k > n_ok:
        raise ClatError(f"k={k} critical layers requested but {n_ok} layers are eligible for selection; choose k between 1 and {n_ok}")
    with writing([out / "criticality.json", out / "criticality.png"], "criticality"):
        status(f"criticality of {len(layers)} layers: PGD-{threat.steps} on {len(x)} training images, then their features ...")
        result = compute_criticality(model, layers, x, y, threat, **cc.measure_kwargs())
        print(f"threat model: {threat.text()} ({source}); denominator {result.settings['denominator']}")
        data = result.to_dict(k)
        data["checkpoint"] = args.checkpoint
        data["k"] = k
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "criticality.json", json.dumps(data, indent=2))
        plot_criticality(data, out / "criticality.png", f"Criticality of {meta['model']} ({args.batch_size} images)")
    h, rows = criticality_rows(data)
    print(text_table(h, rows))
    print(f"top-{k}: {', '.join(l.name for l in result.top_k(k))}")
    print(f"wrote {out / 'criticality.json'} and {out / 'criticality.png'}")
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    if args.restarts < 1:
        raise ClatError(f"--restarts must be >= 1, got {args.restarts}")
    default = [Path(c).stem if Path(c).is_file() else Path(c).name for c in args.checkpoints]
    names = [n.strip() for n in args.names.split(",")] if args.names else default
    if len(names) != len(args.checkpoints):
        raise ClatError(f"--names gives {len(names)} names for {len(args.checkpoints)} checkpoints")
    if len(set(names)) != len(names):
        names = [f"{n} ({i})" for i, n in enumerate(names)]
    cfg = data_config(args, run_config(args.checkpoints[0]))
    device = pick_device(args.device)
    models = {}
    for n, c in zip(names, args.checkpoints):
        models[n], _ = load_checkpoint(c, args, device)
    splits = prepare_data(cfg)
    x, y = eval_images(args, splits)
    a, source = threat_of(args, run_config(args.checkpoints[0]))
    print(f"threat model: {a.text()} ({source})")
    out = Path(args.out)
    with writing([out, out.with_suffix(".png")], "transfer"):
        res = transfer_matrix(models, x, y, a, restarts=args.restarts, batch_size=args.batch_size, seed=args.seed,
                              progress=getattr(args, "progress", not args.quiet))
        res.update({"checkpoints": list(args.checkpoints), "data": splits.name, "split": args.split})
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
        png = plot_transfer(res, out.with_suffix(".png"))
    h, rows = transfer_rows(res)
    print(text_table(h, rows))
    print(f"rows attack, columns are attacked; diagonal = white-box PGD-{args.steps} (n={res['n']}, {res['time_s']:.0f} s) -> {out}, {png}")
    return 0


def cmd_stability(args: argparse.Namespace) -> int:
    try:
        sizes = [int(v) for v in args.batch_sizes.split(",") if v.strip()]
    except ValueError:
        raise ClatError(f"--batch-sizes takes comma-separated integers, got {args.batch_sizes!r}") from None
    run_cfg = run_config(args.checkpoint)
    cfg = data_config(args, run_cfg)
    threat, threat_source = threat_of(args, run_cfg, run_step=True)
    run_dir = Path(args.checkpoint) if Path(args.checkpoint).is_dir() else None
    out = Path(args.out) if args.out else (run_dir or Path(".")) / "stability.json"
    with writing([out], "stability"):
        return _stability_into(args, sizes, out, run_dir, cfg, threat, threat_source)


def _stability_into(args: argparse.Namespace, sizes: list[int], out: Path, run_dir: Path | None, cfg, threat, threat_source: str) -> int:
    device = pick_device(args.device)
    model, meta = load_checkpoint(args.checkpoint, args, device)
    splits = prepare_data(cfg)
    epoch_time, source = args.epoch_time, "given with --epoch-time"
    if epoch_time is None and not args.measure_epoch and run_dir is not None:
        rows = [r for r in RunDir(run_dir).metrics() if r.get("method") == "pgd_at" and "epoch_time_s" in r]
        if rows:
            epoch_time = sum(r["epoch_time_s"] for r in rows) / len(rows)
            source = f"mean epoch_time_s of the run's {len(rows)} PGD-AT epoch{'' if len(rows) == 1 else 's'} in metrics.jsonl"
    if epoch_time is None:
        a = cfg.attack
        status(f"timing PGD-AT (PGD-{a.steps}) steps of batch {cfg.data.batch_size} to estimate one epoch ...")
        epoch_time = measure_pgd_at_epoch_time(model, splits.x_train, splits.y_train, batch_size=cfg.data.batch_size, threat=a.threat())
        source = f"measured: PGD-AT (PGD-{a.steps}) steps of batch {cfg.data.batch_size}, extrapolated to {len(splits.x_train)} images"
    print(f"threat model: {threat.text()} ({threat_source})")
    status(f"reference ranking on {args.reference_size} training images, then {args.repeats} batches of each size {args.batch_sizes} ...")
    res = criticality_stability(model, splits.x_train, splits.y_train, batch_sizes=sizes, repeats=args.repeats,
                                reference_size=args.reference_size,
                                k=args.k, threat=threat, criticality=_criticality_settings(args, cfg), merge_norms=cfg.model.merge_norms,
                                seed=args.seed, epoch_time_s=epoch_time,
                                progress=getattr(args, "progress", not args.quiet))
    res.update({"epoch_time_source": source, "checkpoint": meta["path"], "model": meta["model"], "data": splits.name})
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(res, indent=2))

    print(f"reference top-{res['k']} ({res['reference']['size']} images): {res['reference']['top_k']}  "
          f"({', '.join(res['reference']['names'])})")
    print(text_table(["batch", "overlap", "same set", "same order", "top-1", "Spearman", "time (s)", "% of epoch"],
                     [[r["batch_size"], f"{100 * r['overlap_mean']:.0f}%", f"{100 * r['same_set']:.0f}%", f"{100 * r['same_order']:.0f}%",
                       f"{100 * r['top1_agrees']:.0f}%", f"{r['spearman_mean']:.2f}", f"{r['time_s_mean']:.3f}",
                       f"{100 * r['fraction_of_epoch']:.2f}%"] for r in res["rows"]]))
    print(f"one PGD-AT epoch: {epoch_time:.1f} s ({source}) -> {out}")
    return 0
