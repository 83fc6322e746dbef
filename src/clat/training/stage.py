"""One training stage: a method on a model, its optimizer (SGD or AdamW) and learning-rate schedule, and the step.

The loop (:mod:`clat.loop`), the epoch timer, the benchmarks and the tests all train through this class,
so there is one copy of the order that matters::

    Stage(model, method, ...)   every parameter trainable -> method.setup(model) -> the optimizer over all parameters
                                -> the schedule (a warmup first, if any) -> the EMA copy of the model, if any
    stage.begin_epoch(ctx)      method.on_epoch_start (CLAT selects and freezes) -> frozen parameters lose their
                                optimizer state -> BatchNorm train/eval modes as the method asks
    stage.step(x, y)            autocast -> method.loss (with the batch's shard) -> backward -> gradient sync -> method.after_backward
                                -> gradient clipping, if any -> optimizer step -> schedule step -> EMA update, if any

The trainable set is whatever has ``requires_grad`` after ``begin_epoch``: the optimizer holds every
parameter, and a frozen one has no gradient, so it gets no update (and, with its state dropped, no
momentum or weight decay either; AdamW's moments and step count start again when it trains again).
The EMA (``torch.optim.swa_utils.AveragedModel``) averages every parameter, frozen or not, and every
floating-point buffer (BatchNorm's running statistics).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from clat.attacks.threat import Shard
from clat.base import distributed as dist_mod
from clat.base.errors import ClatError
from clat.layers.freezing import set_bn_train_mode
from clat.methods.base import EpochContext, Method


def cosine_lambda(total_steps: int, schedule: str) -> Callable[[int], float]:
    """The learning-rate factor at a step: ``cosine`` (to 0 over ``total_steps``), ``piecewise``
    (Madry et al. / Rice et al.: /10 at half and at three quarters) or ``constant``."""
    if schedule == "constant":
        return lambda step: 1.0
    if schedule == "piecewise":
        return lambda step: 1.0 if step < total_steps // 2 else (0.1 if step < (3 * total_steps) // 4 else 0.01)
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


def warmup_lambda(warmup_steps: int, total_steps: int, schedule: str) -> Callable[[int], float]:
    """The learning-rate factor at a step of a stage with a linear warmup: ``(step + 1) / (warmup_steps + 1)`` during the
    warmup (the factors of the ``LinearLR`` that runs it), then ``schedule`` over the remaining steps."""
    main = cosine_lambda(total_steps - warmup_steps, schedule)
    return lambda step: (step + 1) / (warmup_steps + 1) if step < warmup_steps else main(step - warmup_steps)


def make_optimizer(params, kind: str = "sgd", *, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4, nesterov: bool = False,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, fused: bool = False) -> torch.optim.Optimizer:
    """torch's SGD or AdamW (``fused``: one kernel for the update)."""
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused or None)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, fused=fused or None)


def ema_model(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of ``model``'s parameters and buffers (torch's ``AveragedModel`` with
    ``get_ema_multi_avg_fn``; the first update copies the model). Integer buffers (BatchNorm's ``num_batches_tracked``)
    follow the model: an average of a counter would be truncated to a meaningless count."""

    lerp = get_ema_multi_avg_fn(decay)

    def update(averaged: list, current: list, n: torch.Tensor) -> None:  # called per (device, dtype) group
        if averaged[0].is_floating_point() or averaged[0].is_complex():
            lerp(averaged, current, n)
        else:
            torch._foreach_copy_(averaged, current)

    ema = AveragedModel(model, multi_avg_fn=update, use_buffers=True)
    ema.requires_grad_(False)
    return ema


def resolve_channels_last(setting: bool | str, device: torch.device | str, precision: str = "fp32") -> bool:
    """The memory format a run trains in: ``channels_last`` as configured, ``auto`` resolved.

    ``auto`` is NHWC on a CPU, where oneDNN's NHWC convolutions made clat's PGD-AT step 1.17-1.49x faster on every
    CPU-size zoo model (``benchmarks/cpu_defaults.py``, results in docs/performance.md), and on a CUDA device with
    bf16/fp16 autocast (NVIDIA's guidance for Tensor Cores; our GPU timings used it, its own gain is unmeasured);
    NCHW otherwise (fp32 on a GPU: unmeasured, so PyTorch's default is kept)."""
    if setting != "auto":
        return bool(setting)
    device = torch.device(device)
    return device.type == "cpu" or (device.type == "cuda" and precision in ("bf16", "fp16"))


class StepRunner:
    """One optimizer step of any method: autocast, loss scaling, gradient averaging over ranks.

    Nothing here reads a value back from the device, so a GPU step runs without a
    host-device synchronisation (fp16's GradScaler is the exception: it checks for
    infinite gradients once per step)."""

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu", *, precision: str = "fp32", channels_last: bool = False,
                 fused_optimizer: bool | str = False) -> None:
        device = torch.device(device)
        self.model = model
        self.channels_last = channels_last
        # the stage's optimizer runs as one fused kernel (auto: on a GPU, where the per-parameter launches of the default
        # implementation cost time; on a CPU the update is <1% of an adversarial step and stays as it was)
        self.fused = device.type == "cuda" if fused_optimizer == "auto" else bool(fused_optimizer)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.sync = dist_mod.GradientSync(model)
        self.rank, self.world = dist_mod.info().rank, dist_mod.info().world_size

    @classmethod
    def from_config(cls, model: nn.Module, device: torch.device | str, cfg) -> "StepRunner":
        """The step a run's config (:class:`clat.config.schema.Config`) describes: its precision, memory format, optimizer kernel."""
        return cls(model, device, precision=cfg.precision, channels_last=resolve_channels_last(cfg.channels_last, device, cfg.precision),
                   fused_optimizer=cfg.fused_optimizer)

    def step(self, method: Method, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
             grad_clip: float | None = None) -> dict[str, torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        shard = Shard(self.rank * len(x), self.world * len(x)) if self.world > 1 else None
        with self.autocast():
            loss, metrics = method.loss(self.model, x, y, shard)
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.sync()
        method.after_backward(self.model)
        if grad_clip is not None:  # the norm of the true gradient: unscaled first (fp16), averaged over ranks already
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"] if p.grad is not None], grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()
        return metrics


class Stage:
    """``method`` training ``model`` with SGD or AdamW (``lr`` on the ``schedule`` over ``total_steps``, after a linear warmup of
    ``warmup_steps``), optionally an EMA of the weights (``ema_decay``), label smoothing and gradient clipping. The defaults
    are clat's recipe since 0.1: SGD, momentum 0.9, weight decay 5e-4, no warmup, EMA, smoothing or clipping."""

    def __init__(self, model: nn.Module, method: Method, *, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                 nesterov: bool = False, total_steps: int = 1, schedule: str = "constant", runner: StepRunner | None = None,
                 optimizer: str = "sgd", betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, warmup_steps: int = 0,
                 ema_decay: float | None = None, label_smoothing: float = 0.0, grad_clip: float | None = None) -> None:
        self.model, self.method = model, method
        for p in model.parameters():
            p.requires_grad_(True)
        set_label_smoothing(method, label_smoothing)
        method.setup(model)
        self.runner = runner or StepRunner(model, next(model.parameters()).device)
        self.optimizer = make_optimizer(model.parameters(), optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                        nesterov=nesterov, betas=betas, eps=eps, fused=self.runner.fused)
        self.lr_factor = warmup_lambda(warmup_steps, total_steps, schedule) if warmup_steps else cosine_lambda(total_steps, schedule)
        self.scheduler = _schedule(self.optimizer, total_steps, schedule, warmup_steps)
        self.grad_clip = grad_clip
        self.ema = ema_model(model, ema_decay) if ema_decay is not None else None
        self.averaged = False  # the EMA's weights copied into the model (the stage's end)

    @classmethod
    def from_config(cls, model: nn.Module, method: Method, scfg, steps_per_epoch: int, runner: StepRunner | None = None) -> "Stage":
        """A stage as a run's ``pretrain:``/``finetune:`` section (:class:`clat.config.schema.StageConfig`) describes it."""
        return cls(model, method, lr=scfg.lr, momentum=scfg.momentum, weight_decay=scfg.weight_decay, nesterov=scfg.nesterov,
                   total_steps=scfg.epochs * steps_per_epoch, schedule=scfg.schedule, runner=runner, optimizer=scfg.optimizer,
                   betas=tuple(scfg.betas), eps=scfg.eps, warmup_steps=scfg.warmup_epochs * steps_per_epoch, ema_decay=scfg.ema_decay,
                   label_smoothing=scfg.label_smoothing, grad_clip=scfg.grad_clip)

    def begin_epoch(self, ctx: EpochContext) -> dict:
        """The method's epoch hook (its events: a selection, say), then what freezing implies."""
        events = self.method.on_epoch_start(self.model, ctx)
        for group in self.optimizer.param_groups:  # frozen parameters keep no optimizer state and get no update
            for p in group["params"]:
                if not p.requires_grad:
                    self.optimizer.state.pop(p, None)
                    p.grad = None
        set_bn_train_mode(self.model, self.method.trainable_bns())
        return events

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        metrics = self.runner.step(self.method, self.optimizer, x, y, self.grad_clip)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return metrics

    def eval_model(self) -> nn.Module:
        """The weights the stage's results are: the EMA's while it trains with one, else (and once averaged) the model."""
        return self.ema.module if self.ema is not None and not self.averaged else self.model

    def use_average(self) -> None:
        """The stage ends with its EMA: the model takes the EMA's parameters and buffers (what the next stage starts
        from and the run's last weights are). Nothing without an EMA."""
        if self.ema is None or self.averaged:
            return
        with torch.no_grad():
            ema = self.ema.module
            for mine, avg in zip([*self.model.parameters(), *self.model.buffers()], [*ema.parameters(), *ema.buffers()], strict=True):
                mine.copy_(avg)
        self.averaged = True

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def optimizer_state_bytes(self) -> int:
        st = self.optimizer.state
        return sum(v.numel() * v.element_size() for s in st.values() for v in s.values() if isinstance(v, torch.Tensor))

    def state_dict(self) -> dict:
        out = {"method": self.method.state_dict(), "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
               "scaler": self.runner.scaler.state_dict()}
        if self.ema is not None:
            out["ema"] = self.ema.state_dict()
        return out

    def load_state_dict(self, state: dict, new_lr: float | None = None) -> None:
        """Continue a stage from a checkpoint (the method's state is re-applied by its next epoch hook).
        ``new_lr``: the same schedule, continued from a new base learning rate (``--resume`` after a divergence)."""
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            self.runner.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if "ema" not in state:
                raise ClatError("the checkpoint holds no EMA of the weights, but this stage keeps one (ema_decay): it was written "
                                "by another configuration; start the run again with --force")
            self.ema.load_state_dict(state["ema"])
        if new_lr is not None:
            for s in getattr(self.scheduler, "_schedulers", [self.scheduler]):  # SequentialLR (a warmup first): each of its schedules
                s.base_lrs = [new_lr for _ in self.optimizer.param_groups]
            for g in self.optimizer.param_groups:
                g["initial_lr"] = new_lr
                g["lr"] = new_lr * self.lr_factor(self.scheduler.last_epoch)


def _schedule(optimizer: torch.optim.Optimizer, total_steps: int, schedule: str, warmup_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The stage's per-step schedule: a ``LambdaLR`` of ``schedule``; with a warmup, ``LinearLR`` from lr/(warmup_steps+1) to lr
    first, then that ``LambdaLR`` over the remaining steps (``SequentialLR``)."""
    sched = torch.optim.lr_scheduler
    if not warmup_steps:
        return sched.LambdaLR(optimizer, cosine_lambda(total_steps, schedule))
    warm = sched.LinearLR(optimizer, start_factor=1 / (warmup_steps + 1), end_factor=1.0, total_iters=warmup_steps)
    main = sched.LambdaLR(optimizer, cosine_lambda(total_steps - warmup_steps, schedule))
    return sched.SequentialLR(optimizer, [warm, main], milestones=[warmup_steps])


def set_label_smoothing(method: Method, value: float) -> None:
    """The smoothing of ``method``'s training cross-entropy, and of the method it wraps (CLAT's and AWP's ``base``)."""
    while isinstance(method, Method):
        method.label_smoothing = value
        method = getattr(method, "base", None)
