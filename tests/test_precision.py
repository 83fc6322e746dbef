"""GPU-readiness paths, run on the CPU: mixed precision (bf16, fp16 + GradScaler),
channels_last and torch.compile through the one training loop."""

import json

import pytest
import torch

from clat.attacks import ThreatModel, pgd
from clat.checkpoint import load_state, read_state_dict
from clat.config import load_config
from clat.models import create_model
from clat.runs import Checkpoints
from clat.loop import train

from tests.test_train import FAST, assert_resume_matches_uninterrupted, tiny_splits


def _rows(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_and_channels_last_train_pgd_at_then_clat(tmp_path, precision):
    over = FAST + ["pretrain.epochs=1", "finetune.epochs=1", f"precision={precision}", "channels_last=true"]
    s = train(load_config(None, over), tmp_path / "r", data=tiny_splits())
    assert s["precision"] == precision
    for r in _rows(tmp_path / "r"):
        assert all(torch.isfinite(torch.tensor(v)) for v in r["train"].values())
    w = read_state_dict(tmp_path / "r" / "model.safetensors")
    assert all(v.dtype in (torch.float32, torch.int64) for v in w.values())  # master weights stay fp32
    state = load_state(Checkpoints(tmp_path / "r", 2).list()[-1] / "state.pt")
    assert ("scale" in state["scaler"]) == (precision == "fp16")  # the fp16 loss scale is saved for resume


def test_fp16_run_resumes_to_identical_weights(tmp_path, monkeypatch):
    over = FAST + ["pretrain.epochs=2", "finetune.epochs=1", "precision=fp16"]
    assert_resume_matches_uninterrupted(tmp_path, monkeypatch, over, stop_after=0)


def test_pgd_under_fp16_autocast_still_moves_every_pixel():
    """Small input gradients underflow in fp16; the attack scales its objective so the
    sign step stays defined."""
    model = create_model("tiny_cnn", 10).eval()
    x = torch.rand(4, 3, 32, 32)
    y = torch.randint(0, 10, (4,))
    with torch.autocast("cpu", dtype=torch.float16):
        x_adv = pgd(model, x, y, ThreatModel(steps=3, random_start=False))
    moved = ((x_adv - x).abs() > 1e-6).float().mean()
    assert moved > 0.9
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6


@pytest.mark.slow
def test_compiled_model_trains_pgd_at_and_clat(tmp_path):
    over = FAST + ["pretrain.epochs=1", "finetune.epochs=1", "compile=true"]
    s = train(load_config(None, over), tmp_path / "r", data=tiny_splits())
    assert s["selection_history"] and all(torch.isfinite(torch.tensor(r["train"]["loss"])) for r in _rows(tmp_path / "r"))
