"""Random number generators of a run: the global state a checkpoint saves, the seeded per-epoch streams, and deterministic kernels."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch


def epoch_generator(seed: int, epoch: int, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator of its own for (run seed, epoch, stream): 1 = the method's draws (random layers), 2 = the
    criticality sample. Independent of the global RNG, so re-computing an epoch draws the same numbers."""
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + epoch * 7919 + stream)
    return g


def get_state() -> dict:
    """Every RNG a training step may touch (clat itself draws only from torch's), in
    containers that load with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "python" in state:
        v, internal, gauss = state["python"]
        random.setstate((v, tuple(internal), gauss))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def device_state(device: torch.device | str) -> torch.Tensor:
    """The state of the generator that draws random tensors on ``device`` (the CPU's, or that CUDA device's)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    if device.type == "mps":
        return torch.mps.get_rng_state()
    return torch.get_rng_state()


def set_device_state(device: torch.device | str, state: torch.Tensor) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    elif device.type == "mps":
        torch.mps.set_rng_state(state)
    else:
        torch.set_rng_state(state)


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
