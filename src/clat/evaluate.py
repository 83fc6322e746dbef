"""Evaluation: clean and white-box PGD accuracy, as data (JSON-able dicts).

The model is evaluated in eval mode (its mode is restored). PGD with restarts
counts an example as robust only if no restart fools the model (the per-sample
worst case), and also reports each restart's own accuracy.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from clat.attacks import Norm, pgd
from clat.errors import ConfigError


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device)
        if xb.dtype == torch.uint8:
            xb = xb.float().div_(255)
        yield xb, y[i : i + batch_size].to(device)


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 10,
    restarts: int = 1,
    norm: Norm = "linf",
    batch_size: int = 256,
    attack: bool = True,
    progress: bool = False,
    desc: str = "eval",
) -> dict:
    """Clean and PGD-``steps`` accuracy of ``model`` on images ``x`` (uint8 or float in [0, 1])."""
    if len(x) == 0:
        raise ConfigError("nothing to evaluate: the evaluation set is empty")
    if restarts < 1:
        raise ConfigError(f"restarts must be >= 1, got {restarts}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    clean_correct = torch.zeros((), dtype=torch.long, device=device)
    robust_correct = torch.zeros((), dtype=torch.long, device=device)
    per_run = torch.zeros(restarts, dtype=torch.long, device=device)
    batches = _batches(x, y, batch_size, device)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=(len(x) + batch_size - 1) // batch_size, desc=desc, leave=False)
    try:
        for xb, yb in batches:
            with torch.no_grad():
                ok = model(xb).argmax(1) == yb
            clean_correct += ok.sum()
            if attack:
                robust = ok.clone()
                for r in range(restarts):
                    x_adv = pgd(model, xb, yb, eps=eps, alpha=alpha, steps=steps, norm=norm)
                    with torch.no_grad():
                        ok_r = model(x_adv).argmax(1) == yb
                    per_run[r] += ok_r.sum()
                    robust &= ok_r
                robust_correct += robust.sum()
    finally:
        model.train(was_training)
    n = len(x)
    out = {"n": n, "clean_acc": clean_correct.item() / n}
    if attack:
        out.update(
            {
                "pgd_acc": robust_correct.item() / n,
                "pgd_acc_per_restart": [c / n for c in per_run.tolist()],
                "attack": {"name": "pgd", "norm": norm, "eps": eps, "alpha": alpha, "steps": steps, "restarts": restarts},
            }
        )
    return out
