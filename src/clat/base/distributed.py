"""Data-parallel training over several processes (``torchrun``), one device per rank.

Launch any ``clat train`` with ``torchrun`` and it runs data-parallel::

    torchrun --nproc_per_node 8 -m clat train configs/rn18_pgdat_clat_cifar10.yaml
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 -m clat train ...

``data.batch_size`` is the per-rank batch: the global batch is ``batch_size × world_size``.

How it works, and why not the ``DistributedDataParallel`` wrapper: every rank
holds the whole model and the same data order; the :class:`~clat.data.loader.Loader`
gives rank ``r`` part ``r`` of each global batch. After ``loss.backward()`` the
gradients of the *trainable* parameters are averaged over the ranks with
bucketed ``all_reduce`` calls (:class:`GradientSync`) — the arithmetic of DDP.
The DDP wrapper itself does not fit adversarial training's step: it expects one
backward per forward through it, but a PGD step runs ten forward passes whose
backward reaches only the input (the cause of the classic "Expected to have
finished reduction in the prior iteration" error), CLAT's feature passes stop
early by design, and CLAT changes the trainable set at every re-selection (a
DDP wrapper would have to be rebuilt). Reading ``requires_grad`` at every step
makes a changed trainable set need nothing at all.

What else keeps the ranks identical:
- random starts of attacks are drawn for the whole global batch on every rank
  and sliced (:class:`clat.attacks.threat.Shard`, passed by the step to ``method.loss``), so a run on N ranks takes the
  same steps as one process with the global batch (exactly, up to float
  rounding, for models without BatchNorm; with BatchNorm each rank normalizes
  with its own batch statistics, as DDP does, unless ``sync_bn=true`` on GPUs);
- CLAT's and RiFT's layer choices are made on rank 0 and broadcast;
- BatchNorm running statistics are broadcast from rank 0 after every epoch;
- per-epoch metrics are averaged (training) or summed (held-out counts) over
  ranks; only rank 0 writes metrics, checkpoints and reports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from clat.base.errors import ConfigError

BUCKET_BYTES = 25 * 1024 * 1024  # DDP's default bucket size


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def info() -> DistInfo:
    """This process's place in the current process group (a single process when none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


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


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str) -> tuple[DistInfo, torch.device | None]:
    """Join the process group ``torchrun`` describes (``env://``), or use the one already
    initialized by the caller.

    Returns the rank information and, when distributed, the device of this rank
    (``cuda:LOCAL_RANK`` on GPUs, else the CPU); ``None`` when not distributed.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if not launched_by_torchrun():
            return DistInfo(), None
        if not dist.is_available():
            raise ConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed; run a single process")
        use_cuda = torch.cuda.is_available() and device != "cpu"
        if use_cuda:
            local_rank, n_gpu = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
            if local_rank >= n_gpu:
                raise ConfigError(f"this process has LOCAL_RANK {local_rank} but only {n_gpu} CUDA device(s) are visible: start at most "
                                  f"{n_gpu} "
                                  f"process(es) per node (torchrun --nproc_per_node {n_gpu}), or train on CPUs with device=cpu")
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    i = info()
    if not i.enabled:
        return i, None
    use_cuda = torch.cuda.is_available() and device != "cpu" and dist.get_backend() != "gloo"
    return i, torch.device("cuda", i.local_rank) if use_cuda else torch.device("cpu")


def barrier() -> None:
    if info().enabled:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself when not distributed)."""
    if not info().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place sum (or mean) of ``t`` over the ranks; unchanged when not distributed."""
    i = info()
    if i.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        if op == "mean":
            t.div_(i.world_size)
    return t


def _buckets(tensors: Sequence[torch.Tensor], limit: int) -> Iterable[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and (size + t.numel() * t.element_size() > limit or t.dtype != bucket[0].dtype or t.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    if bucket:
        yield bucket


class GradientSync:
    """Average the gradients of the trainable parameters over the ranks, in buckets.

    The trainable set is read at every call (``requires_grad``), so CLAT's
    re-selection or LoRA's adapters need no rebuild. A trainable parameter that
    got no gradient on this rank contributes zeros (every rank takes part in
    every bucket, so the collectives always match).
    """

    def __init__(self, model: nn.Module, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.model = model
        self.bucket_bytes = bucket_bytes

    def __call__(self) -> None:
        world = info().world_size
        if world == 1:
            return
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in _buckets([p.grad for p in params], self.bucket_bytes):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(world)
            offset = 0
            for g in bucket:
                n = g.numel()
                g.copy_(flat[offset : offset + n].view_as(g))
                offset += n


def broadcast_module(model: nn.Module, src: int = 0, buffers_only: bool = False) -> None:
    """Copy rank ``src``'s parameters (unless ``buffers_only``) and buffers to every rank."""
    if not info().enabled:
        return
    tensors = [] if buffers_only else [p.data for p in model.parameters()]
    tensors += [b for b in model.buffers()]
    for t in tensors:
        dist.broadcast(t, src=src)


def check_batch_norm(model: nn.Module, device: torch.device, sync_bn: bool) -> nn.Module:
    """Convert BatchNorm to SyncBatchNorm when asked (GPUs only: PyTorch's SyncBatchNorm has no CPU kernel)."""
    if not sync_bn or not info().enabled:
        return model
    if device.type != "cuda":
        raise ConfigError("sync_bn=true needs GPUs (PyTorch's SyncBatchNorm does not run on the CPU); drop it for CPU/gloo runs")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def mean_over_ranks(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Epoch means of the training metrics, averaged over the ranks (one read-back per epoch)."""
    if not metrics:
        return {}
    keys = sorted(metrics)
    v = all_reduce_(torch.stack([metrics[k].detach().float() for k in keys]), op="mean")
    return dict(zip(keys, v.tolist()))
