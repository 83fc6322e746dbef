"""The run commands, ``clat train``, ``eval``, ``report``, ``layer-sweep`` and ``demo``, and what every command that
attacks a trained model shares: its threat model, data, checkpoint, device and output safety (the parser is in
:mod:`clat.cli.main`; criticality, stability and transfer in :mod:`clat.cli.analyses`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from clat.analysis.comparison import comparison_report
from clat.analysis.oracle import SweepSettings, layer_sweep, render
from clat.analysis.plots import eps_str
from clat.analysis.report import read_run, run_report
from clat.attacks.threat import ThreatModel
from clat.base import distributed
from clat.base.distributed import resolve_device
from clat.base.errors import ClatError
from clat.cli.demo import run_demo
from clat.cli.listing import config_and_overrides
from clat.config.load import load_config
from clat.config.schema import AttackConfig, Config
from clat.data.prepare import prepare_data
from clat.eval.attacks import EvalAttack, resolve_attack
from clat.eval.protocol import EvalProtocol, flag_attacks, run_protocol
from clat.eval.records import record_path, save_record
from clat.runs.checkpoint import atomic_write_text, read_metadata
from clat.runs.folder import RunDir
from clat.runs.loading import find_weights, load_model
from clat.training.early_stop import read_best
from clat.training.loop import train

if TYPE_CHECKING:
    from clat.attacks.threat import ThreatModel


def threat_of(args: argparse.Namespace, run_cfg, *, run_step: bool = False) -> tuple["ThreatModel", str]:
    """The threat model of a command: the norm and ε the run was trained for (else ℓ∞ 8/255), with what
    the command line sets, and a line saying where it came from. The PGD step is ε/4 (2/255 at 8/255, the
    usual evaluation step) unless ``--alpha`` is given; ``run_step``: the run's own step (criticality, as
    CLAT measures it during training)."""

    base = run_cfg.attack if run_cfg is not None else AttackConfig()
    given = [k for k in ("norm", "eps", "alpha") if getattr(args, k, None) is not None]
    eps = args.eps if args.eps is not None else base.eps
    alpha = args.alpha if args.alpha is not None else (base.alpha if run_step and args.eps is None else eps / 4)
    a = AttackConfig(eps=eps, alpha=alpha, steps=args.steps if args.steps is not None else base.steps, norm=args.norm or base.norm)
    if args.norm and run_cfg is not None and args.norm != base.norm and (args.eps is None or args.alpha is None):
        raise ClatError(f"--norm {args.norm} differs from the run's attack.norm ({base.norm}): give --eps and --alpha for it too")
    if not a.eps > 0 or not math.isfinite(a.eps) or not a.alpha > 0 or not math.isfinite(a.alpha):
        raise ClatError(f"--eps and --alpha must be finite and > 0, got {a.eps} and {a.alpha}")
    if a.norm == "linf" and a.eps >= 1:
        raise ClatError(f"--eps {a.eps:g} covers the whole [0, 1] image range under linf; images are in [0, 1] (8/255 is the usual radius)")
    if a.steps is not None and a.steps < 1:
        raise ClatError(f"--steps must be >= 1, got {a.steps}")
    threat = ThreatModel(a.norm, a.eps, a.alpha, a.steps)
    source = "the run's training threat model" if run_cfg is not None else "the default threat model"
    if given:
        source += f", with {', '.join('--' + k for k in given)} from the command line"
    return threat, source


def data_config(args: argparse.Namespace, run_cfg) -> "object":
    cfg = run_cfg if run_cfg is not None else Config()
    if run_cfg is None:
        cfg.data.dataset = "bundled"
        cfg.data.val_size = 500
    if args.dataset:
        cfg.data.dataset = args.dataset
        if run_cfg is None and args.dataset in ("folder", "npz"):
            cfg.data.val_size = 0  # no run to follow: every training image is training data (however few)
    if args.root:
        cfg.data.root = args.root
    if args.download:
        cfg.data.download = True
    if args.no_verify:
        cfg.data.verify = False
    return cfg


@contextlib.contextmanager
def writing(paths: Sequence[Path], command: str):
    """Checked before any work: ``paths`` can be written. If they go into a clat run folder, that folder
    is locked for the block (one writer at a time) and they are recorded in its manifest as the block ends,
    however it ends (each one it wrote)."""


    paths = [Path(p) for p in paths]
    parent = next((q for q in (paths[0].parent, *paths[0].parent.parents) if q.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise ClatError(f"cannot write {paths[0]}: {parent} is not writable; choose another output (--out)")
    run = RunDir(paths[0].parent)
    if not run.holds_run():
        yield
        return
    with run.lock(command), run.recording(*[p.resolve() for p in paths]):  # resolved: recording() reads a relative path in the run
        yield


def run_config(checkpoint: str | None):
    """The config of the run a checkpoint belongs to (the run folder itself, its final weights or an
    epoch checkpoint of it), if any; a ``config.yaml`` that merely lies near a file is not one."""
    if not checkpoint:
        return None

    run = RunDir.owner_of(checkpoint)
    return run.read_config() if run is not None else None


def status(msg: str) -> None:
    """What a command is doing before a long silent step (hidden by ``clat -q``, as the per-epoch lines are)."""

    logging.getLogger("clat").info(msg)


def pick_device(name: str):
    return resolve_device(name, option="--device ")


def load_checkpoint(path: str, args: argparse.Namespace, device):
    return load_model(path, model_name=args.model, num_classes=args.num_classes, normalize=False if args.no_normalize else None,
                      device=device)


def eval_images(args: argparse.Namespace, splits, *, with_indices: bool = False):
    """The test (or val) images, or a random subset of ``--n-examples`` drawn with ``--seed``
    (and, ``with_indices``, the images' positions in their split)."""

    _check_image_args(args)
    x, y = (splits.x_test, splits.y_test) if args.split == "test" else (splits.x_val, splits.y_val)
    idx = torch.arange(len(x))
    if args.n_examples is not None:
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))[: args.n_examples]
        x, y = x[idx], y[idx]
    return (x, y, idx) if with_indices else (x, y)


def _check_image_args(args: argparse.Namespace) -> None:
    if args.n_examples is not None and args.n_examples < 1:
        raise ClatError(f"--n-examples must be >= 1, got {args.n_examples}")
    if args.steps < 1 or args.batch_size < 1:
        raise ClatError("--steps and --batch-size must be >= 1")


def _warn(msg: str) -> None:
    """Flags are printed even with -q: hiding them would defeat their purpose."""
    print(f"WARNING: {msg}", flush=True)


def _eval_tag(args: argparse.Namespace, a) -> str:
    """A file-name tag for an evaluation setting: ``test_n1000_linf-8-255_pgd20x5_aa-standard_s0``."""

    parts = [args.split, f"n{args.n_examples}" if args.n_examples is not None else "nall",
             f"{a.norm}-{eps_str(a.eps, a.norm).replace('/', '-')}"]
    parts.append("nopgd" if args.no_pgd else f"pgd{a.steps}x{args.restarts}")
    parts += (["apgdce"] if args.apgd_ce else []) + ([f"aa-{args.autoattack_version}"] if args.autoattack else [])
    parts += (["sweep"] if args.eps_sweep else []) + (["sanity"] if args.sanity else [])
    parts += [re.sub(r"[^A-Za-z0-9]+", "-", a).strip("-") for a in getattr(args, "attack", None) or ()] + [f"s{args.seed}"]
    return "_".join(parts + (["best"] if getattr(args, "which", "last") == "best" else []))  # last: the tag of clat before --which


def _eval_out(args: argparse.Namespace, a) -> Path:
    """Where this evaluation goes, decided before any attack runs. An evaluation never replaces
    another silently: a folder's first evaluation is ``eval.json`` (the run folder's, or that of a folder
    given with ``--out``), one with other settings goes to ``eval_<settings>.json``, and a file that exists is
    replaced only with ``--force``, and only if it is an evaluation clat wrote."""

    tag = _eval_tag(args, a)
    if args.out and not Path(args.out).is_dir():
        out = Path(args.out)
    else:
        folder = Path(args.out) if args.out else Path(args.checkpoint) if Path(args.checkpoint).is_dir() else Path(".")
        out = folder / "eval.json"
        if out.exists() and _evaluation_in(out) != tag:
            out = folder / f"eval_{tag}.json"
    if out.exists():
        held = _evaluation_in(out)
        if held is None:
            raise ClatError(f"{out} is {'a folder' if out.is_dir() else 'not an evaluation that clat wrote'}; clat never replaces it"
                            f"{', --force or not' if args.force else ''}: choose another file with --out")
        if not args.force:
            what = "an evaluation with these settings" if held == tag else f"an evaluation with other settings ({held or 'unknown'})"
            raise ClatError(f"{out} already holds {what}; pass --force to replace it, or --out FILE to keep both")
    parent = next((p for p in (out.parent, *out.parents) if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise ClatError(f"cannot write {out}: {parent} is not writable; choose another file with --out")
    return out


def _evaluation_in(path: Path) -> str | None:
    """The settings tag of the evaluation ``path`` holds ("" for one of a clat that wrote none), or None when it is
    not an evaluation written by clat (a folder, another file)."""
    try:
        e = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    if not isinstance(e, dict) or not ("settings_tag" in e or ("n" in e and "clean_acc" in e)):
        return None
    return str(e.get("settings_tag") or "")


def cmd_eval(args: argparse.Namespace) -> int:
    if args.restarts < 1:
        raise ClatError(f"--restarts must be >= 1, got {args.restarts}")
    _check_image_args(args)
    best = _best_of(args)
    run_cfg = run_config(args.checkpoint)
    cfg = data_config(args, run_cfg)
    a, source = threat_of(args, run_cfg)
    _eval_attacks(args)  # cheap checks first: nothing is attacked to be lost afterwards
    out = _eval_out(args, a)

    with writing([out, record_path(out)], "eval"):
        return _eval_into(args, out, cfg, a, source, best)


def _best_of(args: argparse.Namespace) -> dict | None:
    """``--which best``: the run folder's best.json, checked against its weights (None for ``--which last``)."""
    if args.which == "last":
        return None

    if not Path(args.checkpoint).is_dir():
        raise ClatError(f"--which best reads RUN/best/ of a run folder, but {args.checkpoint} is a file; give the run folder, "
                        "or evaluate the file as it is (without --which best)")
    rd = RunDir(args.checkpoint)
    return {**read_best(rd), "path": str(rd.best_weights)}


def _eval_into(args: argparse.Namespace, out: Path, cfg, threat, source: str, best: dict | None = None) -> int:
    device = pick_device(args.device)
    model, meta = load_checkpoint(best["path"] if best else args.checkpoint, args, device)
    surrogates = {}
    for i, sp in enumerate(args.surrogate if args.sanity else ()):
        sur, _ = load_checkpoint(sp, _surrogate_args(sp, args), device)
        surrogates[Path(sp).name if Path(sp).name not in surrogates else f"{Path(sp).name}#{i}"] = sur
    splits = prepare_data(cfg)
    x, y, indices = eval_images(args, splits, with_indices=True)
    print(f"threat model: {threat.text()} ({source})" + (f"; the best epoch's weights (epoch {best['epoch']})" if best else ""))
    protocol = EvalProtocol(threat, _eval_attacks(args), seed=args.seed, batch_size=args.batch_size)
    result = run_protocol(model, x, y, protocol, surrogates=surrogates, device=device, progress=getattr(args, "progress", not args.quiet))
    res = result.to_dict()
    res.update({"checkpoint": meta["path"], "model": meta["model"], "split": args.split, "data": splits.name, "seed": args.seed,
                "subset": args.n_examples is not None, "settings_tag": _eval_tag(args, threat), "which": args.which,
                **({"best": {k: best[k] for k in ("epoch", "metric", "value")}} if best else {}),
                "threat_model": {**threat.to_dict(), "source": source}})

    rec = record_path(out)  # per-image outcomes, so that two models can later be compared image by image (clat.records)
    save_record(rec, result.record(indices.numpy(), data=splits.name, split=args.split, checkpoint=meta["path"], model=meta["model"],
                                   which=args.which, eval_json=out.name))
    res["records"] = rec.name
    atomic_write_text(out, json.dumps(res, indent=2))
    lines = result.summary_lines()
    print("  ".join(lines[:2]) + f"  (n={result.n})")
    for line in lines[2:]:
        print(line)
    for f in result.flags:
        _warn(f)
    print(f"-> {out}")
    return 0


def _eval_attacks(args: argparse.Namespace) -> list[EvalAttack]:
    """The attacks ``clat eval``'s flags choose, then each ``--attack NAME`` (a name of ``clat list attacks`` or
    ``package.module:Class``)."""
    if args.square_queries < 0:
        raise ClatError(f"--square-queries must be >= 0, got {args.square_queries}")
    return flag_attacks(pgd=not args.no_pgd, restarts=args.restarts, apgd_ce=args.apgd_ce,
                        autoattack=args.autoattack_version if args.autoattack else None, eps_sweep=tuple(args.eps_sweep or ()),
                        sanity=args.sanity, square_queries=args.square_queries) + \
        [resolve_attack(a, where=f" (--attack {a})") for a in getattr(args, "attack", None) or ()]


def _surrogate_args(path: str, args: argparse.Namespace) -> argparse.Namespace:
    """A surrogate is built as its own file says; one that does not say (a plain state dict) as ``--model`` says."""

    w = find_weights(path)
    meta = read_metadata(w) if w.suffix == ".safetensors" else {}
    if meta.get("model") and not meta.get("custom"):
        return argparse.Namespace(model=None, num_classes=None, no_normalize=False)
    return args


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume:
        overrides = ([args.config] if args.config else []) + list(args.overrides)
        if args.config and "=" not in args.config:
            raise ClatError("--resume continues a run with its saved config; drop the config file (key=value overrides such as "
                            "pretrain.lr=0.01 may change the learning rate)")
        if not args.progress and not any(o.startswith("progress=") for o in overrides):
            overrides.append("progress=false")
        summary = train(None, args.resume, resume=True, until_epoch=args.until_epoch, overrides=overrides)
    else:
        if not args.config:
            raise ClatError("clat train needs a config file (see configs/), or --resume RUN_DIR")
        cfg_path, overrides = config_and_overrides(args.config, args.overrides)
        cfg = load_config(cfg_path, overrides)
        if not args.progress:  # -q, or output that is not a terminal (a log file)
            cfg.progress = False
        run_dir = args.run_dir = args.run_dir or f"runs/{Path(cfg_path).stem if cfg_path else 'run'}"  # (named by a Ctrl-C)
        summary = train(cfg, run_dir, force=args.force, until_epoch=args.until_epoch)

    if not distributed.info().is_main:  # data-parallel run: rank 0 reports
        return 0
    if not summary.get("finished", True):
        print(f"stopped after epoch {summary['epochs_done']} of {summary['epochs']}: continue with `clat train --resume "
              f"{summary['run_dir']}`")
        return 0

    report = run_report(summary["run_dir"])
    print(f"done: {summary['run_dir']} (report: {report})")
    if summary.get("final_val"):
        v = summary["final_val"]
        print(f"held-out: clean {100 * v['clean_acc']:.2f}%  PGD {100 * v['pgd_acc']:.2f}%  (n={v['n']})")
    if summary.get("best_epoch"):
        stopped = f"; stopped early after epoch {summary['epochs_done']} of {summary['epochs']}" if summary.get("stopped_early") else ""
        print(f"best: epoch {summary['best_epoch']} (held-out PGD {100 * summary['best_value']:.2f}%) in "
              f"{summary['run_dir']}/best{stopped}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:

    transfer = None
    if args.transfer:  # read (and refused) before any report is rendered
        try:
            transfer = json.loads(Path(args.transfer).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ClatError(f"could not read the transfer JSON {args.transfer}: {e}") from None
        if not isinstance(transfer, dict) or "matrix" not in transfer or "names" not in transfer:
            raise ClatError(f"{args.transfer} is not a transfer matrix written by `clat transfer`")

    for d in args.run_dirs:
        read_run(d)  # every run folder readable before anything is written
    for d in args.run_dirs:
        with writing([Path(d) / "report.md", Path(d) / "plots"], "report"):
            print(run_report(d))
    if len(args.run_dirs) > 1 or args.transfer:
        if args.out:
            out = Path(args.out)
        elif len(args.run_dirs) > 1:
            out = Path(os.path.commonpath([str(Path(d).resolve()) for d in args.run_dirs])) / "comparison"
        else:
            out = Path(args.run_dirs[0]) / "comparison"
        names = [n.strip() for n in args.names.split(",")] if args.names else None
        with writing([out], "report"):
            print(comparison_report(args.run_dirs, out, names=names, transfer=transfer))
    return 0


def cmd_layer_sweep(args: argparse.Namespace) -> int:
    if not args.report:
        cfg_path, overrides = config_and_overrides(args.config, args.overrides)
        cfg = load_config(cfg_path, overrides)
        settings = SweepSettings(epochs=args.epochs, seeds=list(args.seeds), objective=args.objective, lam=args.lam,
                                 lam_mode="auto" if args.lam_auto else "fixed", val_steps=args.val_steps, n_val=args.n_val,
                                 layers=args.layers, reference=not args.no_reference, estimators=list(args.estimators))
        res = layer_sweep(cfg, args.out, settings, hours=args.hours, log=lambda m: print(m, flush=True) if not args.quiet else None)
        print(f"{res['done']} of {res['total']} items done in {args.out}")
    print(f"report: {render(args.out, args.title)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    path = run_demo(args.out, force=args.force, fast=args.fast, progress=args.progress)
    print(f"demo report: {path}")
    return 0
