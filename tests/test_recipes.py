"""Training recipes beyond SGD (issue 36): AdamW, warmup, an EMA of the weights, label smoothing, gradient clipping,
factory keyword arguments (``model.kwargs``), a classifier reset for ``init``, and callbacks that act on the run."""

import ast
import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clat
from clat.runs.checkpoint import load_state, read_state_dict, save_weights
from clat.config.load import load_config
from clat.data.loader import Splits
from clat.base.errors import ConfigError
from clat.layers.discovery import find_layers
from clat.training.loop import train
from clat.methods import EpochContext, create_method, list_methods
from clat.models import create_model
from clat.runs.folder import Checkpoints
from clat.training.stage import Stage, StepRunner, set_label_smoothing, warmup_lambda
from clat.training.warmstart import load_init
from tests.test_train import DET, FAST, assert_resume_matches_uninterrupted, tiny_splits

RECIPE = ["finetune.optimizer=adamw", "finetune.lr=0.002", "finetune.weight_decay=0.05", "finetune.betas=[0.8, 0.99]",
          "finetune.warmup_epochs=1", "finetune.ema_decay=0.9", "finetune.label_smoothing=0.1", "finetune.grad_clip=1.0",
          "pretrain.ema_decay=0.5", "pretrain.warmup_epochs=1"]


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_default_stage_is_clats_sgd_recipe():
    model = create_model("tiny_cnn")
    stage = Stage(model, create_method("pgd_at", load_config()), lr=0.1, total_steps=10, schedule="cosine")
    g = stage.optimizer.param_groups[0]
    assert type(stage.optimizer) is torch.optim.SGD and (g["momentum"], g["weight_decay"], g["nesterov"]) == (0.9, 5e-4, False)
    assert type(stage.scheduler) is torch.optim.lr_scheduler.LambdaLR
    assert stage.ema is None and stage.grad_clip is None and stage.method.label_smoothing == 0.0
    assert "ema" not in stage.state_dict()


def test_the_default_stage_trains_exactly_as_0_1s_sgd_and_lambdalr():
    """The new options off, a stage's steps equal 0.1's hand-built SGD + LambdaLR bit for bit (weights and momentum)."""
    from clat.training.stage import cosine_lambda

    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    torch.manual_seed(0)
    a = create_model("tiny_cnn")
    b = create_model("tiny_cnn")
    b.load_state_dict(a.state_dict())
    stage = Stage(a, create_method("standard", load_config()), lr=0.1, total_steps=4, schedule="piecewise")
    method = create_method("standard", load_config())
    sgd = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=False)
    sched = torch.optim.lr_scheduler.LambdaLR(sgd, cosine_lambda(4, "piecewise"))
    for _ in range(4):
        stage.step(x, y)
        sgd.zero_grad(set_to_none=True)
        method.loss(b, x, y)[0].backward()
        sgd.step()
        sched.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert all(torch.equal(stage.optimizer.state[p]["momentum_buffer"], sgd.state[q]["momentum_buffer"])
               for p, q in zip(a.parameters(), b.parameters()))

def test_adamw_gets_its_settings():
    cfg = load_config(None, ["finetune.optimizer=adamw", "finetune.betas=[0.8, 0.95]", "finetune.eps=1e-6", "finetune.weight_decay=0.05"])
    stage = Stage.from_config(create_model("tiny_cnn"), create_method("pgd_at", cfg), cfg.finetune, steps_per_epoch=3)
    g = stage.optimizer.param_groups[0]
    assert type(stage.optimizer) is torch.optim.AdamW
    assert (g["betas"], g["eps"], g["weight_decay"], g["lr"]) == ((0.8, 0.95), 1e-6, 0.05, 0.1)


@pytest.mark.parametrize("warmup, total", [(3, 10), (1, 4), (4, 4)])
def test_warmup_runs_linearly_then_the_schedule(warmup, total):
    stage = Stage(nn.Sequential(nn.Linear(1, 1)), create_method("standard", load_config()), lr=0.1, total_steps=total, schedule="cosine",
                  warmup_steps=warmup)
    assert type(stage.scheduler) is torch.optim.lr_scheduler.SequentialLR
    lrs = []
    for _ in range(total):
        lrs.append(stage.lr)
        stage.optimizer.step()
        stage.scheduler.step()
    f = warmup_lambda(warmup, total, "cosine")
    assert lrs == pytest.approx([0.1 * f(t) for t in range(total)], abs=1e-12)
    assert lrs[0] == pytest.approx(0.1 / (warmup + 1)) and (warmup == total or lrs[warmup] == pytest.approx(0.1))


@pytest.mark.parametrize("bad, needle", [
    ("finetune.optimizer=adam", "finetune.optimizer must be one of sgd, adamw"),
    ("finetune.betas=[0.9]", "finetune.betas must be two numbers"),
    ("finetune.eps=0", "finetune.eps must be > 0"),
    ("finetune.warmup_epochs=60", "finetune.warmup_epochs must be between 0 and finetune.epochs (50)"),
    ("finetune.ema_decay=1", "finetune.ema_decay must be in (0, 1)"),
    ("finetune.label_smoothing=1", "finetune.label_smoothing must be in [0, 1)"),
    ("finetune.grad_clip=0", "finetune.grad_clip must be > 0"),
    ("init_reset_head=true", "init is not set"),
    ("model.kwargs.num_classes=5", "set model.num_classes instead"),
    ("model.kwargs=[1]", "model.kwargs must be a mapping"),
])
def test_bad_recipe_settings_are_one_line_errors(bad, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [bad])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_nesterov_with_adamw_is_refused():
    with pytest.raises(ConfigError, match="nesterov=true is SGD's"):
        load_config(None, ["finetune.optimizer=adamw", "finetune.nesterov=true"])


# -- label smoothing: every method's training CE, never the attack ------------------------------------------------------

def _loss(name, smoothing):
    cfg = load_config(None, ["attack.steps=1", "clat.criticality.steps=1", "clat.criticality.batch_size=8", "rift.batch_size=8",
                             "rift.steps=1"])
    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    method = create_method(name, cfg, find_layers(model), default_k=1)
    stage = Stage(model, method, lr=0.01, label_smoothing=smoothing)
    stage.begin_epoch(EpochContext(0, 0, lambda n: (x[:n], y[:n]), torch.Generator().manual_seed(0)))
    torch.manual_seed(1)
    return method.loss(model, x, y)[0].item()


@pytest.mark.parametrize("name", list_methods())
def test_label_smoothing_reaches_every_methods_training_loss(name):
    if name == "lora":
        pytest.importorskip("peft")
    assert _loss(name, 0.0) != _loss(name, 0.3)


def test_label_smoothing_is_torchs_and_reaches_a_wrapped_base():
    cfg = load_config(None, ["clat.ce_on=base", "pretrain.method=trades"])
    method = create_method("clat", cfg, find_layers(create_model("tiny_cnn")), default_k=1)
    set_label_smoothing(method, 0.2)
    assert method.base.label_smoothing == 0.2
    logits, y = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    assert torch.equal(method.ce(logits, y), F.cross_entropy(logits, y, label_smoothing=0.2))


# -- gradient clipping ---------------------------------------------------------------------------------------------------

def test_gradient_clipping_bounds_the_update_of_the_trained_parameters():
    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    method = create_method("standard", load_config())
    stage = Stage(model, method, lr=1.0, momentum=0.0, weight_decay=0.0, grad_clip=1e-3)
    frozen = next(p for p in model.parameters() if p.dim() == 4)
    frozen.requires_grad_(False)  # frozen, as CLAT leaves most layers: no gradient, no part of the norm
    before = [p.detach().clone() for p in model.parameters()]
    stage.step(torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    delta = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert 0 < delta.norm() <= 1e-3 * (1 + 1e-5)
    assert torch.equal(frozen, before[0])


def test_clipping_with_fp16_unscales_first(monkeypatch):
    seen = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: seen.append(real(params, max_norm)) or seen[-1])
    model = create_model("tiny_cnn")
    runner = StepRunner(model, "cpu", precision="fp32")
    runner.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=True)  # fp16's scaler, on a CPU
    stage = Stage(model, create_method("standard", load_config()), lr=0.1, grad_clip=1e9, runner=runner)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    stage.step(x, y)
    assert len(seen) == 1 and seen[0] < 1e3  # the true gradient's norm, not 1024 times it


# -- whole runs: AdamW + warmup + EMA + smoothing + clipping, CLAT's re-selection included ------------------------------

@pytest.mark.parametrize("stop_after", [1, 2, 4])
def test_a_full_recipe_run_resumes_bit_exactly(tmp_path, monkeypatch, stop_after):
    over = FAST + ["pretrain.epochs=2", "finetune.epochs=3", "clat.reselect_every=2", DET] + RECIPE
    assert_resume_matches_uninterrupted(tmp_path, monkeypatch, over, stop_after)  # EMA state restored inside a stage, or at its end
    rows = _rows(tmp_path / "b")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5] and [r["stage"] for r in rows] == ["pretrain"] * 2 + ["finetune"] * 3
    steps = 2  # 48 training images, batch 32
    f = warmup_lambda(steps, 3 * steps, "cosine")
    assert [r["lr"] for r in rows[2:]] == pytest.approx([0.002 * f(e * steps) for e in (1, 2, 3)], abs=1e-12)


def test_the_ema_is_evaluated_and_is_the_best_and_last_weights(tmp_path, monkeypatch):
    import clat.training.loop as loop

    seen = []
    real = loop.held_out
    monkeypatch.setattr(loop, "held_out", lambda model, *a, **k: seen.append(model) or real(model, *a, **k))
    model = create_model("tiny_cnn")
    over = FAST + ["pretrain.epochs=0", "finetune.epochs=3", "finetune.method=pgd_at", "finetune.ema_decay=0.7"]
    train(load_config(None, over), tmp_path / "run", data=tiny_splits(), model=model)
    assert len(seen) == 3 and all(m is not model for m in seen[:2])  # the EMA's copy while the stage trains
    last = Checkpoints(tmp_path / "run").dir(epoch=3)
    state = load_state(last / "state.pt")
    ema = {k[len("module."):]: v for k, v in state["ema"].items() if k.startswith("module.")}
    final = read_state_dict(tmp_path / "run" / "model.safetensors")
    assert final.keys() <= ema.keys() and all(torch.equal(final[k], ema[k]) for k in final)  # the run ends with the average
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in final.items())  # and so does the model trained in place
    assert int(state["ema"]["n_averaged"]) == 3 * 2
    best = read_state_dict(tmp_path / "run" / "best" / "model.safetensors")
    best_epoch = json.loads((tmp_path / "run" / "summary.json").read_text())["best_epoch"]
    if best_epoch == 3:
        assert all(torch.equal(best[k], final[k]) for k in final)


def test_the_next_stage_starts_from_the_ema_of_the_previous(tmp_path):
    over = FAST + ["pretrain.epochs=2", "finetune.epochs=1", "pretrain.ema_decay=0.9", "keep_checkpoints=5", "finetune.method=pgd_at"]
    train(load_config(None, over), tmp_path / "run", data=tiny_splits())
    state = load_state(Checkpoints(tmp_path / "run").dir(epoch=2) / "state.pt")
    weights = read_state_dict(Checkpoints(tmp_path / "run").weights(epoch=2))
    assert all(torch.equal(weights[k], state["ema"][f"module.{k}"]) for k in weights)


def test_clat_reselection_with_adamw_drops_the_state_of_frozen_parameters_and_the_ema_covers_all():
    cfg = load_config(None, ["attack.steps=1", "clat.criticality.steps=1", "clat.criticality.batch_size=8", "clat.k=1"])
    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    stage = Stage(model, create_method("clat", cfg, find_layers(model)), lr=1e-3, optimizer="adamw", ema_decay=0.5, grad_clip=0.5)
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stage.begin_epoch(EpochContext(0, 0, lambda n: (x[:n], y[:n]), torch.Generator().manual_seed(0)))
    stage.step(x, y)
    stage.step(x, y)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and len(trained) < len(frozen_before)
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if n not in trained)
    assert len(stage.optimizer.state) == len(trained)
    ema_names = {n for n, _ in stage.ema.module.named_parameters()}
    assert ema_names == set(frozen_before) and not any(p.requires_grad for p in stage.ema.module.parameters())
    assert {n for n, _ in stage.ema.module.named_buffers()} == {n for n, _ in model.named_buffers()}
    ema = dict(stage.ema.module.named_parameters())
    assert all(torch.equal(ema[n], p) for n, p in model.named_parameters() if n not in trained)  # the average of an unchanged value
    assert not all(torch.equal(ema[n], p) for n, p in model.named_parameters() if n in trained)  # half-way between two steps


def test_a_resume_of_an_ema_stage_needs_the_ema_in_the_checkpoint():
    model = create_model("tiny_cnn")
    method = create_method("standard", load_config())
    state = Stage(model, method, lr=0.1).state_dict()
    with pytest.raises(clat.ClatError, match="holds no EMA"):
        Stage(model, method, lr=0.1, ema_decay=0.9).load_state_dict(state)


# -- model.kwargs ----------------------------------------------------------------------------------------------------------

FACTORIES = '''
import torch
from torch import nn

def make_net(num_classes=10, width=4, depth=1):
    layers = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

def create_model(model_name, pretrained=False, **kwargs):  # timm's signature
    assert model_name == "tiny"
    return make_net(**kwargs)

def buggy(num_classes=10):
    return len(3)
'''


@pytest.fixture
def factories(tmp_path, monkeypatch):
    import sys

    (tmp_path / "userfactories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("userfactories", None)


def test_model_kwargs_reach_the_factory_and_are_recorded_for_resume_and_eval(factories, capsys):
    from clat.cli.main import main

    run = factories / "run"
    tiny = ["data.dataset=bundled", "data.train_size=80", "data.val_size=16", "data.test_size=16", "data.batch_size=32", "attack.steps=1",
            "eval.n_examples=16", "eval.steps=1", "clat.criticality.steps=1", "clat.criticality.batch_size=16", "progress=false"]
    assert main(["-q", "train", "model.name=userfactories:make_net", "model.kwargs.width=6", "model.kwargs.depth=2", *tiny,
                 "pretrain.epochs=1", "finetune.epochs=1", "--run-dir", str(run), "--until-epoch", "1"]) == 0
    assert "  kwargs:\n    width: 6\n    depth: 2\n" in (run / "config.yaml").read_text()
    assert main(["-q", "train", "--resume", str(run)]) == 0  # rebuilt with the same arguments
    weights = read_state_dict(run / "model.safetensors")
    assert weights["0.weight"].shape[0] == 6 and "2.weight" in weights  # width 6, two convolutions
    capsys.readouterr()
    assert main(["-q", "eval", str(run), "--n-examples", "8", "--steps", "1"]) == 0


def test_model_kwargs_from_yaml_merge_with_the_command_line(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  name: userfactories:create_model\n  kwargs:\n    model_name: tiny\n    width: 3\n")
    cfg = load_config(tmp_path / "c.yaml", ["model.kwargs.width=5"])
    assert cfg.model.kwargs == {"model_name": "tiny", "width": 5}


def test_a_factorys_type_error_is_one_line_naming_model_kwargs(factories):
    with pytest.raises(ConfigError) as e:
        create_model("userfactories:create_model", 10)
    msg = str(e.value)
    assert "missing 1 required positional argument: 'model_name'" in msg and "model.kwargs.NAME=VALUE" in msg and "\n" not in msg
    assert isinstance(create_model("userfactories:create_model", 10, kwargs={"model_name": "tiny", "width": 5}), nn.Module)
    with pytest.raises(ConfigError, match=r"unexpected keyword argument 'colour'.*raised at userfactories.py:\d+"):
        create_model("userfactories:create_model", 10, kwargs={"model_name": "tiny", "colour": 1})
    with pytest.raises(ConfigError, match="model resnet18 takes no keyword arguments"):
        create_model("resnet18", 10, kwargs={"depth": 3})


# -- init_reset_head -------------------------------------------------------------------------------------------------------

def _splits(num_classes, n=64):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(n, 3, 32, 32, generator=g) * 255).to(torch.uint8)
    y = torch.arange(n) % num_classes
    return Splits(x, y, x[:16], y[:16], x[:16], y[:16], num_classes, "synthetic")


def test_an_init_with_another_number_of_classes_needs_init_reset_head(tmp_path, caplog):
    ckpt = tmp_path / "ten.safetensors"
    ten = create_model("tiny_cnn", 10)
    save_weights(ckpt, ten, {"model": "tiny_cnn", "num_classes": 10})
    over = FAST + ["pretrain.epochs=1", "finetune.epochs=0", f"init={ckpt}"]
    with pytest.raises(ConfigError) as e:
        train(load_config(None, over), tmp_path / "a", data=_splits(5))
    assert "classifier 'classifier' with 10 outputs, the model 5 classes: set init_reset_head=true" in str(e.value)
    assert not (tmp_path / "a").exists()
    torch.manual_seed(0)
    fresh = create_model("tiny_cnn", 5)
    five = create_model("tiny_cnn", 5)
    five.load_state_dict(fresh.state_dict())
    with caplog.at_level(logging.INFO, logger="clat"):
        load_init(five, ckpt, 5, reset_head=True)
    assert "loaded all but the classifier 'classifier' (there 10 classes), which starts freshly initialised for 5 classes" in caplog.text
    for k, v in five.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k] if k.startswith("classifier.") else ten.state_dict()[k]), k
    assert train(load_config(None, over + ["init_reset_head=true"]), tmp_path / "b", data=_splits(5))["finished"]


def test_init_reset_head_refuses_what_is_not_the_head(tmp_path):
    ckpt = tmp_path / "other.safetensors"
    save_weights(ckpt, create_model("small_cnn", 10), {"model": "small_cnn", "num_classes": 10})
    with pytest.raises(clat.CheckpointError, match="does not fit this model"):
        load_init(create_model("tiny_cnn", 5), ckpt, 5, reset_head=True)
    with pytest.raises(ConfigError, match="no nn.Linear with 7 outputs"):
        load_init(create_model("tiny_cnn", 5), ckpt, 7, reset_head=True)
    with pytest.raises(clat.CheckpointError, match="does not fit this model"):  # same classes, another model: not a classifier problem
        load_init(create_model("tiny_cnn", 10), ckpt, 10)


# -- callbacks that act on the run ------------------------------------------------------------------------------------------

class Stopper(clat.Callback):
    def __init__(self, at_epoch=None, at_step=None):
        self.at_epoch, self.at_step, self.steps, self.seen = at_epoch, at_step, [], []

    def on_train_start(self, info):
        self.seen.append((self.run.model, self.run.optimizer))

    def on_batch_end(self, batch):
        assert isinstance(self.run.optimizer, torch.optim.Optimizer) and self.run.model is not None
        assert set(batch) == {"epoch", "stage", "step", "batch", "metrics"} and math.isfinite(batch["metrics"]["loss"].item())
        self.steps.append(batch["step"])
        if batch["step"] == self.at_step:
            self.run.stop("step budget", now=True)

    def on_epoch_end(self, row):
        if row["epoch"] == self.at_epoch:
            self.run.stop("enough")


@pytest.mark.parametrize("stopper, epochs_done", [(Stopper(at_epoch=2), 2), (Stopper(at_step=5), 2)])
def test_a_callback_stops_the_run_cleanly_and_resume_finishes_it_exactly(tmp_path, stopper, epochs_done, caplog):
    over = FAST + ["pretrain.epochs=2", "finetune.epochs=2", "clat.reselect_every=1", DET]
    torch.manual_seed(0)
    train(load_config(None, over), tmp_path / "a", data=tiny_splits(), model=create_model("tiny_cnn"))
    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    with caplog.at_level(logging.WARNING, logger="clat"):
        out = train(load_config(None, over), tmp_path / "b", data=tiny_splits(), model=model, callbacks=[stopper])
    assert out["finished"] is False and out["epochs_done"] == epochs_done and out["stopped_by"].startswith("callback: ")
    assert "a callback stopped the run after epoch 2 of 4" in caplog.text
    assert stopper.seen == [(model, None)] and stopper.steps == list(range(1, len(stopper.steps) + 1))
    assert len(_rows(tmp_path / "b")) == epochs_done and not (tmp_path / "b" / "summary.json").exists()
    assert train(None, tmp_path / "b", resume=True, data=tiny_splits(), model=create_model("tiny_cnn"))["finished"]
    a, b = read_state_dict(tmp_path / "a" / "model.safetensors"), read_state_dict(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_callback_sees_the_live_optimizer_and_the_ema(tmp_path):
    class Peek(clat.Callback):
        def on_epoch_end(self, row):
            run = self.run
            self.seen = (run.optimizer, run.ema_model is not run.model and type(run.ema_model) is type(run.model), run.stage, run.epoch,
                         run.step)

    peek = Peek()
    over = FAST + ["pretrain.epochs=1", "finetune.epochs=0", "pretrain.optimizer=adamw", "pretrain.ema_decay=0.9", "pretrain.lr=1e-3"]
    train(load_config(None, over), tmp_path / "run", data=tiny_splits(), callbacks=[peek])
    assert type(peek.seen[0]) is torch.optim.AdamW and peek.seen[1:] == (True, "pretrain", 1, 2)


def test_a_duck_typed_callback_without_set_run_still_works(tmp_path):
    class Rows:
        def __init__(self):
            self.n = 0

        def on_epoch_end(self, row):
            self.n += 1

    rows = Rows()
    train(load_config(None, FAST + ["pretrain.epochs=1", "finetune.epochs=0"]), tmp_path / "run", data=tiny_splits(), callbacks=[rows])
    assert rows.n == 1


def test_own_loop_names_are_exported_from_clat():
    for name in ("EpochContext", "set_bn_train_mode", "create_method", "find_layers", "load_config", "LiveRun", "Stage", "Callback"):
        assert name in clat.__all__ and getattr(clat, name) is not None


@pytest.mark.parametrize("as_", ["pair", "dataset", "loader"])
def test_epoch_context_of_samples_the_training_data_reproducibly(as_):
    from torch.utils.data import DataLoader, TensorDataset

    x, y = (torch.rand(20, 3, 8, 8) * 255).to(torch.uint8), torch.arange(20)
    data = {"pair": (x, y), "dataset": TensorDataset(x, y), "loader": DataLoader(TensorDataset(x, y), batch_size=4)}[as_]
    a, b = EpochContext.of(3, data, seed=1), EpochContext.of(3, data, seed=1)
    xa, ya = a.sample_batch(5)
    xb, yb = b.sample_batch(5)
    assert xa.dtype == torch.float32 and xa.max() <= 1 and torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(xa, x[ya].float() / 255)
    assert not torch.equal(EpochContext.of(4, data, seed=1).sample_batch(5)[1], ya)
    assert a.stage_epoch == 3 and EpochContext.of(3, data, stage_epoch=0).stage_epoch == 0


def test_a_new_learning_rate_on_resume_continues_the_warmup_schedule():
    """``clat train --resume RUN finetune.lr=...`` (the divergence remedy) inside or after a warmup: the same schedule from the new base."""
    def stage():
        return Stage(nn.Sequential(nn.Linear(2, 2)), create_method("standard", load_config()), lr=0.1, total_steps=10, schedule="cosine",
                     warmup_steps=4)

    f = warmup_lambda(4, 10, "cosine")
    for at in (2, 6):
        a = stage()
        for _ in range(at):
            a.optimizer.step()
            a.scheduler.step()
        b = stage()
        b.load_state_dict(a.state_dict(), new_lr=0.05)
        lrs = []
        for _ in range(at, 10):
            lrs.append(b.lr)
            b.optimizer.step()
            b.scheduler.step()
        assert lrs == pytest.approx([0.05 * f(t) for t in range(at, 10)], rel=1e-9)


@pytest.mark.parametrize("name", list_methods())
def test_every_method_trains_with_adamw_ema_smoothing_and_clipping(tmp_path, name):
    if name == "lora":
        pytest.importorskip("peft")
    from clat.runs.loading import load_model

    over = FAST + ["pretrain.epochs=1", "finetune.epochs=2", f"finetune.method={name}", "finetune.optimizer=adamw", "finetune.lr=1e-3",
                   "finetune.ema_decay=0.9", "finetune.label_smoothing=0.1", "finetune.grad_clip=1.0", "finetune.warmup_epochs=1",
                   "rift.batch_size=16", "rift.steps=1", "early_stop.patience=1"]
    out = train(load_config(None, over), tmp_path / "run", data=tiny_splits())
    assert out["finished"]
    for weights in ("model.safetensors", "best/model.safetensors"):  # plain weights (LoRA merged) of the average
        model, _ = load_model(tmp_path / "run" / weights)
        assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())


# -- an EMA stage killed for real (SIGKILL) and resumed: the same weights, the same best epoch -----------------------------

@pytest.mark.slow
def test_an_adamw_warmup_ema_run_killed_inside_its_stage_resumes_exactly(tmp_path):
    """``clat train`` with AdamW + warmup + EMA + smoothing + clipping, SIGKILLed while the second fine-tuning epoch's checkpoint
    is written (its weights on disk, its state not): the resume starts from the first fine-tuning epoch's checkpoint, inside the
    EMA stage, and ends with the final and best weights of an uninterrupted run, byte for byte."""
    import signal

    from tests.test_kill_resume import OVERRIDES, _run

    over = [*OVERRIDES, "pretrain.epochs=1", "finetune.epochs=3", "data.train_size=200", "eval.n_examples=30", *RECIPE]
    rc, err = _run(["train", *over, "--run-dir", str(tmp_path / "ref")])
    assert rc == 0, err
    run = tmp_path / "killed"
    rc, err = _run(["train", *over, "--run-dir", str(run)], "checkpoint", 3)
    assert rc == -signal.SIGKILL, err
    assert [r["epoch"] for r in _rows(run)] == [1, 2, 3]  # epoch 3's row is written, its checkpoint is not complete
    rc, err = _run(["train", "--resume", str(run)])
    assert rc == 0, err
    assert "epoch_0003 is incomplete or corrupted" in err  # so the resume starts after epoch_0002: the first fine-tuning epoch
    for f in ("model.safetensors", "best/model.safetensors"):
        assert (run / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f
    assert "ema" in load_state(Checkpoints(run).dir(epoch=4) / "state.pt")


# -- docs/recipes.md ---------------------------------------------------------------------------------------------------------

RECIPES_DOC = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"


def _doc_blocks() -> list[tuple[str, str, str]]:
    """(mark, language, code) of each block of docs/recipes.md; mark: 'slow' where the line before says
    ``<!-- doc-test: slow REASON -->``, else 'run'."""
    found = re.findall(r"^(?:<!-- doc-test: (\w+) .+? -->\n)?```(\w+)\n(.*?)^```", RECIPES_DOC.read_text(), flags=re.S | re.M)
    return [(mark or "run", lang, code) for mark, lang, code in found]


def test_the_recipes_docs_commands_name_valid_keys():
    """Every ``clat train`` of docs/recipes.md (and the Python block's overrides) is a valid config, checked in a moment."""
    import shlex

    checked = 0
    for _, lang, code in _doc_blocks():
        if lang == "bash":
            for line in code.replace("\\\n", " ").splitlines():
                if line.startswith("clat train "):
                    args = [a for a in shlex.split(line, comments=True)[2:]]
                    args = [a for i, a in enumerate(args) if not a.startswith("--") and not (i and args[i - 1] == "--run-dir")]
                    load_config(args[0], args[1:])
                    checked += 1
        elif "clat.load_config(" in code:
            name, overrides = re.search(r'clat\.load_config\("([^"]+)", (\[.*?\])\)', code).groups()
            load_config(name, ast.literal_eval(overrides))
            checked += 1
    assert checked == 3


DOC_DRIVER = r'''
import json, subprocess, sys
ns = {"__name__": "__main__"}
for lang, code in json.load(open(sys.argv[1])):
    first = code.split("\n", 1)[0]
    if lang == "bash":
        subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], check=True)
    elif first.startswith("# ") and first.split()[1].rstrip(",").endswith(".py"):  # a file the reader saves
        open(first.split()[1].rstrip(","), "w").write(code)
    else:
        exec(compile(code, "docs/recipes.md", "exec"), ns)
'''


@pytest.mark.slow
@pytest.mark.docs  # minutes of training, as tests/test_readme.py's slow blocks: `make test-docs` runs it, CI leaves it out
def test_the_recipes_docs_blocks_run_as_written(tmp_path):
    """Every block of docs/recipes.md, in order, in a fresh folder and process, as a reader runs them (slow: they train)."""
    import os
    import subprocess
    import sys

    blocks = [(lang, code) for _, lang, code in _doc_blocks()]
    assert [lang for lang, _ in blocks] == ["bash", "python", "bash", "python"]
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    (tmp_path / "driver.py").write_text(DOC_DRIVER)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "driver.py", "blocks.json"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "loaded all but the classifier 'classifier.6' (there 100 classes)" in r.stderr + r.stdout
    for run in ("recipe", "wide", "reset_head"):
        assert (tmp_path / "runs" / run / "model.safetensors").is_file(), run
    assert "  kwargs:\n    width: 32\n    depth: 3\n" in (tmp_path / "runs" / "wide" / "config.yaml").read_text()
