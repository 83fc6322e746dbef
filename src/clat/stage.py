"""One training stage: a method on a model, its SGD optimizer and learning-rate schedule, and the step.

The loop (:mod:`clat.loop`), the epoch timer, the benchmarks and the tests all train through this class,
so there is one copy of the order that matters::

    Stage(model, method, ...)   every parameter trainable -> method.setup(model) -> SGD over all parameters
    stage.begin_epoch(ctx)      method.on_epoch_start (CLAT selects and freezes) -> frozen parameters lose their
                                optimizer state -> BatchNorm train/eval modes as the method asks
    stage.step(x, y)            autocast -> method.loss (with the batch's shard) -> backward -> gradient sync -> method.after_backward
                                -> optimizer step -> schedule step

The trainable set is whatever has ``requires_grad`` after ``begin_epoch``: the optimizer holds every
parameter, and a frozen one has no gradient, so it gets no update (and, with its state dropped, no
momentum or weight decay either).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import nn

from clat import distributed as dist_mod
from clat.attacks import Shard
from clat.trainable import set_bn_train_mode
from clat.methods.base import EpochContext, Method


def cosine_lambda(total_steps: int, schedule: str) -> Callable[[int], float]:
    """The learning-rate factor at a step: ``cosine`` (to 0 over ``total_steps``), ``piecewise``
    (Madry et al. / Rice et al.: /10 at half and at three quarters) or ``constant``."""
    if schedule == "constant":
        return lambda step: 1.0
    if schedule == "piecewise":
        return lambda step: 1.0 if step < total_steps // 2 else (0.1 if step < (3 * total_steps) // 4 else 0.01)
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


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
        # the stage's SGD runs as one fused kernel (auto: on a GPU, where the per-parameter launches of the default
        # implementation cost time; on a CPU the update is <1% of an adversarial step and stays as it was)
        self.fused = device.type == "cuda" if fused_optimizer == "auto" else bool(fused_optimizer)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.sync = dist_mod.GradientSync(model)
        self.rank, self.world = dist_mod.info().rank, dist_mod.info().world_size

    @classmethod
    def from_config(cls, model: nn.Module, device: torch.device | str, cfg) -> "StepRunner":
        """The step a run's config (:class:`clat.config.Config`) describes: its precision, memory format, optimizer kernel."""
        return cls(model, device, precision=cfg.precision, channels_last=resolve_channels_last(cfg.channels_last, device, cfg.precision),
                   fused_optimizer=cfg.fused_optimizer)

    def step(self, method: Method, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        shard = Shard(self.rank * len(x), self.world * len(x)) if self.world > 1 else None
        with self.autocast():
            loss, metrics = method.loss(self.model, x, y, shard)
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.sync()
        method.after_backward(self.model)
        self.scaler.step(optimizer)
        self.scaler.update()
        return metrics


class Stage:
    """``method`` training ``model`` with SGD (``lr`` on the ``schedule`` over ``total_steps``)."""

    def __init__(self, model: nn.Module, method: Method, *, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                 nesterov: bool = False, total_steps: int = 1, schedule: str = "constant", runner: StepRunner | None = None) -> None:
        self.model, self.method = model, method
        for p in model.parameters():
            p.requires_grad_(True)
        method.setup(model)
        self.runner = runner or StepRunner(model, next(model.parameters()).device)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                         fused=self.runner.fused or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_lambda(total_steps, schedule))

    @classmethod
    def from_config(cls, model: nn.Module, method: Method, scfg, steps_per_epoch: int, runner: StepRunner | None = None) -> "Stage":
        """A stage as a run's ``pretrain:``/``finetune:`` section (:class:`clat.config.StageConfig`) describes it."""
        return cls(model, method, lr=scfg.lr, momentum=scfg.momentum, weight_decay=scfg.weight_decay, nesterov=scfg.nesterov,
                   total_steps=scfg.epochs * steps_per_epoch, schedule=scfg.schedule, runner=runner)

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
        metrics = self.runner.step(self.method, self.optimizer, x, y)
        self.scheduler.step()
        return metrics

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def optimizer_state_bytes(self) -> int:
        st = self.optimizer.state
        return sum(v.numel() * v.element_size() for s in st.values() for v in s.values() if isinstance(v, torch.Tensor))

    def state_dict(self) -> dict:
        return {"method": self.method.state_dict(), "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.runner.scaler.state_dict()}

    def load_state_dict(self, state: dict, new_lr: float | None = None) -> None:
        """Continue a stage from a checkpoint (the method's state is re-applied by its next epoch hook).
        ``new_lr``: the same schedule, continued from a new base learning rate (``--resume`` after a divergence)."""
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            self.runner.scaler.load_state_dict(state["scaler"])
        if new_lr is not None:
            self.scheduler.base_lrs = [new_lr for _ in self.optimizer.param_groups]
            for g in self.optimizer.param_groups:
                g["initial_lr"] = new_lr
                g["lr"] = new_lr * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
