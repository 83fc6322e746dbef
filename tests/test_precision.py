"""GPU-readiness paths, run on the CPU: mixed precision (bf16, fp16 + GradScaler),
channels_last and torch.compile through the one training loop."""

import json

import pytest
import torch

import clat

from clat.attacks.threat import ThreatModel, pgd
from clat.runs.checkpoint import load_state, read_state_dict
from clat.config.load import load_config
from clat.models import create_model
from clat.runs.folder import Checkpoints
from clat.training.loop import train

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
    assert_resume_matches_uninterrupted(tmp_path, monkeypatch, over, stop_after=1)


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


def test_channels_last_auto_is_nhwc_on_a_cpu_and_explicit_values_win():
    from clat.base.errors import ConfigError
    from clat.training.stage import resolve_channels_last

    assert load_config(None, []).channels_last == "auto"  # the shipped default
    assert resolve_channels_last("auto", "cpu") is True  # measured faster on every CPU-size zoo model
    assert resolve_channels_last("auto", "cuda", "bf16") is True and resolve_channels_last("auto", "cuda", "fp16") is True
    assert resolve_channels_last("auto", "cuda", "fp32") is False  # unmeasured: PyTorch's default kept
    assert resolve_channels_last(False, "cpu") is False and resolve_channels_last(True, "cuda") is True
    assert load_config(None, ["channels_last=false"]).channels_last is False
    with pytest.raises(ConfigError, match="channels_last"):
        load_config(None, ["channels_last=maybe"])


@pytest.mark.parametrize("setting", ["auto", "false"])
def test_default_run_trains_in_the_resolved_memory_format(tmp_path, setting):
    seen = []
    model = create_model("tiny_cnn", 10)

    class Probe(clat.Callback):
        def on_epoch_end(self, row):
            conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
            seen.append(conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous())

    over = FAST + ["pretrain.epochs=1", "finetune.epochs=0", f"channels_last={setting}"]
    train(load_config(None, over), tmp_path / "r", data=tiny_splits(), model=model, callbacks=[Probe()])
    assert seen == [setting == "auto"]  # trained in NHWC on a CPU unless told otherwise
    assert all(v.is_contiguous() for v in read_state_dict(tmp_path / "r" / "model.safetensors").values())


def test_fused_sgd_trains_to_the_same_weights_as_the_default(tmp_path):
    """fused_optimizer (auto: on a GPU) is one kernel for SGD's update, frozen parameters (no gradient) included;
    on a CPU it must give the loop's default update up to float rounding, through PGD-AT and a CLAT stage."""
    weights = {}
    for fused in ("false", "true"):
        over = FAST + ["pretrain.epochs=1", "finetune.epochs=1", f"fused_optimizer={fused}"]
        train(load_config(None, over), tmp_path / fused, data=tiny_splits())
        weights[fused] = read_state_dict(tmp_path / fused / "model.safetensors")
    for k, v in weights["false"].items():
        torch.testing.assert_close(weights["true"][k], v, rtol=1e-4, atol=1e-5)
    from clat.training.stage import StepRunner

    assert StepRunner(torch.nn.Linear(2, 2), "cpu", fused_optimizer="auto").fused is False
    assert StepRunner(torch.nn.Linear(2, 2), "cuda", fused_optimizer="auto").fused is True


@pytest.mark.parametrize("setting,mode", [("true", None), ("reduce-overhead", "reduce-overhead"), ("max-autotune", "max-autotune")])
def test_compile_setting_reaches_torch_compile(tmp_path, monkeypatch, setting, mode):
    """compile=reduce-overhead is the CUDA-graph path on a GPU; here only its wiring is checked (the model is
    compiled with that mode; compiling for real on a CPU is the slow test above)."""
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append(kw.get("mode")))
    over = FAST + ["pretrain.epochs=1", "finetune.epochs=0", f"compile={setting}"]
    train(load_config(None, over), tmp_path / "r", data=tiny_splits())
    assert seen == [mode]
