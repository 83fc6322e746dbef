"""The ``clat`` command line: train | criticality | eval | report | demo | models | methods.

Errors a user can cause print one or two lines (``clat: error: …``) and exit
with code 2; nothing else in here knows about training.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Sequence

from clat.errors import ClatError

log = logging.getLogger("clat")


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["bundled", "cifar10", "cifar100"], help="default: the run's data set, else bundled")
    g.add_argument("--root", help="folder holding cifar-10-batches-py / cifar-100-python")
    g.add_argument("--download", action="store_true", help="download the official archive if missing (checksum verified)")
    g.add_argument("--no-verify", action="store_true", help="accept a local copy whose checksums are not the official ones (warns)")


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (for files that do not say which model they hold)")
    g.add_argument("--model", help="model name (see `clat models`)")
    g.add_argument("--num-classes", type=int)
    g.add_argument("--no-normalize", action="store_true", help="the checkpoint expects raw [0, 1] inputs without normalization")


def _float(s: str) -> float:
    from clat.config import _coerce

    try:
        return _coerce(s, float, "value")
    except ClatError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clat", description="Criticality-Leveraged Adversarial Training")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-epoch lines")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a YAML config (pretrain stage, then CLAT fine-tuning)")
    t.add_argument("config", nargs="?", help="YAML config (see configs/)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. clat.k=2 finetune.epochs=10")
    t.add_argument("--run-dir", help="output folder (default: runs/<config name>)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    t.add_argument("--force", action="store_true", help="overwrite a run folder that already holds a run")

    c = sub.add_parser("criticality", help="criticality index of every layer of a checkpoint")
    c.add_argument("checkpoint", nargs="?", help="run folder, .safetensors or state-dict file (none: a fresh --model)")
    _model_args(c)
    _data_args(c)
    c.add_argument("--batch-size", type=int, default=100, help="training images used (default 100)")
    c.add_argument("--k", type=int, help="mark the top-k (default: the model's paper default)")
    c.add_argument("--eps", type=_float, default=8 / 255)
    c.add_argument("--alpha", type=_float, default=2 / 255)
    c.add_argument("--steps", type=int, default=10)
    c.add_argument("--denominator", choices=["input", "previous"], default="input")
    c.add_argument("--scaling", choices=["n", "sqrt_n", "none"], default="n")
    c.add_argument("--include-classifier", action="store_true")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", help="output folder for criticality.json / .png (default: the run folder or .)")

    e = sub.add_parser("eval", help="clean and PGD accuracy of a checkpoint")
    e.add_argument("checkpoint", help="run folder, .safetensors or state-dict file")
    _model_args(e)
    _data_args(e)
    e.add_argument("--split", choices=["test", "val"], default="test")
    e.add_argument("--n-examples", type=int, help="evaluate a random subset of this size (fixed --seed); default: all")
    e.add_argument("--eps", type=_float, default=8 / 255, help="default 8/255")
    e.add_argument("--alpha", type=_float, default=2 / 255, help="default 2/255")
    e.add_argument("--steps", type=int, default=10)
    e.add_argument("--restarts", type=int, default=1)
    e.add_argument("--norm", choices=["linf", "l2"], default="linf")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", help="JSON file to write (default: <run folder>/eval.json or ./eval.json)")

    r = sub.add_parser("report", help="render report.md and plots of run folders from their JSON")
    r.add_argument("run_dirs", nargs="+")

    d = sub.add_parser("demo", help="the whole story in ~2 minutes on a CPU, offline, on bundled real data")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--force", action="store_true", help="overwrite an existing demo folder")
    d.add_argument("--fast", action="store_true", help="a much shorter run (smoke test; accuracies stay near chance)")

    sub.add_parser("models", help="list the model registry")
    sub.add_parser("methods", help="list the training methods")
    return p


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve_data(args: argparse.Namespace, run_cfg) -> "object":
    from clat.config import Config

    cfg = run_cfg if run_cfg is not None else Config()
    if run_cfg is None:
        cfg.data.dataset = "bundled"
        cfg.data.val_size = 500
    if args.dataset:
        cfg.data.dataset = args.dataset
    if args.root:
        cfg.data.root = args.root
    if args.download:
        cfg.data.download = True
    if args.no_verify:
        cfg.data.verify = False
    return cfg


def _run_config(checkpoint: str | None):
    """The config of the run a checkpoint belongs to, if any."""
    if not checkpoint:
        return None
    import yaml

    from clat.config import config_from_dict

    p = Path(checkpoint)
    for cand in (p, p.parent, p.parent.parent, p.parent.parent.parent):
        if (cand / "config.yaml").is_file() and cand.is_dir():
            return config_from_dict(yaml.safe_load((cand / "config.yaml").read_text()))
    return None


def _load(args: argparse.Namespace):
    from clat.checkpoint import load_model

    return load_model(
        args.checkpoint,
        model_name=args.model,
        num_classes=args.num_classes,
        normalize=False if args.no_normalize else None,
        device=_device(),
    )


def cmd_train(args: argparse.Namespace) -> int:
    from clat.config import load_config
    from clat.train import train

    if args.resume:
        if args.config or args.overrides:
            raise ClatError("--resume continues a run with its saved config; drop the config file and overrides")
        summary = train(None, args.resume, resume=True)
    else:
        if not args.config:
            raise ClatError("clat train needs a config file (see configs/), or --resume RUN_DIR")
        overrides = list(args.overrides)
        cfg_path = args.config
        if "=" in cfg_path:  # only overrides given
            overrides.insert(0, cfg_path)
            cfg_path = None
        cfg = load_config(cfg_path, overrides)
        if args.quiet:
            cfg.progress = False
        run_dir = args.run_dir or f"runs/{Path(cfg_path).stem if cfg_path else 'run'}"
        summary = train(cfg, run_dir, force=args.force)
    from clat.report import run_report

    report = run_report(summary["run_dir"])
    print(f"done: {summary['run_dir']} (report: {report})")
    if summary.get("final_val"):
        v = summary["final_val"]
        print(f"held-out: clean {100 * v['clean_acc']:.2f}%  PGD {100 * v['pgd_acc']:.2f}%  (n={v['n']})")
    return 0


def cmd_criticality(args: argparse.Namespace) -> int:
    import torch

    from clat.criticality import compute_criticality
    from clat.layers import find_layers
    from clat.models import create_model, model_info
    from clat.report import criticality_rows, plot_criticality, text_table
    from clat.train import prepare_data

    run_cfg = _run_config(args.checkpoint)
    cfg = _resolve_data(args, run_cfg)
    if args.batch_size < 1:
        raise ClatError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.checkpoint:
        model, meta = _load(args)
    else:
        if not args.model:
            raise ClatError("give a checkpoint, or --model NAME for a freshly initialised model")
        model = create_model(args.model, args.num_classes or 10, normalize=not args.no_normalize).to(_device())
        meta = {"model": args.model}
    splits = prepare_data(cfg)
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(splits.x_train), generator=g)[: args.batch_size]
    x = splits.x_train[idx].float().div(255).to(_device())
    y = splits.y_train[idx].to(_device())
    layers = find_layers(model, x[:2])
    result = compute_criticality(
        model, layers, x, y, eps=args.eps, alpha=args.alpha, steps=args.steps,
        denominator=args.denominator, scaling=args.scaling, include_classifier=args.include_classifier,
    )
    k = args.k
    if k is None:
        try:
            k = model_info(meta["model"]).default_k
        except ClatError:
            k = max(1, round(0.05 * len(layers)))
    data = result.to_dict(k)
    data["checkpoint"] = args.checkpoint
    data["k"] = k
    out = Path(args.out) if args.out else (Path(args.checkpoint) if args.checkpoint and Path(args.checkpoint).is_dir() else Path("."))
    out.mkdir(parents=True, exist_ok=True)
    (out / "criticality.json").write_text(json.dumps(data, indent=2))
    plot_criticality(data, out / "criticality.png", f"Criticality of {meta['model']} ({args.batch_size} images)")
    h, rows = criticality_rows(data)
    print(text_table(h, rows))
    print(f"top-{k}: {', '.join(l.name for l in result.top_k(k))}")
    print(f"wrote {out / 'criticality.json'} and {out / 'criticality.png'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from clat.evaluate import evaluate
    from clat.train import prepare_data

    run_cfg = _run_config(args.checkpoint)
    cfg = _resolve_data(args, run_cfg)
    model, meta = _load(args)
    splits = prepare_data(cfg)
    x, y = (splits.x_test, splits.y_test) if args.split == "test" else (splits.x_val, splits.y_val)
    if args.n_examples is not None:
        if args.n_examples < 1:
            raise ClatError(f"--n-examples must be >= 1, got {args.n_examples}")
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))[: args.n_examples]
        x, y = x[idx], y[idx]
    if args.steps < 1 or args.batch_size < 1:
        raise ClatError("--steps and --batch-size must be >= 1")
    torch.manual_seed(args.seed)
    res = evaluate(
        model, x, y, eps=args.eps, alpha=args.alpha, steps=args.steps, restarts=args.restarts, norm=args.norm,
        batch_size=args.batch_size, progress=not args.quiet, desc=f"PGD-{args.steps}",
    )
    res.update({"checkpoint": meta["path"], "model": meta["model"], "split": args.split, "data": splits.name, "seed": args.seed})
    default_dir = Path(args.checkpoint) if Path(args.checkpoint).is_dir() else Path(".")
    out = Path(args.out) if args.out else default_dir / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"clean {100 * res['clean_acc']:.2f}%  PGD-{args.steps} {100 * res['pgd_acc']:.2f}%  (n={res['n']}, {args.restarts} restart(s)) -> {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from clat.report import run_report

    for d in args.run_dirs:
        print(run_report(d))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from clat.demo import run_demo

    path = run_demo(args.out, force=args.force, fast=args.fast, progress=not args.quiet)
    print(f"demo report: {path}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from clat.layers import find_layers
    from clat.models import create_model, list_models, model_info
    from clat.report import text_table

    rows = []
    for name in list_models():
        m = create_model(name)
        rows.append([name, f"{sum(p.numel() for p in m.parameters()):,}", len(find_layers(m)), model_info(name).default_k, model_info(name).description])
    print(text_table(["name", "params (10 classes)", "layers", "default k", "description"], rows))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from clat import methods

    for name in methods.list_methods():
        doc = (methods.BASE_METHODS.get(name) or methods.CLAT).__module__
        first = (sys.modules[doc].__doc__ or "").strip().splitlines()[0]
        print(f"{name:10s} {first}")
    return 0


COMMANDS = {
    "train": cmd_train, "criticality": cmd_criticality, "eval": cmd_eval, "report": cmd_report,
    "demo": cmd_demo, "models": cmd_models, "methods": cmd_methods,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    warnings.simplefilter("default")
    warnings.formatwarning = lambda msg, cat, *a, **k: f"clat: warning: {msg}\n"
    try:
        return COMMANDS[args.command](args)
    except ClatError as e:
        print(f"clat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clat: interrupted (a run continues with `clat train --resume RUN_DIR`)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
