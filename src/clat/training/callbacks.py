"""Callbacks of the training loop, and the loggers built on them (``log:`` in the config; docs/logging.md).

``clat.train(cfg, run_dir, callbacks=[...])`` calls, on rank 0 only and in this order, the
loggers the config selects and then the given callbacks: ``on_train_start(info)`` once the run
folder is ready, ``on_batch_end(batch)`` after each optimizer step, ``on_epoch_end(row)`` after each
epoch's row, best weights and checkpoint are written (``row``: a copy of the line added to
``metrics.jsonl``), ``on_train_end(summary)`` with what ``train`` returns (also after an
``until_epoch`` chunk or a stop). Before ``on_train_start`` each callback that has ``set_run``
(every :class:`Callback`) is given the :class:`LiveRun`: ``self.run.model``, ``self.run.optimizer``,
and ``self.run.stop(reason)``, which ends the run cleanly (resumable, and the summary says a callback
stopped it). An exception in a callback stops the run like any other error; the checkpoints written
so far are kept and ``resume=True`` continues.

Loggers (:data:`LOGGERS`, ``clat list loggers``): ``metrics.csv`` (rewritten from ``metrics.jsonl`` after each epoch,
so it matches it after a kill and resume), TensorBoard (``RUN/tensorboard``) and Weights & Biases (``RUN/wandb``), the
last two optional packages imported only when selected; ``log.loggers`` adds registered ones or a
``package.module:factory`` of yours.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import importlib
import io
import logging
import sys
import uuid
from typing import Any, Iterator, Sequence

from clat.base.errors import ConfigError
from clat.base.registry import Registry
from clat.runs.checkpoint import atomic_write_text
from clat.runs.folder import RunDir

HOOKS = ("on_train_start", "on_batch_end", "on_epoch_end", "on_train_end")
_SCALARS = (int, float, str, bool, type(None))


class LiveRun:
    """The training as it runs, for callbacks (``self.run``): the objects it trains with, where it is, and :meth:`stop`.

    ``model`` is the module being trained (changing it changes the run); ``optimizer`` and ``scheduler`` are the current
    stage's (None before the first epoch starts: each stage makes its own); ``ema_model`` is the stage's EMA of the
    weights (``ema_decay``; the module that is evaluated and saved), else None. ``stage`` (pretrain/finetune),
    ``epoch`` (1-based) and ``step`` (optimizer steps since the run began, 1-based) say where it is."""

    def __init__(self, run_dir: str, model: Any) -> None:
        self.run_dir, self.model = run_dir, model
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.ema_model: Any = None
        self.stage: str | None = None
        self.epoch = 0
        self.step = 0
        self.stop_reason: str | None = None
        self.stop_now = False

    def stop(self, reason: str = "", *, now: bool = False) -> None:
        """End the run cleanly: after the current epoch (evaluated and checkpointed), or with ``now=True`` right after the
        current step, leaving that epoch unfinished (a resumed run redoes it from the last checkpoint; in memory the model
        keeps the weights of that step). Under several ranks a stop takes effect at the epoch's end. ``train`` returns
        ``{"finished": False, "stopped_by": "callback: REASON", ...}``; ``resume=True`` continues the run."""
        self.stop_reason = str(reason) or "no reason given"
        self.stop_now = self.stop_now or now


class Callback:
    """Base class of training callbacks: override the hooks you need (each does nothing here). ``self.run``: the
    :class:`LiveRun` (model, optimizer, ``stop()``), set before ``on_train_start``."""

    run: LiveRun | None = None

    def set_run(self, run: LiveRun) -> None:
        self.run = run

    def on_train_start(self, info: dict) -> None:
        """``info``: run_dir, config (the resolved config as a dict), resume, first_epoch (1-based), epochs, model (its
        metadata; the module itself is ``self.run.model``)."""

    def on_batch_end(self, batch: dict) -> None:
        """After each optimizer step: ``batch`` holds epoch (1-based), stage, step (1-based, counted from the run's start),
        batch (1-based within the epoch) and metrics (the step's training metrics as 0-dim tensors on the device:
        ``.item()`` waits for the device, so read them only every so many steps on a GPU)."""

    def on_epoch_end(self, row: dict) -> None:
        """``row``: the epoch's metrics row (epoch is 1-based; ``val`` when it was evaluated)."""

    def on_train_end(self, summary: dict) -> None:
        """``summary``: what ``train`` returns (``finished`` False after an ``until_epoch`` chunk or a stop)."""


def flat_row(row: dict, sep: str = ".", numbers_only: bool = False) -> dict[str, Any]:
    """A metrics row as flat columns: scalars, and the scalars of its flat sections (``train.loss``, ``val.pgd_acc``);
    a list of scalars (CLAT's ``selected`` layers) becomes one ``;``-joined string. Events with nested data (CLAT's
    ``selection``, RiFT's ``interpolation``, ``resume_overrides``) and the record's ``schema`` stay in metrics.jsonl only."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k == "schema":
            continue
        if isinstance(v, dict) and all(isinstance(x, _SCALARS) for x in v.values()):
            out.update({f"{k}{sep}{kk}": x for kk, x in v.items()})
        elif isinstance(v, list) and all(isinstance(x, _SCALARS) for x in v):
            out[k] = ";".join(map(str, v))
        elif isinstance(v, _SCALARS):
            out[k] = v
    if numbers_only:
        out = {k: v for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"}
    return out


def format_row(row: dict) -> str:
    """The console's line of an epoch (``log.console``)."""
    parts = [f"epoch {row['epoch']:3d} {row['method']:<8s}", f"loss {row['train'].get('loss', float('nan')):.4f}"]
    if "val" in row:
        parts.append(f"val clean {row['val']['clean_acc']:.3f} pgd {row['val']['pgd_acc']:.3f}")
    parts.append(f"trainable {row['trainable_params']:,}")
    if row.get("selected"):
        parts.append(f"layers {','.join(row['selected'])}")
    parts.append(f"{row['time_s']:.1f}s")
    return " | ".join(parts)


class CSVLogger(Callback):
    """``metrics.csv``: one row per epoch, columns in order of first appearance, rewritten whole from metrics.jsonl."""

    def __init__(self, rd: RunDir) -> None:
        self.rd = rd

    def on_train_start(self, info: dict) -> None:
        self.rd.record(self.rd.csv_path.name)
        self.write()  # a resumed run's file matches its (truncated) metrics.jsonl before the first new epoch

    def on_epoch_end(self, row: dict) -> None:
        self.write()

    def write(self) -> None:
        rows = [flat_row(r) for r in self.rd.metrics()]
        buf = io.StringIO()
        w = csv.DictWriter(buf, list(dict.fromkeys(k for r in rows for k in r)), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.rd.csv_path, buf.getvalue())


def _optional(module: str, extra: str, key: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{key}=true needs the {extra} package: pip install \"clat-at[{extra}]\" (or pip install {extra}), or set "
                          f"{key}=false") from None


class TensorBoardLogger(Callback):
    """Scalars in ``RUN/tensorboard`` (``tensorboard --logdir RUN/tensorboard``), one step per epoch. Each session
    logs the earlier rows again with ``purge_step=1``: TensorBoard hides what an interrupted session logged before,
    so the curves are those of metrics.jsonl, however often the run was killed and resumed."""

    def __init__(self, rd: RunDir) -> None:
        self.rd, self.writer = rd, None
        _optional("torch.utils.tensorboard", "tensorboard", "log.tensorboard")  # checked before the run starts

    def on_train_start(self, info: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.rd.record(self.rd.tensorboard_dir.name)
        rows = self.rd.metrics()
        self.writer = SummaryWriter(str(self.rd.tensorboard_dir), purge_step=1 if rows else None)
        for r in rows:
            self.on_epoch_end(r)

    def on_epoch_end(self, row: dict) -> None:
        for k, v in flat_row(row, "/", numbers_only=True).items():
            self.writer.add_scalar(k, v, row["epoch"])
        self.writer.flush()  # a killed process loses nothing it has logged

    def on_train_end(self, summary: dict) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbLogger(Callback):
    """A Weights & Biases run under ``RUN/wandb``: the resolved config, the numbers of each epoch's row (step =
    epoch) and the summary's best epoch. Its id is kept in ``RUN/wandb/clat-run-id``, so a resumed run continues
    the same W&B run. ``WANDB_MODE=offline`` writes it locally (``wandb sync RUN/wandb/offline-run-*`` uploads it)."""

    def __init__(self, rd: RunDir, project: str, entity: str | None) -> None:
        self.rd, self.project, self.entity, self.run = rd, project, entity, None
        self.wandb = _optional("wandb", "wandb", "log.wandb")

    def on_train_start(self, info: dict) -> None:
        self.rd.record(self.rd.wandb_dir.name)
        self.run = self.wandb.init(dir=str(self.rd.path), project=self.project, entity=self.entity, config=info["config"],
                                   id=self.run_id(), resume="allow", name=self.rd.path.name)

    def run_id(self) -> str:
        f = self.rd.wandb_dir / "clat-run-id"
        if not f.is_file():  # a new run (--force removed the old run's folder with its id)
            atomic_write_text(f, uuid.uuid4().hex[:16])
        return f.read_text().strip()

    def on_epoch_end(self, row: dict) -> None:
        self.run.log(flat_row(row, "/", numbers_only=True), step=row["epoch"])

    def on_train_end(self, summary: dict) -> None:
        self.run.summary.update({k: v for k,
                                 v in summary.items() if k.startswith(("best_", "stopped_", "epochs")) and isinstance(v, _SCALARS)})
        self.run.finish()
        self.run = None

    def close(self) -> None:
        if self.run is not None:  # the run stopped with an error
            self.run.finish(exit_code=1)
            self.run = None


# The loggers a run may name (:class:`clat.base.registry.Registry`): a factory ``fn(run_dir, cfg)`` (``run_dir``: the
# :class:`RunDir`, ``.path`` its folder; ``cfg``: the run's config) returning a :class:`Callback`. The config's
# switches (log.csv, log.tensorboard, log.wandb) name the built-in ones; ``log.loggers`` names more, built after them.
LOGGERS = Registry("logger", "log.loggers")
LOGGERS.add("csv", lambda rd, cfg: CSVLogger(rd), description="metrics.csv in the run folder, rewritten after each epoch (log.csv: on)")
LOGGERS.add("tensorboard", lambda rd, cfg: TensorBoardLogger(rd),
            description="scalars in RUN/tensorboard (log.tensorboard; clat-at[tensorboard])")
LOGGERS.add("wandb", lambda rd, cfg: WandbLogger(rd, cfg.log.wandb_project, cfg.log.wandb_entity),
            description="a Weights & Biases run under RUN/wandb (log.wandb; clat-at[wandb])")


def logger_names(lg) -> list[str]:
    """The loggers a run's ``log`` section selects, in the order they are called: the built-in switches, then ``log.loggers``."""
    names = [n for n, on in (("csv", lg.csv), ("tensorboard", lg.tensorboard), ("wandb", lg.wandb)) if on]
    return names + [n for n in dict.fromkeys(lg.loggers) if LOGGERS.canonical(n) not in names]


class Callbacks:
    """The run's callbacks: the config's loggers, then the caller's (rank 0; empty on the other ranks)."""

    def __init__(self, callbacks: Sequence[Any] = (), loggers: int = 0) -> None:
        self.callbacks = list(callbacks)
        self.loggers = self.callbacks[:loggers]  # closed however the run ends
        self.live = LiveRun("", None)  # the training's, once it starts (clat.loop)
        # the per-step hook only where a callback has its own (a step calls nothing otherwise)
        self.batch_hooks = [cb.on_batch_end for cb in self.callbacks if callable(getattr(cb, "on_batch_end", None))
                            and getattr(type(cb), "on_batch_end", None) is not Callback.on_batch_end]

    def set_run(self, run: LiveRun) -> None:
        for cb in self.callbacks:
            if callable(getattr(cb, "set_run", None)):
                cb.set_run(run)

    def batch_end(self, batch: dict) -> None:
        for hook in self.batch_hooks:
            hook({**batch, "metrics": dict(batch["metrics"])})

    @classmethod
    def build(cls, cfg, rd: RunDir, user: Sequence[Any], is_main: bool) -> "Callbacks":
        """Checked before the run folder is touched: the callbacks given, the optional packages, and that no file or
        folder the loggers (and ``best/``) would write is one clat did not write."""
        if not isinstance(user, (list, tuple)):
            raise ConfigError(f"callbacks must be a list of objects with {'/'.join(HOOKS)} methods, got {type(user).__name__}")
        for i, cb in enumerate(user):
            if not any(callable(getattr(cb, h, None)) for h in HOOKS):
                raise ConfigError(f"callbacks[{i}] ({cb!r:.60}) has none of the methods {', '.join(HOOKS)}; subclass clat.Callback")
        names = logger_names(cfg.log)
        factories = [LOGGERS.get(n) for n in names]  # an unknown name stops here, on every rank, before anything is written
        if not is_main:
            return cls()
        files = ((rd.csv_path, "csv"), (rd.tensorboard_dir, "tensorboard"), (rd.wandb_dir, "wandb"))
        paths = [rd.best_dir] + [p for p, n in files if n in names]
        foreign = rd.foreign([p.name for p in paths])
        if foreign:
            raise ConfigError(f"run folder {rd.path} holds {', '.join(foreign)} that clat did not write and would write into; "
                              "clat never replaces files it did not write: move them, or choose another --run-dir")
        loggers = [make(rd, cfg) for make in factories]
        for n, lg in zip(names, loggers):
            if not any(callable(getattr(lg, h, None)) for h in HOOKS):
                raise ConfigError(f"log.loggers: {n} returned {type(lg).__name__}, not a callback "
                                  f"(a clat.Callback, with {'/'.join(HOOKS)})")
        return cls([*loggers, *user], len(loggers))

    def call(self, hook: str, arg: dict) -> None:
        arg = copy.deepcopy(arg)  # what a callback changes is its own
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(arg)

    def __enter__(self) -> "Callbacks":
        return self

    def __exit__(self, *exc) -> None:
        """The loggers' files closed, also when the run stops with an error (which goes on)."""
        for cb in self.loggers:
            if callable(getattr(cb, "close", None)):
                cb.close()


@contextlib.contextmanager
def console(on: bool) -> Iterator[None]:
    """``log.console``: the per-epoch lines of the ``clat`` logger reach stderr from the Python API too. Where the
    program configured logging (the CLI does; ``-q`` sets WARNING), the lines follow that configuration; where
    nothing did, a handler for the run's duration prints them."""
    logger = logging.getLogger("clat")
    if not on or logger.hasHandlers():
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if level == logging.NOTSET else level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
