"""The held-out check of a run's epochs: clean and PGD accuracy on the first images of the validation split, the same on
any number of ranks (:func:`held_out`); and the validation a method may ask for at its stage's end (RiFT's choice of α)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from clat.base import distributed as dist_mod
from clat.base.errors import ConfigError
from clat.config.schema import Config
from clat.data.loader import Splits
from clat.eval.accuracy import evaluate


def held_out(model: nn.Module, cfg: Config, splits: Splits, n_val: int, autocast, progress: bool = False) -> dict:
    """Clean and PGD accuracy on the first ``n_val`` validation images; several ranks split
    them and sum the counts. Random starts are seeded per example, so the result does not
    depend on the number of ranks or the batch size, and the global RNG is not touched."""
    i = dist_mod.info()
    lo, hi = n_val * i.rank // i.world_size, n_val * (i.rank + 1) // i.world_size
    counts = torch.zeros(2, dtype=torch.float64)
    if hi > lo:
        with autocast():
            r = evaluate(model, splits.x_val[lo:hi], splits.y_val[lo:hi], cfg.attack.threat().replace(steps=cfg.eval.steps),
                         restarts=cfg.eval.restarts, batch_size=cfg.data.eval_batch_size, progress=progress, desc="val",
                         seed=cfg.seed, index_offset=lo)
        counts[:] = torch.tensor([r["clean_correct"], r["pgd_correct"]], dtype=torch.float64)
    dev = next(model.parameters()).device
    counts = dist_mod.all_reduce_(counts.to(dev)).cpu() if i.enabled else counts
    return {"clean_acc": counts[0].item() / n_val, "pgd_acc": counts[1].item() / n_val, "n": n_val}


def validate(model: nn.Module, cfg: Config, splits: Splits, n_val: int, autocast=contextlib.nullcontext) -> dict:
    """The validation a method's ``on_stage_end`` receives: clean and PGD accuracy of ``model``."""
    if n_val == 0:
        raise ConfigError("this method chooses on the validation split, but it is empty: set data.val_size and eval.n_examples > 0")
    r = held_out(model, cfg, splits, n_val, autocast)
    return {"clean_acc": r["clean_acc"], "pgd_acc": r["pgd_acc"]}
