import json

import pytest
import torch

from clat.runs.checkpoint import read_state_dict
from clat.config.load import load_config
from clat.base.errors import ConfigError
from clat.runs.folder import Checkpoints
from clat.data.loader import Splits
from clat.training.loop import train
from clat.training.stage import cosine_lambda


def tiny_splits(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 3, 32, 32, generator=g) * 255).to(torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return Splits(x, y, x[:16], y[:16], x[:16], y[:16], 10, "synthetic")


FAST = ["model.name=tiny_cnn", "attack.steps=1", "clat.criticality.steps=1", "clat.criticality.batch_size=16",
        "data.batch_size=32", "eval.n_examples=16", "eval.steps=1", "progress=false", "data.dataset=bundled"]
DET = "deterministic=true"  # bit-identical on a GPU too (on an H100 resumed runs differed in the 4th digit without it)


def test_reselection_at_epochs_1_11_21_and_schedule_uninterrupted(tmp_path):
    cfg = load_config(None, FAST + ["pretrain.epochs=0", "finetune.epochs=25", "finetune.lr=0.05", "eval.every=100"])
    train(cfg, tmp_path / "run", data=tiny_splits())
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "selection" in r] == [1, 11, 21]
    steps_per_epoch = 2  # 48 training images, batch 32, drop_last off
    f = cosine_lambda(25 * steps_per_epoch, "cosine")
    for r in rows:
        assert r["lr"] == pytest.approx(0.05 * f(r["epoch"] * steps_per_epoch), abs=1e-12)
        assert r["trainable_params"] < r["total_params"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [h["epoch"] for h in summary["selection_history"]] == [1, 11, 21]


def _final(run):
    return read_state_dict(run / "model.safetensors")


def assert_resume_matches_uninterrupted(tmp_path, monkeypatch, over, stop_after):
    """Train ``over`` once uninterrupted (run a) and once interrupted right after epoch
    ``stop_after``'s checkpoint (epochs from 1), then resumed (run b): the final weights must be identical."""
    train(load_config(None, over), tmp_path / "a", data=tiny_splits())
    real_save = Checkpoints.save

    def crashing_save(self, epoch, *a, **k):
        out = real_save(self, epoch, *a, **k)
        if epoch == stop_after:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(Checkpoints, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, over), tmp_path / "b", data=tiny_splits())
    monkeypatch.setattr(Checkpoints, "save", real_save)
    train(None, tmp_path / "b", resume=True, data=tiny_splits())
    a, b = _final(tmp_path / "a"), _final(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("stop_after", [2, 4])
def test_resume_after_interruption_gives_identical_weights(tmp_path, monkeypatch, stop_after):
    over = FAST + ["pretrain.epochs=2", "finetune.epochs=3", "clat.reselect_every=2", "data.augment=true", DET]
    assert_resume_matches_uninterrupted(tmp_path, monkeypatch, over, stop_after)
    rows = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]


def test_corrupted_latest_checkpoint_falls_back_with_warning(tmp_path):
    over = FAST + ["pretrain.epochs=2", "finetune.epochs=0", "keep_checkpoints=3"]
    train(load_config(None, over), tmp_path / "r", data=tiny_splits())
    ck = Checkpoints(tmp_path / "r", 3)
    latest = ck.list()[-1]
    with open(latest / "model.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"garbage!")
    with pytest.warns(UserWarning, match="corrupted"):
        assert ck.latest_valid() == ck.list()[-2]


def test_run_dir_is_never_overwritten_without_force(tmp_path):
    over = FAST + ["pretrain.epochs=1", "finetune.epochs=0"]
    train(load_config(None, over), tmp_path / "r", data=tiny_splits())
    before = (tmp_path / "r" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="finished run.*--force"):
        train(load_config(None, over), tmp_path / "r", data=tiny_splits())
    assert (tmp_path / "r" / "model.safetensors").read_bytes() == before
    train(load_config(None, over + ["seed=1"]), tmp_path / "r", data=tiny_splits(), force=True)
    assert (tmp_path / "r" / "model.safetensors").read_bytes() != before


def test_clat_from_existing_checkpoint_and_custom_model(tmp_path):
    from torch import nn

    train(load_config(None, FAST + ["pretrain.epochs=1", "finetune.epochs=0"]), tmp_path / "pre", data=tiny_splits())
    over = FAST + ["pretrain.epochs=0", "finetune.epochs=1", f"init={tmp_path / 'pre' / 'model.safetensors'}"]
    s = train(load_config(None, over), tmp_path / "ft", data=tiny_splits())
    assert s["selection_history"][0]["trainable_params"] < s["total_params"]

    class MLP(nn.Module):  # any nn.Module on [0, 1] images
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(3072, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))

        def forward(self, x):
            return self.net(x)

    m = MLP()
    s = train(load_config(None, FAST + ["pretrain.epochs=1", "finetune.epochs=1"]), tmp_path / "mlp", data=tiny_splits(), model=m)
    assert s["selection_history"][0]["selected"][0].startswith("net.")


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(tmp_path):
    over = FAST + ["pretrain.epochs=1", "finetune.epochs=1", "finetune.method=standard", "finetune.lr=1e30", "pretrain.method=standard"]
    from clat.training.loop import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="lower the learning rate|Lower the learning rate"):
        train(load_config(None, over), tmp_path / "r", data=tiny_splits())
    ck = Checkpoints(tmp_path / "r", 2)
    assert [p.name for p in ck.list()] == ["epoch_0001"]
    sd = read_state_dict(ck.list()[0] / "model.safetensors")
    assert all(torch.isfinite(v.float()).all() for v in sd.values())


@pytest.mark.slow
def test_short_run_on_real_cifar_subset_beats_chance(tmp_path, shared_cifar):
    over = ["data.dataset=cifar10", f"data.root={shared_cifar}", "data.verify=false", "model.name=small_cnn",
            "data.train_size=2500", "data.val_size=500", "data.test_size=500", "pretrain.method=standard",
            "pretrain.epochs=3", "pretrain.lr=0.05", "finetune.epochs=1", "finetune.lr=0.01", "attack.steps=2",
            "attack.alpha=5/255", "eval.n_examples=500", "eval.steps=3", "progress=false"]
    with pytest.warns(UserWarning, match="not verified|verif"):
        s = train(load_config(None, over), tmp_path / "r")
    assert s["final_val"]["clean_acc"] > 0.25  # chance is 0.10
    assert s["selection_history"]


def test_rng_states_round_trip_through_a_safe_checkpoint(tmp_path):
    import random

    import numpy as np

    from clat.runs.checkpoint import load_state, save_state
    from clat.base.rng import get_state as _get_rng
    from clat.base.rng import set_state as _set_rng

    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    save_state(tmp_path / "s.pt", {"rng": _get_rng()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    _set_rng(load_state(tmp_path / "s.pt")["rng"])  # weights_only=True load
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_run_done_in_chunks_equals_one_uninterrupted_run(tmp_path):
    over = FAST + ["pretrain.epochs=2", "finetune.epochs=2", "clat.reselect_every=1", "data.augment=true", DET]
    train(load_config(None, over), tmp_path / "a", data=tiny_splits())
    part = train(load_config(None, over), tmp_path / "b", data=tiny_splits(), until_epoch=1)
    assert part == {"run_dir": str(tmp_path / "b"), "finished": False, "epochs_done": 1, "epochs": 4}
    assert not (tmp_path / "b" / "summary.json").exists()
    assert train(None, tmp_path / "b", resume=True, data=tiny_splits(), until_epoch=3)["epochs_done"] == 3
    assert train(None, tmp_path / "b", resume=True, data=tiny_splits())["finished"]
    a, b = _final(tmp_path / "a"), _final(tmp_path / "b")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_split_seed_keeps_the_validation_split_when_the_seed_changes():
    from clat.data.prepare import prepare_data

    base = ["data.dataset=bundled", "data.val_size=100", "data.split_seed=7"]
    a, b = prepare_data(load_config(None, base + ["seed=0"])), prepare_data(load_config(None, base + ["seed=1"]))
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.x_train, b.x_train)
    c = prepare_data(load_config(None, ["data.dataset=bundled", "data.val_size=100", "seed=1"]))
    assert not torch.equal(a.x_val, c.x_val)


def test_deterministic_true_applies_only_inside_the_run(monkeypatch, tmp_path):
    """deterministic=true turns on deterministic kernels for the run and restores the settings after
    (on an H100, two identical runs differed by up to 1.7e-2 in a weight without it, and were
    bit-identical with it; CPUs are deterministic anyway)."""
    import importlib

    T = importlib.import_module("clat.training.loop")
    seen = {}

    def fake(cfg, run_dir, **kw):
        seen.update(det=torch.are_deterministic_algorithms_enabled(), warn=torch.is_deterministic_algorithms_warn_only_enabled(),
                    cudnn=torch.backends.cudnn.deterministic, bench=torch.backends.cudnn.benchmark)
        raise KeyboardInterrupt  # leaves the context the way a crash would

    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    monkeypatch.setattr(T, "_train", fake)
    with pytest.raises(KeyboardInterrupt):
        T.train(load_config(None, FAST + [DET]), tmp_path / "r")
    assert seen == {"det": True, "warn": True, "cudnn": True, "bench": False}
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == before
    seen.clear()
    with pytest.raises(KeyboardInterrupt):
        T.train(load_config(None, FAST), tmp_path / "r2")
    assert seen["det"] == before[0]
