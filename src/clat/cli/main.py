"""The ``clat`` command line: train | criticality | eval | transfer | stability | layer-sweep | report | demo | models | methods | list |
configs | config.

Errors a user can cause print one or two lines (``clat: error: …``) and exit
with code 2; nothing else in here knows about training.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import NoReturn, Sequence

from clat.base.errors import ClatError
from clat.base.versions import __version__
from clat.cli.analyses import cmd_criticality, cmd_stability, cmd_transfer
from clat.cli.commands import cmd_demo, cmd_eval, cmd_layer_sweep, cmd_report, cmd_train
from clat.cli.listing import REGISTRIES, cmd_config, cmd_configs, cmd_list, cmd_methods, cmd_models
from clat.config.load import coerce

log = logging.getLogger("clat")


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["bundled", "cifar10", "cifar100", "folder", "npz"],
                   help="default: the run's data set, else bundled; folder, npz: your own data in --root (docs/data.md)")
    g.add_argument("--root", help="folder holding cifar-10-batches-py / cifar-100-python; the image folder (folder) or .npz file (npz)")
    g.add_argument("--download", action="store_true", help="download the official archive if missing (checksum verified)")
    g.add_argument("--no-verify", action="store_true", help="accept a local copy whose checksums are not the official ones (warns)")


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (for files that do not say which model they hold)")
    g.add_argument("--model", help="model name (see `clat models`)")
    g.add_argument("--num-classes", type=int)
    g.add_argument("--no-normalize", action="store_true", help="the checkpoint expects raw [0, 1] inputs without normalization")


def _float(s: str) -> float:
    try:
        return coerce(s, float, "value")
    except ClatError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _float_list(s: str) -> list[float]:
    return [_float(v.strip()) for v in s.split(",") if v.strip()]


def _eps_list(s: str) -> list[float]:
    """``--eps-sweep``, checked as it is parsed: before any attack (not after the main evaluation, which it lost)."""
    eps = _float_list(s)
    if not eps or not all(0 <= e < float("inf") for e in eps):
        raise argparse.ArgumentTypeError(f"needs one or more finite radii >= 0, got {s!r}; e.g. --eps-sweep 0,2/255,4/255,8/255")
    return eps


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


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump), like every other clat error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"clat: error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="clat", description="Criticality-Leveraged Adversarial Training")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-epoch lines (bars are shown on a terminal only)")
    p.add_argument("--version", action="version", version=_version_line())
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train from a YAML config (pretrain stage, then CLAT fine-tuning)")
    t.add_argument("config", nargs="?", help="YAML file, or a packaged config by name (`clat configs`), e.g. "
                                             "paper/cifar10/resnet18_pgd_at_clat")
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
    c.add_argument("--k", type=int, help="mark the top-k (default: the run's clat.k, else the model's paper default, as CLAT would train)")
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
    e.add_argument("--which", choices=["last", "best"], default="last",
                   help="weights of a run folder: last (the final ones, default) or best (RUN/best/: the best held-out PGD accuracy)")
    _attack_args(e)
    e.add_argument("--restarts", type=int, default=1, help="PGD runs; accuracy of each, the lowest, and the per-example worst case "
                                                           "(paper: >= 10)")
    e.add_argument("--no-pgd", action="store_true", help="skip clat's own PGD (clean accuracy is still measured)")
    e.add_argument("--autoattack", action="store_true", help="standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) from pyautoattack")
    e.add_argument("--autoattack-version", choices=["standard", "plus", "rand"], default="standard")
    e.add_argument("--apgd-ce", action="store_true", help="APGD-CE alone from pyautoattack, 1 restart (paper Table 8)")
    e.add_argument("--eps-sweep", type=_eps_list, metavar="LIST",
                   help="PGD accuracy at each ε, e.g. 0,2/255,4/255,8/255,16/255 (Figure 4)")
    e.add_argument("--sanity", action="store_true", help="checks against gradient masking (flags are printed and stored)")
    e.add_argument("--surrogate", action="append", default=[], metavar="CKPT", help="transfer source for the black-box sanity check "
                                                                                    "(repeatable)")
    e.add_argument("--square-queries", type=int, default=1000, help="queries of the Square black-box sanity check (0: skip; default 1000)")
    e.add_argument("--attack", action="append", default=[], metavar="NAME",
                   help="another evaluation attack (repeatable): a name of `clat list attacks` (e.g. square) or your own as "
                   "package.module:Class")
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
    st.add_argument("--measure-epoch", action="store_true", help="time PGD-AT steps now, beside the criticality timings (same machine "
                                                                 "load)")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    st.add_argument("--out", help="JSON file (default: <run folder>/stability.json or ./stability.json)")

    ls = sub.add_parser("layer-sweep", help="the layer oracle: from a checkpoint (init=), fine-tune each layer alone and measure the "
                                            "robust gain")
    ls.add_argument("config", nargs="?", help="YAML config of the fine-tuning (data, model, attack, lr); overrides after it, init=CKPT "
                                              "required")
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
    ls.add_argument("--estimators", nargs="+", default=[], metavar="NAME",
                    help="selectors scored besides the default estimators (`clat list selectors`, or package.module:function)")
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

    cs = sub.add_parser("configs", help="list the packaged configs (`clat train NAME` runs one)")
    cs.add_argument("prefix", nargs="?", help="only names starting with this, e.g. paper/cifar10")
    cf = sub.add_parser("config", help="`clat config show [CONFIG] [key=value ...]`: every key with its value, type, help and default")
    cf = cf.add_subparsers(dest="action", required=True, parser_class=_Parser).add_parser(
        "show", help="every key of the resolved config with its value, type, help and default")
    cf.add_argument("config", nargs="?", help="YAML file or packaged config name (default: the defaults alone)")
    cf.add_argument("overrides", nargs="*", help="key=value overrides")
    cf.add_argument("--changed", action="store_true", help="only the keys that differ from the defaults")
    cf.add_argument("--yaml", action="store_true", help="print the resolved config as YAML (what a run saves as config.yaml)")

    sub.add_parser("models", help="list the model registry")
    sub.add_parser("methods", help="list the training methods")
    li = sub.add_parser("list", help="every registry: models, methods, selectors, attacks, datasets, loggers (name and description)")
    li.add_argument("kind", nargs="?", choices=list(REGISTRIES), help="only this kind")
    li.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                    help="import MODULE first (a file of yours: its registrations are listed)")
    return p


def _version_line() -> str:
    return f"clat {__version__}"


COMMANDS = {
    "train": cmd_train, "layer-sweep": cmd_layer_sweep, "criticality": cmd_criticality, "eval": cmd_eval, "transfer": cmd_transfer,
    "stability": cmd_stability, "report": cmd_report,
    "demo": cmd_demo, "models": cmd_models, "methods": cmd_methods, "list": cmd_list, "configs": cmd_configs, "config": cmd_config,
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
    args.progress = not args.quiet and sys.stderr.isatty()  # progress bars only on a terminal: a log file gets the lines alone
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:  # `clat config show | head -1`: the reader has what it wanted; stop quietly, as `yes | head` does

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the unflushed rest goes nowhere at exit
        return 141  # 128 + SIGPIPE, what a shell reports for a tool stopped by a closed pipe
    except ClatError as e:
        print(f"clat: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file system problem outside clat's own checks
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"clat: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clat: interrupted; {_after_interrupt(args)}", file=sys.stderr)
        return 130


def _after_interrupt(args: argparse.Namespace) -> str:
    """What to do after Ctrl-C, in the words of the command that was stopped."""
    if args.command == "train":
        run = getattr(args, "resume", None) or getattr(args, "run_dir", None) or "RUN_DIR"
        return f"the run continues from its last checkpoint with `clat train --resume {run}`"
    if args.command == "demo":
        return f"start the demo again with `clat demo --force --out {args.out}` (it replaces only what the demo wrote)"
    if args.command == "layer-sweep":
        return "run the same command again: the sweep continues with the items not done"
    if args.command == "report":
        return "run `clat report` again: it renders the whole report from the run's files"
    return f"its results are written when it completes: run the same `clat {args.command}` command again (with --force where it says so)"


if __name__ == "__main__":
    sys.exit(main())
