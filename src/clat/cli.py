"""The ``clat`` command line: train | criticality | eval | transfer | stability | report | demo | models | methods.

Errors a user can cause print one or two lines (``clat: error: …``) and exit
with code 2; nothing else in here knows about training.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import warnings
from pathlib import Path
from typing import NoReturn, Sequence

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
    from clat.config import coerce

    try:
        return coerce(s, float, "value")
    except ClatError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _float_list(s: str) -> list[float]:
    return [_float(v.strip()) for v in s.split(",") if v.strip()]


def _attack_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("attack (default: the run's own threat model, else linf 8/255, step 2/255) and images")
    g.add_argument("--n-examples", type=int, help="evaluate a random subset of this size (fixed --seed); default: all")
    _threat_args(g, steps_default=10)
    g.add_argument("--batch-size", type=int, default=256, help="results do not depend on it (per-example seeded random starts)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")


def _threat_args(g, steps_default: int | None = None) -> None:
    g.add_argument("--norm", choices=["linf", "l2"], help="default: the run's attack.norm, else linf")
    g.add_argument("--eps", type=_float, help="default: the run's attack.eps, else 8/255")
    g.add_argument("--alpha", type=_float, help="PGD step; default ε/4 (2/255 at 8/255); criticality and stability: the run's attack.alpha")
    g.add_argument("--steps", type=int, default=steps_default,
                   help=f"PGD steps (default {steps_default})" if steps_default else "PGD steps (default: the run's attack.steps, else 10)")


def _threat(args: argparse.Namespace, run_cfg, *, run_step: bool = False) -> tuple[object, str]:
    """The threat model of a command: the norm and ε the run was trained for (else ℓ∞ 8/255), with what
    the command line sets, and a line saying where it came from. The PGD step is ε/4 (2/255 at 8/255, the
    usual evaluation step) unless ``--alpha`` is given; ``run_step``: the run's own step (criticality, as
    CLAT measures it during training)."""
    from clat.config import AttackConfig

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
    source = "the run's training threat model" if run_cfg is not None else "the default threat model"
    if given:
        source += f", with {', '.join('--' + k for k in given)} from the command line"
    return a, source


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump), like every other clat error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"clat: error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="clat", description="Criticality-Leveraged Adversarial Training")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-epoch lines")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train from a YAML config (pretrain stage, then CLAT fine-tuning)")
    t.add_argument("config", nargs="?", help="YAML config (see configs/)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. clat.k=2 finetune.epochs=10")
    t.add_argument("--run-dir", help="output folder (default: runs/<config name>)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint (overrides: only the "
                   "learning rates and run-time settings, e.g. pretrain.lr=0.01 after a divergence)")
    t.add_argument("--force", action="store_true", help="overwrite a run folder that already holds a run")
    t.add_argument("--until-epoch", type=int, metavar="N", help="stop after epoch N (checkpointed); continue later with --resume")

    c = sub.add_parser("criticality", help="criticality index of every layer of a checkpoint")
    c.add_argument("checkpoint", nargs="?", help="run folder, .safetensors or state-dict file (none: a fresh --model)")
    _model_args(c)
    _data_args(c)
    c.add_argument("--batch-size", type=int, default=100, help="training images used (default 100)")
    c.add_argument("--k", type=int, help="mark the top-k (default: the model's paper default)")
    _threat_args(c, steps_default=10)
    c.add_argument("--denominator", choices=["upstream", "previous", "input"],
                   help="Eq. 6's denominator: upstream (the paper's formula; default unless the run says otherwise), previous, input")
    c.add_argument("--scaling", choices=["n", "sqrt_n", "none"], help="default: the run's, else n (the paper's 1/N_i)")
    c.add_argument("--include-classifier", action="store_true")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", help="output folder for criticality.json / .png (default: the run folder or .)")

    e = sub.add_parser("eval", help="clean, PGD, AutoAttack, ε sweep and gradient-masking checks of a checkpoint -> JSON")
    e.add_argument("checkpoint", help="run folder, .safetensors or state-dict file")
    _model_args(e)
    _data_args(e)
    e.add_argument("--split", choices=["test", "val"], default="test")
    _attack_args(e)
    e.add_argument("--restarts", type=int, default=1, help="PGD runs; accuracy of each, the lowest, and the per-example worst case (paper: >= 10)")
    e.add_argument("--no-pgd", action="store_true", help="skip clat's own PGD (clean accuracy is still measured)")
    e.add_argument("--autoattack", action="store_true", help="standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) from pyautoattack")
    e.add_argument("--autoattack-version", choices=["standard", "plus", "rand"], default="standard")
    e.add_argument("--apgd-ce", action="store_true", help="APGD-CE alone from pyautoattack, 1 restart (paper Table 8)")
    e.add_argument("--eps-sweep", type=_float_list, metavar="LIST", help="PGD accuracy at each ε, e.g. 0,2/255,4/255,8/255,16/255 (Figure 4)")
    e.add_argument("--sanity", action="store_true", help="checks against gradient masking (flags are printed and stored)")
    e.add_argument("--surrogate", action="append", default=[], metavar="CKPT", help="transfer source for the black-box sanity check (repeatable)")
    e.add_argument("--square-queries", type=int, default=1000, help="queries of the Square black-box sanity check (0: skip; default 1000)")
    e.add_argument("--out", help="JSON file to write (default: <run folder>/eval.json, or eval_<settings>.json when that exists)")
    e.add_argument("--force", action="store_true", help="replace an evaluation file that exists (never done silently)")

    tr = sub.add_parser("transfer", help="black-box transfer matrix: PGD examples crafted on each checkpoint, evaluated on all (Table 2)")
    tr.add_argument("checkpoints", nargs="+", help="run folders or weights files (the first one's run config gives the data set)")
    _model_args(tr)
    _data_args(tr)
    tr.add_argument("--split", choices=["test", "val"], default="test")
    _attack_args(tr)
    tr.add_argument("--restarts", type=int, default=1)
    tr.add_argument("--names", help="comma-separated names for the checkpoints (default: their folder names)")
    tr.add_argument("--out", default="transfer.json", help="JSON file (default ./transfer.json); a heat map is written beside it")

    st = sub.add_parser("stability", help="stability of the top-k critical layers over random batches of 10..100 images (Table 7)")
    st.add_argument("checkpoint", help="run folder, .safetensors or state-dict file")
    _model_args(st)
    _data_args(st)
    st.add_argument("--batch-sizes", default="10,30,50,100", help="comma-separated (default 10,30,50,100)")
    st.add_argument("--repeats", type=int, default=5, help="random batches per size (default 5)")
    st.add_argument("--reference-size", type=int, default=500, help="images of the reference ranking (default 500)")
    st.add_argument("--k", type=int, default=5, help="top-k compared (default 5, as in Table 7)")
    _threat_args(st, steps_default=10)
    st.add_argument("--denominator", choices=["upstream", "previous", "input"], help="default: the run's, else upstream (Eq. 6)")
    st.add_argument("--epoch-time", type=float, help="seconds of one PGD-AT epoch (default: the run's metrics, else measured)")
    st.add_argument("--measure-epoch", action="store_true", help="time PGD-AT steps now, beside the criticality timings (same machine load)")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    st.add_argument("--out", help="JSON file (default: <run folder>/stability.json or ./stability.json)")

    ls = sub.add_parser("layer-sweep", help="the layer oracle: from a checkpoint (init=), fine-tune each layer alone and measure the robust gain")
    ls.add_argument("config", nargs="?", help="YAML config of the fine-tuning (data, model, attack, lr); overrides after it, init=CKPT required")
    ls.add_argument("overrides", nargs="*", help="key=value overrides, e.g. init=ckpt.safetensors finetune.lr=0.01")
    ls.add_argument("--out", required=True, help="sweep folder: one JSON per (layer, seed); a second call continues it")
    ls.add_argument("--epochs", type=int, default=5, help="epochs per item (default 5)")
    ls.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default 0 1 2")
    ls.add_argument("--objective", choices=["clat", "pgd_at"], default="clat", help="CLAT's loss (default) or PGD-AT's, on the one layer")
    ls.add_argument("--lam", type=_float, help="λ of CLAT's objective (default: the config's clat.lam)")
    ls.add_argument("--lam-auto", action="store_true", help="clat.lam_mode=auto: λ = ρ·CE/L_C at the start of each item")
    ls.add_argument("--val-steps", type=int, default=20, help="PGD steps of the validation measurement (default 20)")
    ls.add_argument("--n-val", type=int, help="validation images measured (default: all)")
    ls.add_argument("--layers", type=int, nargs="+", metavar="INDEX", help="only these layers (default: every eligible one)")
    ls.add_argument("--no-reference", action="store_true", help="skip the full-model PGD-AT reference")
    ls.add_argument("--hours", type=float, help="time budget; the next call continues")
    ls.add_argument("--report", action="store_true", help="only render OUT/report.md from what is done")
    ls.add_argument("--title", help="title of the report")

    r = sub.add_parser("report", help="render report.md and plots of run folders from their JSON (several: a comparison too)")
    r.add_argument("run_dirs", nargs="+")
    r.add_argument("--out", help="folder of the comparison of several runs (default: <common parent>/comparison)")
    r.add_argument("--names", help="comma-separated method names for the comparison (default: from each run's stages)")
    r.add_argument("--transfer", help="transfer JSON (from `clat transfer`) to include in the comparison")

    d = sub.add_parser("demo", help="the whole story in ~2 minutes on a CPU, offline, on bundled real data")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--force", action="store_true", help="overwrite an existing demo folder")
    d.add_argument("--fast", action="store_true", help="a much shorter run (smoke test; accuracies stay near chance)")

    sub.add_parser("models", help="list the model registry")
    sub.add_parser("methods", help="list the training methods")
    return p


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


@contextlib.contextmanager
def _writing(paths: Sequence[Path], command: str):
    """Checked before any work: ``paths`` can be written. If they go into a clat run folder, that folder
    is locked for the block (one writer at a time) and they are recorded in its manifest once written."""
    import os

    from clat.runs import RunDir

    paths = [Path(p) for p in paths]
    parent = next((q for q in (paths[0].parent, *paths[0].parent.parents) if q.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise ClatError(f"cannot write {paths[0]}: {parent} is not writable; choose another output (--out)")
    run = RunDir(paths[0].parent)
    if not run.holds_run():
        yield
        return
    with run.lock(command):
        yield
        run.record(*[p for p in paths if p.exists()])


def _run_config(checkpoint: str | None):
    """The config of the run a checkpoint belongs to (the run folder itself, its final weights or an
    epoch checkpoint of it), if any; a ``config.yaml`` that merely lies near a file is not one."""
    if not checkpoint:
        return None
    from clat.runs import RunDir

    run = RunDir.owner_of(checkpoint)
    return run.read_config() if run is not None else None


def cmd_train(args: argparse.Namespace) -> int:
    from clat.config import load_config
    from clat.loop import train

    if args.resume:
        overrides = ([args.config] if args.config else []) + list(args.overrides)
        if args.config and "=" not in args.config:
            raise ClatError("--resume continues a run with its saved config; drop the config file (key=value overrides such as "
                            "pretrain.lr=0.01 may change the learning rate)")
        summary = train(None, args.resume, resume=True, until_epoch=args.until_epoch, overrides=overrides)
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
        summary = train(cfg, run_dir, force=args.force, until_epoch=args.until_epoch)
    from clat import distributed

    if not distributed.info().is_main:  # data-parallel run: rank 0 reports
        return 0
    if not summary.get("finished", True):
        print(f"stopped after epoch {summary['epochs_done']} of {summary['epochs']}: continue with `clat train --resume {summary['run_dir']}`")
        return 0
    from clat.report import run_report

    report = run_report(summary["run_dir"])
    print(f"done: {summary['run_dir']} (report: {report})")
    if summary.get("final_val"):
        v = summary["final_val"]
        print(f"held-out: clean {100 * v['clean_acc']:.2f}%  PGD {100 * v['pgd_acc']:.2f}%  (n={v['n']})")
    return 0


def cmd_criticality(args: argparse.Namespace) -> int:
    import torch

    from clat.checkpoint import atomic_write_text
    from clat.criticality import compute_criticality, eligible_mask
    from clat.data import to_unit_float
    from clat.layers import find_layers
    from clat.models import create_model, model_info
    from clat.report import criticality_rows, plot_criticality, text_table
    from clat.data import prepare_data

    if args.batch_size < 1:
        raise ClatError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.k is not None and args.k < 1:
        raise ClatError(f"--k must be >= 1, got {args.k}")
    run_cfg = _run_config(args.checkpoint)
    cfg = _resolve_data(args, run_cfg)
    threat, source = _threat(args, run_cfg, run_step=True)
    out = Path(args.out) if args.out else (Path(args.checkpoint) if args.checkpoint and Path(args.checkpoint).is_dir() else Path("."))
    device = _pick_device("auto")
    if args.checkpoint:
        model, meta = _load_checkpoint(args.checkpoint, args, device)
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
    cc = cfg.clat.criticality
    layers = find_layers(model, x[:2], merge_norms=cfg.model.merge_norms)
    k = args.k
    if k is None:
        try:
            k = model_info(meta["model"]).default_k
        except ClatError:
            k = max(1, round(0.05 * len(layers)))
    n_ok = sum(eligible_mask(layers, include_classifier=args.include_classifier))
    if k > n_ok:
        raise ClatError(f"k={k} critical layers requested but {n_ok} layers are eligible for selection; choose k between 1 and {n_ok}")
    with _writing([out / "criticality.json", out / "criticality.png"], "criticality"):
        result = compute_criticality(
            model, layers, x, y, attack=threat, steps=args.steps,
            denominator=args.denominator or cc.denominator, scaling=args.scaling or cc.scaling, point=cc.point,
            include_classifier=args.include_classifier,
        )
        print(f"threat model: {_threat_str(threat)} ({source}); denominator {result.settings['denominator']}")
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


def _threat_str(a) -> str:
    from clat.report import eps_str

    return f"{'ℓ∞' if a.norm == 'linf' else 'ℓ2'} ε={eps_str(a.eps, a.norm)}, step {eps_str(a.alpha, a.norm)}"


def _pick_device(name: str):
    from clat.distributed import resolve_device

    return resolve_device(name, option="--device ")


def _load_checkpoint(path: str, args: argparse.Namespace, device):
    from clat.checkpoint import load_model

    return load_model(path, model_name=args.model, num_classes=args.num_classes, normalize=False if args.no_normalize else None, device=device)


def _eval_images(args: argparse.Namespace, splits):
    """The test (or val) images, or a random subset of ``--n-examples`` drawn with ``--seed``."""
    import torch

    _check_image_args(args)
    x, y = (splits.x_test, splits.y_test) if args.split == "test" else (splits.x_val, splits.y_val)
    if args.n_examples is not None:
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))[: args.n_examples]
        x, y = x[idx], y[idx]
    return x, y


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
    from clat.report import eps_str

    parts = [args.split, f"n{args.n_examples}" if args.n_examples is not None else "nall", f"{a.norm}-{eps_str(a.eps, a.norm).replace('/', '-')}"]
    parts.append("nopgd" if args.no_pgd else f"pgd{a.steps}x{args.restarts}")
    parts += (["apgdce"] if args.apgd_ce else []) + ([f"aa-{args.autoattack_version}"] if args.autoattack else [])
    parts += (["sweep"] if args.eps_sweep else []) + (["sanity"] if args.sanity else []) + [f"s{args.seed}"]
    return "_".join(parts)


def _eval_out(args: argparse.Namespace, a) -> Path:
    """Where this evaluation goes, decided before any attack runs. An evaluation never replaces
    another silently: a run's first evaluation is ``eval.json``, one with other settings goes to
    ``eval_<settings>.json``, and a file of the same settings is replaced only with ``--force``."""
    import os

    default_dir = Path(args.checkpoint) if Path(args.checkpoint).is_dir() else Path(".")
    tag = _eval_tag(args, a)
    if args.out:
        out = Path(args.out)
    else:
        out = default_dir / "eval.json"
        if out.exists():
            try:
                same = json.loads(out.read_text()).get("settings_tag") == tag
            except (OSError, ValueError, AttributeError):
                same = False
            if not same:
                out = default_dir / f"eval_{tag}.json"
    if out.exists() and not args.force:
        raise ClatError(f"{out} already holds an evaluation with these settings; pass --force to replace it, or --out FILE to keep both")
    parent = next((p for p in (out.parent, *out.parents) if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise ClatError(f"cannot write {out}: {parent} is not writable; choose another file with --out")
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    if args.restarts < 1:
        raise ClatError(f"--restarts must be >= 1, got {args.restarts}")
    _check_image_args(args)
    run_cfg = _run_config(args.checkpoint)
    cfg = _resolve_data(args, run_cfg)
    a, source = _threat(args, run_cfg)
    out = _eval_out(args, a)  # cheap checks first: nothing is attacked to be lost afterwards
    with _writing([out], "eval"):
        return _eval_into(args, out, cfg, a, source)


def _eval_into(args: argparse.Namespace, out: Path, cfg, a, source: str) -> int:
    from clat.evaluate import autoattack, eps_sweep, evaluate
    from clat.report import eps_str
    from clat.sanity import BANNER, autoattack_check, sanity_checks
    from clat.data import prepare_data

    device = _pick_device(args.device)
    model, meta = _load_checkpoint(args.checkpoint, args, device)
    splits = prepare_data(cfg)
    x, y = _eval_images(args, splits)
    progress = not args.quiet
    print(f"threat model: {_threat_str(a)} ({source})")
    common = dict(norm=a.norm, batch_size=args.batch_size, progress=progress)
    res = evaluate(model, x, y, eps=a.eps, alpha=a.alpha, steps=a.steps, restarts=args.restarts, attack=not args.no_pgd,
                   seed=args.seed, desc=f"PGD-{a.steps}", **common)
    res.update({"checkpoint": meta["path"], "model": meta["model"], "split": args.split, "data": splits.name, "seed": args.seed,
                "subset": args.n_examples is not None, "settings_tag": _eval_tag(args, a),
                "threat_model": {"norm": a.norm, "eps": a.eps, "alpha": a.alpha, "steps": a.steps, "source": source}})
    flags: list[str] = []
    lines = [f"clean {100 * res['clean_acc']:.2f}%"]
    if not args.no_pgd:
        lines.append(f"PGD-{a.steps} {100 * res['pgd_acc']:.2f}% (worst case of {args.restarts} run(s); lowest run "
                     f"{100 * res['pgd_acc_lowest_run']:.2f}%, {res['time_s']:.0f} s)")
    for key, version, on in (("apgd_ce", "apgd-ce", args.apgd_ce), ("autoattack", args.autoattack_version, args.autoattack)):
        if not on:
            continue
        aa = autoattack(model, x, y, eps=a.eps, norm=a.norm, version=version, batch_size=args.batch_size, seed=args.seed,
                        device=device, progress=progress)
        res[key] = aa
        name = "APGD-CE" if key == "apgd_ce" else f"AutoAttack ({version})"
        lines.append(f"{name} {100 * aa['robust_acc']:.2f}% ({aa['time_s']:.0f} s)")
        flags += [f"{name} (pyautoattack's own check): {w}" for w in aa["warnings"]]
        if not aa["within_eps"]:
            flags.append(f"{name} returned perturbations of size {aa['max_perturbation']:.4g} > ε = {a.eps:.4g}")
        if not args.no_pgd:
            chk = autoattack_check(res["pgd_acc"], aa["robust_acc"], res["n"], name=name)
            res.setdefault("checks", []).append(chk)
            if chk["flag"]:
                flags.append(f"{chk['title']}: {chk['message']}")
    if args.eps_sweep:
        sw = eps_sweep(model, x, y, args.eps_sweep, alpha_ratio=a.alpha / a.eps, steps=a.steps, seed=args.seed, **common)
        res["eps_sweep"] = sw
        lines.append("ε sweep: " + "  ".join(f"{eps_str(p['eps'], a.norm) if p['eps'] else 0}: {100 * p['acc']:.1f}%" for p in sw["points"]))
    if args.sanity:
        surrogates = {}
        for i, sp in enumerate(args.surrogate):
            sur, smeta = _load_checkpoint(sp, argparse.Namespace(model=None, num_classes=None, no_normalize=False), device)
            surrogates[Path(sp).name if Path(sp).name not in surrogates else f"{Path(sp).name}#{i}"] = sur
        if args.square_queries < 0:
            raise ClatError(f"--square-queries must be >= 0, got {args.square_queries}")
        san = sanity_checks(model, x, y, eps=a.eps, alpha=a.alpha, steps=a.steps, surrogates=surrogates,
                            square_queries=args.square_queries, seed=args.seed, **common)
        res["sanity"] = san
        flags = [f"{BANNER}: {f}" for f in san["flags"]] + flags
        san["flags"] = [f"{BANNER}: {f}" for f in san["flags"]]
        lines.append(f"sanity checks: {len(san['checks']) - len(san['flags'])}/{len(san['checks'])} passed ({san['time_s']:.0f} s)")
    res["flags"] = flags
    from clat.checkpoint import atomic_write_text

    atomic_write_text(out, json.dumps(res, indent=2))
    print("  ".join(lines[:2]) + f"  (n={res['n']})")
    for line in lines[2:]:
        print(line)
    for f in flags:
        _warn(f)
    print(f"-> {out}")
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    from clat.evaluate import transfer_matrix
    from clat.report import plot_transfer, text_table, transfer_rows
    from clat.data import prepare_data

    if args.restarts < 1:
        raise ClatError(f"--restarts must be >= 1, got {args.restarts}")
    names = [n.strip() for n in args.names.split(",")] if args.names else [Path(c).stem if Path(c).is_file() else Path(c).name for c in args.checkpoints]
    if len(names) != len(args.checkpoints):
        raise ClatError(f"--names gives {len(names)} names for {len(args.checkpoints)} checkpoints")
    if len(set(names)) != len(names):
        names = [f"{n} ({i})" for i, n in enumerate(names)]
    cfg = _resolve_data(args, _run_config(args.checkpoints[0]))
    device = _pick_device(args.device)
    models = {}
    for n, c in zip(names, args.checkpoints):
        models[n], _ = _load_checkpoint(c, args, device)
    splits = prepare_data(cfg)
    x, y = _eval_images(args, splits)
    a, source = _threat(args, _run_config(args.checkpoints[0]))
    print(f"threat model: {_threat_str(a)} ({source})")
    res = transfer_matrix(models, x, y, eps=a.eps, alpha=a.alpha, steps=a.steps, restarts=args.restarts, norm=a.norm,
                          batch_size=args.batch_size, seed=args.seed, progress=not args.quiet)
    res.update({"checkpoints": list(args.checkpoints), "data": splits.name, "split": args.split})
    out = Path(args.out)
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
    run_cfg = _run_config(args.checkpoint)
    cfg = _resolve_data(args, run_cfg)
    threat, threat_source = _threat(args, run_cfg, run_step=True)
    run_dir = Path(args.checkpoint) if Path(args.checkpoint).is_dir() else None
    out = Path(args.out) if args.out else (run_dir or Path(".")) / "stability.json"
    with _writing([out], "stability"):
        return _stability_into(args, sizes, out, run_dir, cfg, threat, threat_source)


def _stability_into(args: argparse.Namespace, sizes: list[int], out: Path, run_dir: Path | None, cfg, threat, threat_source: str) -> int:
    from clat.checkpoint import atomic_write_text
    from clat.stability import criticality_stability, measure_pgd_at_epoch_time
    from clat.runs import RunDir
    from clat.data import prepare_data

    device = _pick_device(args.device)
    model, meta = _load_checkpoint(args.checkpoint, args, device)
    splits = prepare_data(cfg)
    epoch_time, source = args.epoch_time, "given with --epoch-time"
    if epoch_time is None and not args.measure_epoch and run_dir is not None:
        rows = [r for r in RunDir(run_dir).metrics() if r.get("method") == "pgd_at" and "epoch_time_s" in r]
        if rows:
            epoch_time = sum(r["epoch_time_s"] for r in rows) / len(rows)
            source = f"mean epoch_time_s of the run's {len(rows)} PGD-AT epochs in metrics.jsonl"
    if epoch_time is None:
        a = cfg.attack
        epoch_time = measure_pgd_at_epoch_time(model, splits.x_train, splits.y_train, batch_size=cfg.data.batch_size, attack=a)
        source = f"measured: PGD-AT (PGD-{a.steps}) steps of batch {cfg.data.batch_size}, extrapolated to {len(splits.x_train)} images"
    print(f"threat model: {_threat_str(threat)} ({threat_source})")
    res = criticality_stability(model, splits.x_train, splits.y_train, batch_sizes=sizes, repeats=args.repeats, reference_size=args.reference_size,
                                k=args.k, attack=threat, steps=threat.steps, denominator=args.denominator or cfg.clat.criticality.denominator,
                                seed=args.seed, epoch_time_s=epoch_time,
                                progress=not args.quiet)
    res.update({"epoch_time_source": source, "checkpoint": meta["path"], "model": meta["model"], "data": splits.name})
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(res, indent=2))
    from clat.report import text_table

    print(f"reference top-{res['k']} ({res['reference']['size']} images): {res['reference']['top_k']}  ({', '.join(res['reference']['names'])})")
    print(text_table(["batch", "overlap", "same set", "same order", "top-1", "Spearman", "time (s)", "% of epoch"],
                     [[r["batch_size"], f"{100 * r['overlap_mean']:.0f}%", f"{100 * r['same_set']:.0f}%", f"{100 * r['same_order']:.0f}%",
                       f"{100 * r['top1_agrees']:.0f}%", f"{r['spearman_mean']:.2f}", f"{r['time_s_mean']:.3f}",
                       f"{100 * r['fraction_of_epoch']:.2f}%"] for r in res["rows"]]))
    print(f"one PGD-AT epoch: {epoch_time:.1f} s ({source}) -> {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import os

    from clat.report import comparison_report, run_report

    transfer = None
    if args.transfer:  # read (and refused) before any report is rendered
        try:
            transfer = json.loads(Path(args.transfer).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ClatError(f"could not read the transfer JSON {args.transfer}: {e}") from None
        if not isinstance(transfer, dict) or "matrix" not in transfer or "names" not in transfer:
            raise ClatError(f"{args.transfer} is not a transfer matrix written by `clat transfer`")
    from clat.report import read_run

    for d in args.run_dirs:
        read_run(d)  # every run folder readable before anything is written
    for d in args.run_dirs:
        with _writing([Path(d) / "report.md", Path(d) / "plots"], "report"):
            print(run_report(d))
    if len(args.run_dirs) > 1 or args.transfer:
        if args.out:
            out = Path(args.out)
        elif len(args.run_dirs) > 1:
            out = Path(os.path.commonpath([str(Path(d).resolve()) for d in args.run_dirs])) / "comparison"
        else:
            out = Path(args.run_dirs[0]) / "comparison"
        names = [n.strip() for n in args.names.split(",")] if args.names else None
        with _writing([out], "report"):
            print(comparison_report(args.run_dirs, out, names=names, transfer=transfer))
    return 0


def cmd_layer_sweep(args: argparse.Namespace) -> int:
    from clat.sweep import SweepSettings, layer_sweep, render

    if not args.report:
        from clat.config import load_config

        overrides = list(args.overrides)
        cfg_path = args.config
        if cfg_path and "=" in cfg_path:
            overrides.insert(0, cfg_path)
            cfg_path = None
        cfg = load_config(cfg_path, overrides)
        settings = SweepSettings(epochs=args.epochs, seeds=list(args.seeds), objective=args.objective, lam=args.lam,
                                 lam_mode="auto" if args.lam_auto else "fixed", val_steps=args.val_steps, n_val=args.n_val,
                                 layers=args.layers, reference=not args.no_reference)
        res = layer_sweep(cfg, args.out, settings, hours=args.hours, log=lambda m: print(m, flush=True) if not args.quiet else None)
        print(f"{res['done']} of {res['total']} items done in {args.out}")
    print(f"report: {render(args.out, args.title)}")
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

    import torch

    rows = []
    for name in list_models():
        with torch.device("meta"):  # counting only: no memory for WRN-70-16's 267M parameters
            m = create_model(name)
        rows.append([name, f"{sum(p.numel() for p in m.parameters()):,}", len(find_layers(m)), model_info(name).default_k, model_info(name).description])
    print(text_table(["name", "params (10 classes)", "layers", "default k", "description"], rows))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from clat import methods

    for name in methods.list_methods():
        doc = methods.method_class(name).__module__
        first = (sys.modules[doc].__doc__ or "").strip().splitlines()[0]
        print(f"{name:10s} {first}")
    return 0


COMMANDS = {
    "train": cmd_train, "layer-sweep": cmd_layer_sweep, "criticality": cmd_criticality, "eval": cmd_eval, "transfer": cmd_transfer, "stability": cmd_stability, "report": cmd_report,
    "demo": cmd_demo, "models": cmd_models, "methods": cmd_methods,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed in one line
        return int(e.code or 0)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    warnings.simplefilter("default")
    warnings.formatwarning = lambda msg, cat, *a, **k: f"clat: warning: {msg}\n"
    try:
        return COMMANDS[args.command](args)
    except ClatError as e:
        print(f"clat: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file system problem outside clat's own checks
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"clat: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clat: interrupted (a run continues with `clat train --resume RUN_DIR`)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
