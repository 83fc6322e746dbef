"""THE training loop: every method, every stage, checkpoints and resume.

A run is one or two stages, ``pretrain`` (a baseline such as PGD-AT) then
``finetune`` (CLAT, or any method), each with its own SGD optimizer and cosine
schedule over the stage's steps. The loop knows nothing of any method: it asks
the method for its loss and calls its epoch hook; the trainable set is whatever
has ``requires_grad`` after that hook. When CLAT re-selects layers the
optimizer and schedule carry on; only the optimizer state (momentum) of
parameters that became frozen is dropped.

The run folder and its files belong to :mod:`clat.runs` (``RunDir``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from clat import data as data_mod
from clat import distributed as dist_mod
from clat.attacks import batch_shard
from clat.checkpoint import atomic_write_text, load_into, load_state, read_state_dict, save_weights
from clat.config import Config, StageConfig, config_from_dict, dump_yaml, to_dict
from clat.errors import CheckpointError, ClatError, ConfigError
from clat.evaluate import evaluate
from clat.layers import Layer, find_layers, set_bn_train_mode
from clat.methods import EpochContext, Method, create_method
from clat.models import create_model, model_info
from clat.runs import RUN_FILES, RunDir

log = logging.getLogger("clat")



class TrainingDiverged(ClatError):
    """The loss became NaN or infinite."""


def resolve_device(name: str, option: str = "device=") -> torch.device:
    """``auto``/``cpu``/``cuda``/``cuda:N``/``mps`` -> a device that exists here (else a ConfigError
    that names ``option``, the way the user set it: ``device=`` in a config, ``--device `` on the CLI)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{option}{name} requested but CUDA is not available here; use {option}cpu or {option}auto")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"{option}{name} requested but only {n} CUDA device(s) are visible here (cuda:0 to cuda:{n - 1})")
    return dev


@dataclass
class Splits:
    """A data set cut into training, validation and test parts. Images are uint8 (0-255) or float
    in [0, 1], shaped [N, C, H, W]; labels are integers in [0, num_classes). Checked on creation."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        from clat.errors import DataError

        for part in ("train", "val", "test"):
            x, y = getattr(self, f"x_{part}"), getattr(self, f"y_{part}")
            data_mod.check_images(x, f"Splits.x_{part}")
            if not isinstance(y, torch.Tensor) or y.shape != (len(x),) or y.is_floating_point():
                raise DataError(f"Splits.y_{part} must be an integer tensor with one label per image ({len(x)}), got "
                                f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
            if len(y) and not (0 <= int(y.min()) and int(y.max()) < self.num_classes):
                raise DataError(f"Splits.y_{part} holds labels from {int(y.min())} to {int(y.max())}, outside 0..{self.num_classes - 1} "
                                f"(num_classes={self.num_classes})")


def prepare_data(cfg: Config) -> Splits:
    """Load the data set, cut it to size and carve the validation split from training data."""
    d = cfg.data
    if d.dataset == "bundled":
        x_tr, y_tr, x_te, y_te = data_mod.load_bundled()
        num_classes, name = 10, "CIFAR-10 subset (JPEG-recovered, bundled)"
    else:
        x_tr, y_tr = data_mod.load_cifar(d.dataset, d.root, True, download=d.download, verify=d.verify)
        x_te, y_te = data_mod.load_cifar(d.dataset, d.root, False, download=False, verify=d.verify)
        num_classes, name = data_mod.NUM_CLASSES[d.dataset], d.dataset
    if d.train_size is not None:
        x_tr, y_tr = x_tr[: d.train_size], y_tr[: d.train_size]
    if d.test_size is not None:
        x_te, y_te = x_te[: d.test_size], y_te[: d.test_size]
    if d.val_size >= len(x_tr):
        raise ConfigError(f"data.val_size={d.val_size} leaves no training images out of {len(x_tr)}; lower it")
    if d.split_seed is None:  # clat 0.1: the split followed the training seed
        if cfg.seed != 0:
            warnings.warn(f"data.split_seed is null: the validation split follows seed={cfg.seed}, so a run with another seed (or the "
                          "checkpoint it starts from) may have trained on these validation images; set data.split_seed to a fixed value",
                          stacklevel=2)
    split_seed = cfg.seed if d.split_seed is None else d.split_seed
    tr_idx, va_idx = data_mod.train_val_split(len(x_tr), d.val_size, split_seed)
    return Splits(x_tr[tr_idx], y_tr[tr_idx], x_tr[va_idx], y_tr[va_idx], x_te, y_te, num_classes, name)


def build_model(cfg: Config, num_classes: int, device: torch.device) -> nn.Module:
    if cfg.model.num_classes is not None and cfg.model.num_classes != num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the data set has {num_classes} classes; drop the override")
    model = create_model(cfg.model.name, num_classes, normalize=cfg.model.normalize)
    if cfg.init:
        load_into(model, read_state_dict(cfg.init), source=f"init checkpoint {cfg.init}")
    return model.to(device)


def model_meta(cfg: Config, num_classes: int) -> dict:
    return {"model": cfg.model.name, "num_classes": num_classes, "normalize": cfg.model.normalize}


def cosine_lambda(total_steps: int, schedule: str):
    if schedule == "constant":
        return lambda step: 1.0
    if schedule == "piecewise":  # Madry et al. / Rice et al.: lr / 10 at half and three quarters of the stage
        return lambda step: 1.0 if step < total_steps // 2 else (0.1 if step < (3 * total_steps) // 4 else 0.01)
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


def _stages(cfg: Config) -> list[tuple[str, StageConfig, int]]:
    """(name, config, first global epoch) of the stages with epochs > 0."""
    out, start = [], 0
    for name in ("pretrain", "finetune"):
        s: StageConfig = getattr(cfg, name)
        if s.epochs > 0:
            out.append((name, s, start))
            start += s.epochs
    return out


def _drop_frozen_state(optimizer: torch.optim.Optimizer) -> None:
    """Frozen parameters keep no optimizer state (momentum) and get no update."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                optimizer.state.pop(p, None)
                p.grad = None


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor))


def _check_run_dir(rd: RunDir, force: bool) -> None:
    """A new run may start in ``rd``: nothing there yet, or (``force``) only what clat wrote. Checks only:
    nothing is removed before the whole configuration has been validated (see ``_train``)."""
    present = [f for f in RUN_FILES if (rd.path / f).exists()]
    if present:
        foreign = rd.foreign(present)
        if foreign:
            raise ConfigError(f"run folder {rd.path} holds {', '.join(foreign)} that clat did not write (it is not a clat run); "
                              "clat never replaces files it did not write: choose another --run-dir")
        if not force:
            state = "a finished run" if rd.finished() else "an unfinished run (continue it with --resume)"
            raise ConfigError(f"run folder {rd.path} already holds {state}; choose another --run-dir or pass --force to overwrite it")
    parent = next((p for p in (rd.path, *rd.path.parents) if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot write into {rd.path}: {parent} is not writable; choose another --run-dir")


# Keys --resume may change: none of them changes what the finished run computes, except the learning rates,
# which continue on the same schedule from the new value (the divergence remedy); the change is recorded.
RESUME_OVERRIDABLE = ("pretrain.lr", "finetune.lr", "progress", "keep_checkpoints", "device", "eval.every", "compile")


def _resume_overrides(cfg: Config, overrides: Sequence[str]) -> tuple[Config, dict]:
    """``cfg`` with ``key=value`` overrides that --resume accepts, and ``{key: [old, new]}``."""
    import copy

    from clat.config import _build, parse_overrides, validate

    tree = parse_overrides(overrides)
    flat: dict[str, object] = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            walk(v, f"{prefix}{k}.") if isinstance(v, dict) else flat.__setitem__(f"{prefix}{k}", v)

    walk(tree, "")
    bad = [k for k in flat if k not in RESUME_OVERRIDABLE]
    if bad:
        raise ConfigError(f"--resume cannot change {', '.join(bad)} (the run would no longer be the one its config describes); "
                          f"it can change {', '.join(RESUME_OVERRIDABLE)}. Start a new run for anything else")
    new = _build(Config, tree, "", copy.deepcopy(cfg))
    validate(new)

    def get(c: Config, key: str):
        for part in key.split("."):
            c = getattr(c, part)
        return c

    return new, {k: [get(cfg, k), get(new, k)] for k in flat if get(cfg, k) != get(new, k)}


def train(
    cfg: Config | None,
    run_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    model: nn.Module | None = None,
    data: Splits | None = None,
    until_epoch: int | None = None,
    overrides: Sequence[str] = (),
) -> dict:
    """Run (or resume) the training described by ``cfg`` in ``run_dir``; returns the summary.

    With ``resume=True`` the config saved in ``run_dir`` is used and training continues
    from the latest valid checkpoint; ``overrides`` may change the keys in
    ``RESUME_OVERRIDABLE`` (a lower learning rate after a divergence, say), recorded in the
    run's config and metrics. The run folder is locked for the whole call (:mod:`clat.runs`). ``model`` (any ``nn.Module`` taking [0, 1] images)
    and ``data`` replace the ones the config names; the model is trained in place.

    ``until_epoch=N`` stops after the run's N-th epoch (its checkpoint written) and returns
    ``{"finished": False, ...}``; ``resume=True`` later continues exactly where it stopped,
    so a long run can be done in chunks (the same schedule as one uninterrupted run).

    Under ``torchrun`` (or inside an initialized process group) every rank calls this
    and the run is data-parallel (:mod:`clat.distributed`); only rank 0 writes files.
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
            cfg, changed = _resume_overrides(cfg, overrides)
    elif overrides:
        raise ConfigError("overrides are given with the config of a new run (train(cfg, ...)); `overrides=` is for resume=True")
    assert cfg is not None
    with deterministic_algorithms(cfg.deterministic):
        return _train(cfg, run_dir, resume=resume, force=force, model=model, data=data, until_epoch=until_epoch, changed=changed)


@contextlib.contextmanager
def deterministic_algorithms(on: bool):
    """``deterministic=true``: bit-identical runs on a GPU, so a resumed or chunked run equals an
    uninterrupted one there too (on CPUs they are anyway). cuDNN uses deterministic kernels and no
    autotuning, ``torch.use_deterministic_algorithms`` is on (``warn_only``: an op with no deterministic
    kernel warns instead of stopping the run) and cuBLAS gets a fixed workspace. May cost speed (not measured); the
    previous settings are restored afterwards."""
    if not on:
        yield
        return
    import os

    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[2], prev[3]


def _train(cfg: Config, run_dir: Path, *, resume: bool, force: bool, model: nn.Module | None, data: Splits | None,
           until_epoch: int | None, changed: dict) -> dict:
    dinfo, dist_device = dist_mod.setup(cfg.device)
    rd = RunDir(run_dir)
    with rd.lock("train --resume" if resume else "train") if dinfo.is_main else contextlib.nullcontext():
        return _train_locked(cfg, rd, dinfo, dist_device, resume=resume, force=force, model=model, data=data, until_epoch=until_epoch,
                             changed=changed)


def _train_locked(cfg: Config, rd: RunDir, dinfo, dist_device, *, resume: bool, force: bool, model: nn.Module | None,
                  data: Splits | None, until_epoch: int | None, changed: dict) -> dict:
    run_dir = rd.path
    if not resume:
        _check_run_dir(rd, force)

    torch.manual_seed(cfg.seed)
    device = dist_device or resolve_device(cfg.device)
    if model is None:
        model_info(cfg.model.name)  # unknown names fail before any data is read
    splits = data if data is not None else prepare_data(cfg)
    if model is None:
        model = build_model(cfg, splits.num_classes, device)
        meta = model_meta(cfg, splits.num_classes)
        default_k = model_info(cfg.model.name).default_k
    else:
        model = model.to(device)
        if cfg.init:
            load_into(model, read_state_dict(cfg.init), source=f"init checkpoint {cfg.init}")
        meta = {"model": type(model).__name__, "num_classes": splits.num_classes, "custom": True}
    model = dist_mod.check_batch_norm(model, device, cfg.sync_bn)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dist_mod.broadcast_module(model)  # every rank starts from rank 0's weights
    layers = find_layers(model, data_mod.to_unit_float(splits.x_train[:2].to(device)), merge_norms=cfg.model.merge_norms)
    if meta.get("custom"):
        default_k = max(1, round(0.05 * len(layers)))  # the paper's "about 5% of the layers"
    stages = _stages(cfg)
    for _, scfg, _ in stages:  # fail on a bad method setting now, not after hours of pretraining
        create_method(scfg.method, cfg, layers, default_k=default_k)
    total_epochs = sum(s.epochs for _, s, _ in stages)
    world = dinfo.world_size
    global_batch = cfg.data.batch_size * world
    if world > 1 and len(splits.x_train) < global_batch:
        raise ConfigError(f"{len(splits.x_train)} training images cannot fill one global batch of {global_batch} "
                          f"(data.batch_size={cfg.data.batch_size} per rank x {world} ranks); lower data.batch_size")
    # everything is validated: only now is anything removed, and does the run folder get its first file
    if dinfo.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            if force:
                gone = rd.clear()
                if gone:
                    log.info("--force: removed %s from %s (what clat wrote there; nothing else)", ", ".join(gone), run_dir)
            rd.record(*RUN_FILES)
            atomic_write_text(rd.config_path, dump_yaml(cfg))
        else:
            if not rd.has_manifest():  # a run of clat 0.1: its own files, as they are now
                rd.record(*[p.name for p in rd.removable()], *RUN_FILES)
            stale = rd.remove_stale_tmp()
            if stale:
                log.info("removed %d half-written temporary file(s) of an interrupted write", stale)
            if changed:
                atomic_write_text(rd.config_path, dump_yaml(cfg))
                log.info("--resume with %s (recorded in config.yaml and metrics.jsonl)", ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()))

    loader = data_mod.Loader(
        splits.x_train, splits.y_train, cfg.data.batch_size, shuffle=True, augment=cfg.data.augment,
        # several ranks: full global batches only, so that every step averages equal shares
        drop_last=world > 1 or len(splits.x_train) >= 2 * cfg.data.batch_size, seed=cfg.seed, device=device,
        rank=dinfo.rank, world_size=world,
    )
    n_val = min(cfg.eval.n_examples, len(splits.x_val))
    steps = _StepRunner(model, cfg, device)
    if cfg.compile:
        model.compile()
    ckpts = rd.checkpoints(cfg.keep_checkpoints)

    start_epoch, resumed_state, resumed_weights, resumed_source = 0, None, None, ""
    if resume:
        d = ckpts.latest_valid()
        if d is None:
            log.warning("no valid checkpoint in %s: starting from the beginning", run_dir)
        else:
            resumed_weights = read_state_dict(d / "model.safetensors")
            resumed_state = load_state(ckpts.state(d))
            resumed_source = str(d)
            start_epoch = int(resumed_state["epoch"]) + 1
            log.info("resuming %s after epoch %d", run_dir, start_epoch)
    if dinfo.is_main:
        rd.truncate_metrics(start_epoch)
    if resume and start_epoch >= total_epochs and rd.finished():
        log.info("%s has already finished: nothing to resume", run_dir)
        return rd.summary()

    method: Method | None = None
    optimizer = scheduler = None
    stage_name = None
    t_run = time.time()
    stop = total_epochs if until_epoch is None else min(until_epoch, total_epochs)
    for epoch in range(start_epoch, stop):
        name, scfg, first = next((n, s, f) for n, s, f in stages if f <= epoch < f + s.epochs)
        if name != stage_name:  # entering a stage (or resuming inside one)
            stage_name = name
            method = create_method(scfg.method, cfg, layers, default_k=default_k)
            for p in model.parameters():
                p.requires_grad_(True)
            # a checkpoint from inside this stage holds the method's structure (LoRA adapters): set up first
            mid_stage = resumed_state is not None and resumed_state["stage"] == name
            if resumed_weights is not None and not mid_stage:
                load_into(model, resumed_weights, source=resumed_source)
            if resumed_state is not None and not mid_stage:
                # resumed at a stage boundary: an uninterrupted run sets the stage up with the RNG as the previous stage
                # left it (LoRA draws its adapters from it), which is the state the checkpoint holds
                _set_rng(resumed_state["rng"])
            method.setup(model)
            if resumed_weights is not None and mid_stage:
                load_into(model, resumed_weights, source=resumed_source)
            resumed_weights = None
            optimizer = torch.optim.SGD(model.parameters(), lr=scfg.lr, momentum=scfg.momentum, weight_decay=scfg.weight_decay, nesterov=scfg.nesterov)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lambda(scfg.epochs * len(loader), scfg.schedule))
            if resumed_state is not None and resumed_state["stage"] == name:
                method.load_state_dict(resumed_state["method"])  # the epoch hook below re-applies it
                optimizer.load_state_dict(resumed_state["optimizer"])
                scheduler.load_state_dict(resumed_state["scheduler"])
                if "scaler" in resumed_state:
                    steps.scaler.load_state_dict(resumed_state["scaler"])
                if f"{name}.lr" in changed:  # --resume with a new learning rate: the same schedule from the new value
                    scheduler.base_lrs = [scfg.lr for _ in optimizer.param_groups]
                    for g in optimizer.param_groups:
                        g["initial_lr"] = scfg.lr
                        g["lr"] = scfg.lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
                _set_rng(resumed_state["rng"])  # mid-stage: after the set-up, whose draws the checkpoint's RNG replaces
            resumed_state = None
        assert method is not None and optimizer is not None and scheduler is not None
        stage_epoch = epoch - first

        t0 = time.time()
        ctx = EpochContext(epoch, stage_epoch, _sampler(splits, cfg.seed, epoch, device), _gen(cfg.seed, epoch, 1))
        events = method.on_epoch_start(model, ctx)
        _drop_frozen_state(optimizer)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        set_bn_train_mode(model, method.trainable_bns())
        loader.set_epoch(epoch)
        sums: dict[str, torch.Tensor] = {}
        n_steps = 0
        batches = loader
        if cfg.progress and dinfo.is_main:
            from tqdm.auto import tqdm

            batches = tqdm(loader, desc=f"epoch {epoch + 1}/{total_epochs} {scfg.method}", leave=False)
        for x, y in batches:
            m = steps.step(method, optimizer, x, y)
            scheduler.step()
            for k, v in m.items():
                sums[k] = sums.get(k, 0) + v
            n_steps += 1
        train_metrics = _mean_over_ranks({k: v / max(n_steps, 1) for k, v in sums.items()})
        dist_mod.broadcast_module(model, buffers_only=True)  # BatchNorm statistics: rank 0's
        if not all(math.isfinite(v) for v in train_metrics.values()):
            last = ckpts.list()[-1].name if ckpts.list() else None
            raise TrainingDiverged(
                f"the training loss became {train_metrics.get('loss')} in epoch {epoch + 1}"
                + (f"; the last good checkpoint ({last}) is kept. Lower the learning rate and continue from it: "
                   f"clat train --resume {run_dir} {name}.lr={scfg.lr / 10:g}" if last else
                   f"; no checkpoint was written yet: lower the learning rate ({name}.lr={scfg.lr / 10:g}) and start again with --force")
            )
        train_time = time.time() - t0
        if stage_epoch == scfg.epochs - 1:
            events.update(method.on_stage_end(model, lambda m: _validate(m, cfg, splits, n_val, steps.autocast)))
        row = {
            "epoch": epoch + 1,
            "stage": name,
            "method": scfg.method,
            "lr": optimizer.param_groups[0]["lr"],
            "train": train_metrics,
            "trainable_params": trainable,
            "total_params": sum(p.numel() for p in model.parameters()),
            "optimizer_state_bytes": optimizer_state_bytes(optimizer),
            "epoch_time_s": train_time,
        }
        if changed and epoch == start_epoch:
            row["resume_overrides"] = changed
        if "selection" in events:
            row["selection"] = events["selection"]
        if "interpolation" in events:
            row["interpolation"] = events["interpolation"]
        if hasattr(method, "selected"):
            row["selected"] = [l.name for l in method.selected]
        if n_val and ((epoch + 1) % cfg.eval.every == 0 or epoch + 1 == total_epochs):
            row["val"] = _held_out(model, cfg, splits, n_val, steps.autocast, progress=cfg.progress and dinfo.is_main)
        row["time_s"] = time.time() - t0
        if world > 1:
            row["world_size"] = world
        if dinfo.is_main:
            log.info(_format_row(row))
            rd.append_metrics(row)
            state = {
                "epoch": epoch,
                "stage": name,
                "method": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": steps.scaler.state_dict(),
                "rng": _get_rng(),
            }
            ckpts.save(epoch, model, state, {**meta, "stage": name, "method": scfg.method})

    if stop < total_epochs:  # a chunk of a longer run: continue it with resume=True
        dist_mod.barrier()
        return {"run_dir": str(run_dir), "finished": False, "epochs_done": max(stop, start_epoch), "epochs": total_epochs}
    if resumed_weights is not None:  # resumed after the last epoch's checkpoint, before the final files
        load_into(model, resumed_weights, source=resumed_source)
    if not dinfo.is_main:
        dist_mod.barrier()  # rank 0 writes the final files; the others return once they exist
        return rd.summary()
    save_weights(rd.weights_path, model, meta)
    rows = rd.metrics()
    summary = {
        "run_dir": str(run_dir),
        "data": splits.name,
        "model": meta,
        "epochs": total_epochs,
        "final_val": rows[-1].get("val") if rows else None,
        "selection_history": [r["selection"] for r in rows if "selection" in r],
        "trainable_params_last": rows[-1]["trainable_params"] if rows else None,
        "total_params": sum(p.numel() for p in model.parameters()),
        "layers": len(layers),
        "wall_time_s_this_session": time.time() - t_run,
        "train_time_s": sum(r["time_s"] for r in rows),
        "world_size": world,
        "precision": cfg.precision,
        **({"resume_overrides": [r["resume_overrides"] for r in rows if "resume_overrides" in r]}
           if any("resume_overrides" in r for r in rows) else {}),
        "finished": True,
    }
    atomic_write_text(rd.summary_path, json.dumps(summary, indent=2))
    dist_mod.barrier()
    return summary


def _format_row(row: dict) -> str:
    parts = [f"epoch {row['epoch']:3d} {row['method']:<8s}", f"loss {row['train'].get('loss', float('nan')):.4f}"]
    if "val" in row:
        parts.append(f"val clean {row['val']['clean_acc']:.3f} pgd {row['val']['pgd_acc']:.3f}")
    parts.append(f"trainable {row['trainable_params']:,}")
    if row.get("selected"):
        parts.append(f"layers {','.join(row['selected'])}")
    parts.append(f"{row['time_s']:.1f}s")
    return " | ".join(parts)


class _StepRunner:
    """One optimizer step of any method: autocast, loss scaling, gradient averaging over ranks.

    Nothing here reads a value back from the device, so a GPU step runs without a
    host-device synchronisation (fp16's GradScaler is the exception: it checks for
    infinite gradients once per step)."""

    def __init__(self, model: nn.Module, cfg: Config, device: torch.device) -> None:
        self.model = model
        self.channels_last = cfg.channels_last
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.sync = dist_mod.GradientSync(model)
        self.rank, self.world = dist_mod.info().rank, dist_mod.info().world_size

    def step(self, method: Method, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        shard = batch_shard(self.rank * len(x), self.world * len(x)) if self.world > 1 else contextlib.nullcontext()
        with shard, self.autocast():
            loss, metrics = method.loss(self.model, x, y)
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.sync()
        method.after_backward(self.model)
        self.scaler.step(optimizer)
        self.scaler.update()
        return metrics


def _mean_over_ranks(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Epoch means of the training metrics, averaged over the ranks (one read-back per epoch)."""
    if not metrics:
        return {}
    keys = sorted(metrics)
    v = dist_mod.all_reduce_(torch.stack([metrics[k].detach().float() for k in keys]), op="mean")
    return dict(zip(keys, v.tolist()))


def _held_out(model: nn.Module, cfg: Config, splits: Splits, n_val: int, autocast, progress: bool = False) -> dict:
    """Clean and PGD accuracy on the first ``n_val`` validation images; several ranks split
    them and sum the counts. Random starts are seeded per example, so the result does not
    depend on the number of ranks or the batch size, and the global RNG is not touched."""
    i = dist_mod.info()
    lo, hi = n_val * i.rank // i.world_size, n_val * (i.rank + 1) // i.world_size
    counts = torch.zeros(2, dtype=torch.float64)
    if hi > lo:
        a = cfg.attack
        with autocast():
            r = evaluate(model, splits.x_val[lo:hi], splits.y_val[lo:hi], eps=a.eps, alpha=a.alpha, steps=cfg.eval.steps,
                         restarts=cfg.eval.restarts, norm=a.norm, batch_size=cfg.data.eval_batch_size, progress=progress, desc="val",
                         seed=cfg.seed, index_offset=lo)
        counts[:] = torch.tensor([r["clean_correct"], r["pgd_correct"]], dtype=torch.float64)
    dev = next(model.parameters()).device
    counts = dist_mod.all_reduce_(counts.to(dev)).cpu() if i.enabled else counts
    return {"clean_acc": counts[0].item() / n_val, "pgd_acc": counts[1].item() / n_val, "n": n_val}


def _validate(model: nn.Module, cfg: Config, splits: Splits, n_val: int, autocast=contextlib.nullcontext) -> dict:
    if n_val == 0:
        raise ConfigError("this method chooses on the validation split, but it is empty: set data.val_size and eval.n_examples > 0")
    r = _held_out(model, cfg, splits, n_val, autocast)
    return {"clean_acc": r["clean_acc"], "pgd_acc": r["pgd_acc"]}


def _gen(seed: int, epoch: int, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + epoch * 7919 + stream)
    return g


def _sampler(splits: Splits, seed: int, epoch: int, device: torch.device):
    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randperm(len(splits.x_train), generator=_gen(seed, epoch, 2))[:n]
        return data_mod.to_unit_float(splits.x_train[idx].to(device)), splits.y_train[idx].to(device)

    return sample


def _get_rng() -> dict:
    """Every RNG a training step may touch (clat itself draws only from torch's), in
    containers that load with ``weights_only=True``."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    if "python" in state:
        v, internal, gauss = state["python"]
        random.setstate((v, tuple(internal), gauss))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
