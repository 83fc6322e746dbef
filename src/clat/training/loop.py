"""THE training loop: every method, every stage, checkpoints and resume.

A run is one or two stages, ``pretrain`` (a baseline such as PGD-AT) then ``finetune`` (CLAT, or any
method), each a :class:`clat.training.stage.Stage`: its own optimizer (SGD or AdamW), schedule and EMA of the weights, if any.
The loop knows nothing of any method: it asks the stage for the epoch's steps, logs the events the
method's hooks return, and saves the stage's state. When CLAT re-selects layers the optimizer and
schedule carry on; only the optimizer state of parameters that became frozen is dropped.

Read top to bottom: :func:`train` (resume or new) -> :func:`_train_locked` (validate everything, then
prepare the folder, then the epochs) -> :func:`_run_epoch` -> :func:`_commit` -> :func:`_finish`. The run folder and
its files belong to :mod:`clat.runs`; data to :mod:`clat.data`; devices and ranks to :mod:`clat.distributed`; the
best epoch and early stopping to :mod:`clat.best`; callbacks and loggers to :mod:`clat.callbacks`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from clat.base import distributed as dist_mod
from clat.base import rng
from clat.base.errors import ClatError, ConfigError
from clat.base.run_records import SCHEMA, MetricsRow, SelectionEvent, Summary
from clat.base.versions import versions
from clat.config.load import flat_keys, override, parse_overrides
from clat.config.schema import Config, StageConfig, to_dict
from clat.data.loader import Loader, Splits
from clat.data.prepare import run_data
from clat.data.stream import train_loader
from clat.layers.discovery import Layer
from clat.methods import EpochContext, create_method
from clat.models import PYTHON_MODEL, is_factory, model_info
from clat.runs.checkpoint import atomic_write_text, load_into, save_weights
from clat.runs.folder import RunDir
from clat.runs.soundness import divergence_advice, health, weight_scale
from clat.training.callbacks import Callbacks, LiveRun, console, format_row
from clat.training.early_stop import ValHistory, save_best
from clat.training.resume import Resumed
from clat.training.stage import Stage, StepRunner, resolve_channels_last
from clat.training.validation import held_out, validate
from clat.training.warmstart import build_model, load_init, run_layers

log = logging.getLogger("clat")

# Keys --resume may change: none of them changes what the finished run computes, except the learning rates,
# which continue on the same schedule from the new value (the divergence remedy); the change is recorded.
RESUME_OVERRIDABLE = ("pretrain.lr", "finetune.lr", "progress", "keep_checkpoints", "device", "eval.every", "compile",
                      "log.console", "log.csv", "log.tensorboard", "log.wandb", "log.loggers", "fused_optimizer", "data.workers")


class TrainingDiverged(ClatError):
    """The loss became NaN or infinite."""


def train(cfg: Config | None, run_dir: str | Path, *, resume: bool = False, force: bool = False, model: nn.Module | None = None,
          data=None, until_epoch: int | None = None, overrides: Sequence[str] = (), callbacks: Sequence = ()) -> dict:
    """Run (or resume) the training described by ``cfg`` in ``run_dir``; returns the summary.

    With ``resume=True`` the config saved in ``run_dir`` is used and training continues from the latest
    valid checkpoint; ``overrides`` may change the keys in ``RESUME_OVERRIDABLE`` (a lower learning rate
    after a divergence, say), recorded in the run's config and metrics. The run folder is locked for the
    whole call (:mod:`clat.runs`). ``model`` (any ``nn.Module`` taking [0, 1] images) and ``data`` (Splits, DatasetSplits, a Dataset or
    DataLoader; recorded as ``data.dataset: python``, docs/data.md) replace the ones the config names; the model is trained in place.

    ``until_epoch=N`` stops after the run's N-th epoch (its checkpoint written) and returns
    ``{"finished": False, ...}``; ``resume=True`` later continues exactly where it stopped, so a long run
    can be done in chunks (the same schedule as one uninterrupted run).

    ``callbacks``: :class:`clat.Callback` objects, called on rank 0 after the loggers of ``cfg.log`` (:mod:`clat.callbacks`);
    ``cfg.log.console`` prints a line per epoch (on stderr, unless the program configured logging).

    Under ``torchrun`` (or inside an initialized process group) every rank calls this and the run is
    data-parallel (:mod:`clat.distributed`); only rank 0 writes files.
    """
    run_dir = Path(run_dir)
    if until_epoch is not None and until_epoch < 1:
        raise ConfigError(f"until_epoch must be >= 1, got {until_epoch}")
    changed: dict = {}
    if resume:
        rd = RunDir(run_dir)
        if not rd.config_path.is_file():
            raise ConfigError(f"--resume: {run_dir} holds no run (no config.yaml); start it without --resume")
        cfg = rd.read_config()
        if overrides:
            bad = [k for k in flat_keys(parse_overrides(overrides)) if k not in RESUME_OVERRIDABLE]
            if bad:
                raise ConfigError(f"--resume cannot change {', '.join(bad)} (the run would no longer be the one its config describes); "
                                  f"it can change {', '.join(RESUME_OVERRIDABLE)}. Start a new run for anything else")
            cfg, changed = override(cfg, overrides)
    elif overrides:
        raise ConfigError("overrides are given with the config of a new run (train(cfg, ...)); `overrides=` is for resume=True")
    assert cfg is not None
    with rng.deterministic_algorithms(cfg.deterministic), console(cfg.log.console):
        return _train(cfg, run_dir, resume=resume, force=force, model=model, data=data, until_epoch=until_epoch, changed=changed,
                      callbacks=callbacks)


def _train(cfg: Config, run_dir: Path, *, resume: bool, force: bool, model: nn.Module | None, data,
           until_epoch: int | None, changed: dict, callbacks: Sequence) -> dict:
    dinfo, dist_device = dist_mod.setup(cfg.device)
    rd = RunDir(run_dir)
    with rd.lock("train --resume" if resume else "train") if dinfo.is_main else contextlib.nullcontext():
        run = _Run.build(cfg, rd, dist_device, resume=resume, force=force, model=model, data=data)
        cbs = Callbacks.build(cfg, rd, callbacks, dinfo.is_main)
        if dinfo.is_main:  # everything is validated: only now is anything removed, and does the run folder get its first file
            rd.prepare(run.cfg, resume=resume, force=force, changed=changed)
        with cbs:  # the loggers' files are closed however the run ends
            return _train_locked(run, cbs, resume=resume, until_epoch=until_epoch, changed=changed)


@dataclass
class _Run:
    """What the epochs need, built and checked before the run folder is touched."""

    cfg: Config
    rd: RunDir
    model: nn.Module
    splits: Splits
    layers: list[Layer]
    meta: dict
    zoo_model: str | None
    stages: list[tuple[str, StageConfig, int]] = field(default_factory=list)
    device: torch.device = torch.device("cpu")
    start_scale: float = 1.0  # the largest parameter magnitude before training: what a sound checkpoint is measured against

    @classmethod
    def build(cls, cfg: Config, rd: RunDir, dist_device, *, resume: bool, force: bool, model: nn.Module | None, data) -> "_Run":
        if not resume:
            rd.check_new(force)
        torch.manual_seed(cfg.seed)
        device = dist_device or dist_mod.resolve_device(cfg.device)
        if model is None:
            model_info(cfg.model.name)  # unknown names fail before any data is read
        splits, cfg = run_data(cfg, data, resume=resume, run=rd.path)  # given data: recorded in the config (a resume checks it)
        zoo_model = cfg.model.name if model is None else None
        if model is None:
            model = build_model(cfg, splits.num_classes, device)
            meta = {"model": cfg.model.name, "num_classes": splits.num_classes, "normalize": cfg.model.normalize,
                    **({"kwargs": cfg.model.kwargs} if cfg.model.kwargs else {})}  # clat eval rebuilds the model from them
        else:
            if not is_factory(cfg.model.name):  # the run's config says where its model came from (model_info explains on resume)
                cfg = copy.deepcopy(cfg)
                cfg.model.name = f"{PYTHON_MODEL}{type(model).__module__}.{type(model).__qualname__}"
            model = model.to(device)
            if cfg.init:
                load_init(model, cfg.init, splits.num_classes, reset_head=cfg.init_reset_head)
            meta = {"model": type(model).__name__, "num_classes": splits.num_classes, "custom": True}
        model = dist_mod.check_batch_norm(model, device, cfg.sync_bn)
        if resolve_channels_last(cfg.channels_last, device, cfg.precision):
            model = model.to(memory_format=torch.channels_last)
        dist_mod.broadcast_module(model)  # every rank starts from rank 0's weights
        layers = run_layers(model, cfg, splits.probe(2).to(device))
        run = cls(cfg, rd, model, splits, layers, meta, zoo_model, _stages(cfg), device, weight_scale(model))
        for _, scfg, _ in run.stages:  # fail on a bad method setting now, not after hours of pretraining
            run.method(scfg)
        if cfg.early_stop.patience is not None and min(cfg.eval.n_examples, len(splits.x_val)) == 0:
            raise ConfigError("early_stop.patience watches held-out images, but the validation split is empty; set "
                              "early_stop.patience=null")
        world, global_batch = dist_mod.info().world_size, cfg.data.batch_size * dist_mod.info().world_size
        if world > 1 and splits.n_train < global_batch:
            raise ConfigError(f"{splits.n_train} training images cannot fill one global batch of {global_batch} "
                              f"(data.batch_size={cfg.data.batch_size} per rank x {world} ranks); lower data.batch_size")
        return run

    def method(self, scfg: StageConfig):
        return create_method(scfg.method, self.cfg, self.layers, zoo_model=self.zoo_model)

    @property
    def total_epochs(self) -> int:
        return sum(s.epochs for _, s, _ in self.stages)

    def stage_at(self, epoch: int) -> tuple[str, StageConfig, int]:
        return next((n, s, f) for n, s, f in self.stages if f <= epoch < f + s.epochs)


def _stages(cfg: Config) -> list[tuple[str, StageConfig, int]]:
    """(name, config, first global epoch) of the stages with epochs > 0."""
    out, start = [], 0
    for name in ("pretrain", "finetune"):
        s: StageConfig = getattr(cfg, name)
        if s.epochs > 0:
            out.append((name, s, start))
            start += s.epochs
    return out


def _enter_stage(run: _Run, name: str, scfg: StageConfig, loader: Loader, runner: StepRunner, resumed: Resumed, changed: dict) -> Stage:
    """The stage's method set up and its optimizer made, or (resumed inside it) all restored from the checkpoint.
    A checkpoint from inside this stage holds the method's structure (LoRA adapters): set up first, then load.
    Resumed at a stage boundary, an uninterrupted run sets the stage up with the RNG as the previous stage left
    it (LoRA draws its adapters from it), which is the state the checkpoint holds."""
    mid_stage = resumed.state is not None and resumed.state["stage"] == name
    if resumed.weights is not None and not mid_stage:
        load_into(run.model, resumed.weights, source=resumed.source)
    if resumed.state is not None and not mid_stage:
        rng.set_state(resumed.state["rng"])
    stage = Stage.from_config(run.model, run.method(scfg), scfg, len(loader), runner)
    if mid_stage:
        load_into(run.model, resumed.weights, source=resumed.source)
        stage.load_state_dict(resumed.state, new_lr=scfg.lr if f"{name}.lr" in changed else None)
        rng.set_state(resumed.state["rng"])  # after the set-up, whose draws the checkpoint's RNG replaces
    resumed.weights, resumed.state = None, None
    return stage


def _train_locked(run: _Run, cbs: Callbacks, *, resume: bool, until_epoch: int | None, changed: dict) -> dict:
    cfg, rd, dinfo = run.cfg, run.rd, dist_mod.info()
    loader = train_loader(run.splits, cfg.data.batch_size, shuffle=True, augment=cfg.data.augment,
                          # several ranks: full global batches only, so that every step averages equal shares
                          drop_last=dinfo.world_size > 1 or run.splits.n_train >= 2 * cfg.data.batch_size, seed=cfg.seed,
                          device=run.device, rank=dinfo.rank, world_size=dinfo.world_size)
    runner = StepRunner.from_config(run.model, run.device, cfg)
    if cfg.compile:
        run.model.compile(mode=None if cfg.compile is True else cfg.compile)
    resumed, start_epoch = Resumed.latest(rd, run.device) if resume else (Resumed(), 0)  # start_epoch: the epochs done
    if dinfo.is_main:
        rd.truncate_metrics(start_epoch)
    history = ValHistory.of([r for r in rd.metrics() if r["epoch"] <= start_epoch], cfg.early_stop)  # on every rank: one decision
    if resume and rd.finished() and (start_epoch >= run.total_epochs or history.stopped):
        log.info("%s has already finished: nothing to resume", rd.path)
        return rd.summary()
    live = cbs.live = LiveRun(str(rd.path), run.model)
    cbs.set_run(live)
    cbs.call("on_train_start", {"run_dir": str(rd.path), "config": to_dict(cfg), "resume": resume, "first_epoch": start_epoch + 1,
                                "epochs": run.total_epochs, "model": run.meta})
    stage, stage_name, t_run, done = None, None, time.time(), start_epoch
    stop = run.total_epochs if until_epoch is None else min(until_epoch, run.total_epochs)
    for epoch in range(start_epoch, stop):
        if history.stopped or dist_mod.broadcast_object(live.stop_reason) is not None:  # rank 0's callbacks decide for every rank
            break
        name, scfg, first = run.stage_at(epoch)
        if name != stage_name:  # entering a stage (or resuming inside one)
            stage, stage_name = _enter_stage(run, name, scfg, loader, runner, resumed, changed), name
            live.optimizer, live.scheduler = stage.optimizer, stage.scheduler
            live.ema_model = stage.ema.module if stage.ema is not None else None
        record = _run_epoch(run, stage, loader, epoch, name, scfg, first, cbs)
        if record is None:  # a callback stopped the run inside the epoch: it is not committed, a resumed run redoes it
            break
        if changed and epoch == start_epoch:
            record.resume_overrides = changed
        row = record.to_dict()
        improved = history.add(row)
        if dinfo.is_main:
            _commit(run, stage, record, history.best if improved else None)
            cbs.call("on_epoch_end", row)
        done = epoch + 1
    stopped = dist_mod.broadcast_object(live.stop_reason)
    if stopped is not None and done < run.total_epochs and not history.stopped:  # stopped by a callback: resumable
        dist_mod.barrier()
        log.warning("a callback stopped the run after epoch %d of %d (%s); resume=True (clat train --resume %s) continues it", done,
                    run.total_epochs, stopped, rd.path)
        out = {"run_dir": str(rd.path), "finished": False, "epochs_done": done, "epochs": run.total_epochs,
               "stopped_by": f"callback: {stopped}"}
    elif stop < run.total_epochs and not history.stopped:  # a chunk of a longer run: continue it with resume=True
        dist_mod.barrier()
        out = {"run_dir": str(rd.path), "finished": False, "epochs_done": max(stop, start_epoch), "epochs": run.total_epochs}
    else:  # the run is done (all epochs, or an early stop); resumed after its last checkpoint, that checkpoint first
        stage = _restore_last(run, loader, runner, resumed, changed) if resumed.weights is not None else stage
        out = _finish(run, time.time() - t_run, stage, history)
    cbs.call("on_train_end", out)
    return out


def _commit(run: _Run, stage: Stage, row: MetricsRow, best: dict | None) -> None:
    """Rank 0 writes the epoch: its row, the best weights if it is the new best, then the checkpoint (numbered as the
    row). The checkpoint comes last: a run killed before it redoes the epoch and writes the row and the best weights again."""
    meta = {**run.meta, "stage": row.stage, "method": row.method}
    if run.cfg.log.console:
        log.info(format_row(row.to_dict()))
    run.rd.append_metrics(row)
    if best is not None:
        save_best(run.rd, stage.method.plain_model(stage.eval_model()), meta, best)
    state = {"schema": SCHEMA, "epoch": row.epoch, "stage": row.stage, **stage.state_dict(), "rng": rng.get_state()}
    sound = health(run.model, row.train.get("loss"), run.start_scale)
    run.rd.checkpoints(run.cfg.keep_checkpoints).save(row.epoch, run.model, state, meta, sound)


def _restore_last(run: _Run, loader: Loader, runner: StepRunner, resumed: Resumed, changed: dict) -> Stage | None:
    """The checkpoint a run resumed after its last epoch ends with: a stage's last epoch holds the plain model; an early
    stop inside a stage may hold the method's structure (LoRA's adapters), so the stage is set up to load it."""
    epoch = resumed.epoch - 1  # the 0-based index of the checkpoint's epoch
    name, scfg, first = run.stage_at(epoch)
    if epoch - first < scfg.epochs - 1:
        return _enter_stage(run, name, scfg, loader, runner, resumed, changed)
    load_into(run.model, resumed.weights, source=resumed.source)
    return None


def _run_epoch(run: _Run, stage: Stage, loader: Loader, epoch: int, name: str, scfg: StageConfig, first: int,
               cbs: Callbacks) -> MetricsRow | None:
    """The run's epoch ``epoch + 1`` (``epoch``: its 0-based index, as ``EpochContext`` has it) of ``stage``; its metrics row
    (validation included when due), or None when a callback stopped the run inside it (``stop(now=True)``, one rank)."""
    cfg, dinfo = run.cfg, dist_mod.info()
    t0 = time.time()
    ctx = EpochContext(epoch, epoch - first, run.splits.sampler(lambda: rng.epoch_generator(cfg.seed, epoch, 2), run.device),
                       rng.epoch_generator(cfg.seed, epoch, 1))
    events = stage.begin_epoch(ctx)
    trainable = stage.trainable_params()
    loader.set_epoch(epoch)
    batches = loader
    if cfg.progress and dinfo.is_main:
        batches = tqdm(loader, desc=f"epoch {epoch + 1}/{run.total_epochs} {scfg.method}", leave=False)
    sums: dict[str, torch.Tensor] = {}
    n_steps = 0
    live = cbs.live
    live.stage, live.epoch = name, epoch + 1
    for x, y in batches:
        metrics = stage.step(x, y)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0) + v
        n_steps += 1
        live.step = epoch * len(loader) + n_steps
        if cbs.batch_hooks:
            cbs.batch_end({"epoch": epoch + 1, "stage": name, "step": live.step, "batch": n_steps, "metrics": metrics})
            if live.stop_now and dinfo.world_size == 1:
                getattr(batches, "close", lambda: None)()  # the progress bar
                return None
    train_metrics = dist_mod.mean_over_ranks({k: v / max(n_steps, 1) for k, v in sums.items()})
    dist_mod.broadcast_module(run.model, buffers_only=True)  # BatchNorm statistics: rank 0's
    if stage.ema is not None:
        dist_mod.broadcast_module(stage.ema.module, buffers_only=True)  # their average too
    if not all(math.isfinite(v) for v in train_metrics.values()):
        raise _diverged(run, epoch, name, scfg, train_metrics)
    train_time = time.time() - t0
    n_val = min(cfg.eval.n_examples, len(run.splits.x_val))
    if epoch - first == scfg.epochs - 1:
        stage.use_average()  # with an EMA, the stage's result is its average: the model takes its weights
        events.update(stage.method.on_stage_end(run.model, lambda m: validate(m, cfg, run.splits, n_val, stage.runner.autocast)))
    row = MetricsRow(epoch + 1, name, scfg.method, stage.lr, train_metrics, trainable, sum(p.numel() for p in run.model.parameters()),
                     stage.optimizer_state_bytes(), train_time, selection=_selection(events.pop("selection", None), scfg.method),
                     extra={**events, **stage.method.log_fields()})
    if n_val and ((epoch + 1) % cfg.eval.every == 0 or epoch + 1 == run.total_epochs):
        row.val = held_out(stage.eval_model(), cfg, run.splits, n_val, stage.runner.autocast, progress=cfg.progress and dinfo.is_main)
    row.time_s = time.time() - t0
    if dinfo.world_size > 1:
        row.world_size = dinfo.world_size
    return row


def _diverged(run: _Run, epoch: int, name: str, scfg: StageConfig, train_metrics: dict) -> TrainingDiverged:
    """The error of a loss that became NaN or infinite in the run's epoch ``epoch + 1``."""
    return TrainingDiverged(divergence_advice(run.rd, run.cfg, epoch + 1, name, train_metrics.get("loss")))


def _selection(event, method: str) -> SelectionEvent | None:
    if event is None or isinstance(event, SelectionEvent):
        return event
    raise ClatError(f"method {method!r} returned a 'selection' event of type {type(event).__name__}; return a "
                    "clat.base.run_records.SelectionEvent (its epochs count from 1, as the metrics rows')")


def _finish(run: _Run, wall: float, stage: Stage | None, history: ValHistory) -> dict:
    """The final weights and summary (rank 0; the other ranks return once they exist)."""
    rd, dinfo = run.rd, dist_mod.info()
    if not dinfo.is_main:
        dist_mod.barrier()
        return rd.summary()
    if stage is not None:
        stage.use_average()  # stopped early inside a stage with an EMA: the run ends with the average, as at a stage's end
    # stopped early: LoRA merged
    save_weights(rd.weights_path, stage.method.plain_model(run.model) if stage is not None else run.model, run.meta)
    rows = rd.metric_rows()
    overrides = [r.resume_overrides for r in rows if r.resume_overrides is not None]
    summary = Summary(
        str(rd.path), run.total_epochs, run.splits.name, run.meta, final_val=rows[-1].val if rows else None,
        selection_history=[r.selection for r in rows if r.selection is not None],
        trainable_params_last=rows[-1].trainable_params if rows else None, total_params=sum(p.numel() for p in run.model.parameters()),
        layers=len(run.layers),
        extra={"wall_time_s_this_session": wall, "train_time_s": sum(r.time_s for r in rows), "world_size": dinfo.world_size,
               "precision": run.cfg.precision, "versions": versions(), **({"resume_overrides": overrides} if overrides else {}),
               **history.summary(rows[-1].epoch if rows else 0, run.total_epochs)},
    ).to_dict()
    atomic_write_text(rd.summary_path, json.dumps(summary, indent=2))
    dist_mod.barrier()
    return summary
