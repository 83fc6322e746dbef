import math

import pytest
import torch
import torch.nn.functional as F

from clat.config.schema import Config
from clat.config.load import load_config
from clat.layers.discovery import find_layers
from clat.methods import EpochContext, create_method, list_methods
from clat.models import create_model
from clat.training.stage import Stage
from clat.training.loop import train as clat_train

VARIANTS = [(m, []) for m in list_methods()] + [
    ("clat", ["clat.ce_on=adv"]),
    ("clat", ["clat.ce_on=base", "pretrain.method=pgd_at"]),
    ("clat", ["clat.inner=fast"]),
    ("clat", ["clat.selection=random", "clat.k=2"]),
    ("clat", ["clat.lam_mode=auto"]),
    ("clat", ["clat.layers=[1, features.3.0]"]),
    ("clat", ["clat.distance_scaling=n", "clat.criticality.denominator=previous"]),
]


def _ctx(x, y, epoch=0):
    return EpochContext(epoch, epoch, lambda n: (x[:n], y[:n]), torch.Generator().manual_seed(epoch))


def _setup(name, overrides):
    cfg = load_config(None,
                      ["attack.steps=2", "clat.criticality.steps=2", "clat.criticality.batch_size=8", "rift.batch_size=8",
                       "rift.steps=1"] + overrides)
    model = create_model("tiny_cnn")
    layers = find_layers(model)
    method = create_method(name, cfg, layers, default_k=1)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    Stage(model, method, lr=0.01).begin_epoch(_ctx(x, y))  # the loop's own set-up: setup, epoch hook, BN modes
    return cfg, model, method, x, y


@pytest.mark.parametrize("name,overrides", VARIANTS, ids=[f"{n}{'-' + '-'.join(o) if o else ''}" for n, o in VARIANTS])
def test_method_loss_is_finite_and_grads_only_on_trained_params(name, overrides):
    cfg, model, method, x, y = _setup(name, overrides)
    loss, metrics = method.loss(model, x, y)
    assert loss.dim() == 0 and math.isfinite(loss.item())
    assert all(math.isfinite(v.item()) for v in metrics.values())
    loss.backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad <= trained and with_grad
    if name == "lora":
        assert trained and all("lora_" in n for n in trained)
    elif hasattr(method, "selected"):  # CLAT, RiFT: only the selected layers train
        expected = {f"{m}.{s}" for l in method.selected for m in l.module_names for s in ("weight", "bias")}
        assert trained == {n for n, _ in model.named_parameters() if n in expected}
        if cfg.clat.layers:
            assert [l.index for l in method.selected] == [1, 3]
    else:
        assert trained == {n for n, _ in model.named_parameters()}


def test_clat_step_changes_only_selected_layers():
    cfg, model, method, x, y = _setup("clat", ["clat.k=1"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters()], lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):
        loss, _ = method.loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sel = method.selected[0]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    own = {k for k in before if k.rsplit(".", 1)[0] in sel.module_names}
    assert changed and changed <= own, (changed, own)
    # the selected BN's running statistics do update (they belong to a trained layer)
    assert f"{sel.bn_name}.running_mean" in changed
    assert all(st == {} or p.requires_grad for p, st in opt.state.items())


def test_clat_frozen_bn_stats_option():
    cfg, model, method, x, y = _setup("clat", ["clat.freeze_bn_stats=true"])
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    loss, _ = method.loss(model, x, y)
    loss.backward()
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v)


def test_clat_feature_attack_runs_only_up_to_deepest_layer():
    cfg, model, method, x, y = _setup("clat", ["clat.layers=[1]"])
    calls = []
    h = model.classifier.register_forward_hook(lambda *a: calls.append(1))
    method.attack_features(model, x, {k: v.detach() for k, v in method.extractor(model)(x).outputs.items()})
    h.remove()
    assert calls == []


def _graph_first_loss(method, model, x, y):
    """CLAT's objective computed in the order of clat <= 0.2.0: the clean graph built first and kept alive while the
    feature attack runs (the memory reference for CLAT.loss, which attacks first)."""
    from clat.attacks.threat import feature_distance
    from clat.layers.freezing import frozen_bn_statistics

    ext, ce_on = method.extractor(model), method.cfg.ce_on
    clean = ext(x, stop_early=ce_on != "clean")
    x_adv = method.attack_features(model, x, {n: f.detach() for n, f in clean.outputs.items()})
    with frozen_bn_statistics(model):
        adv = ext(x_adv, stop_early=ce_on != "adv")
    ce = F.cross_entropy((clean if ce_on == "clean" else adv).logits, y)
    return ce + method.lam * feature_distance(adv.outputs, clean.outputs, method._scale).mean()


def _clat_backward(model_name, cfg, x, y, loss_of):
    """A fresh seeded model, CLAT's selection, ``loss_of(method, model)`` and its backward:
    (loss, gradients, state_dict, model)."""
    torch.manual_seed(1)
    model = create_model(model_name)
    method = create_method("clat", cfg, find_layers(model), default_k=1)
    Stage(model, method, lr=0.01).begin_epoch(_ctx(x, y))
    torch.manual_seed(2)
    loss = loss_of(method, model)
    loss.backward()
    return (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
            {k: v.clone() for k, v in model.state_dict().items()}, model)


def _assert_bit_identical(a, b):
    (l0, g0, s0, _), (l1, g1, s1, _) = a, b
    assert torch.equal(l0, l1) and g0.keys() == g1.keys() and g0
    assert all(torch.equal(g0[k], g1[k]) for k in g0)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)


@pytest.mark.parametrize("model_name,overrides", [("tiny_cnn", []), ("tiny_cnn", ["clat.ce_on=adv", "clat.k=2"]),
                                                  ("resnet18_w16", ["clat.layers=[layer2.0.conv1, layer3.1.conv2]"]),
                                                  ("resnet18_w16", ["clat.ce_on=adv", "clat.distance_scaling=n"])])
def test_clat_attacks_before_the_update_graph_with_identical_gradients(model_name, overrides):
    """CLAT.loss runs its feature attack before building the update's graph (so no graph is alive during the attack):
    the gradients, the loss and the BN running statistics are bit-identical to the graph-first order."""
    cfg = load_config(None, ["attack.steps=3", "clat.criticality.steps=1", "clat.criticality.batch_size=8", "clat.k=1", *overrides])
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    plain = _clat_backward(model_name, cfg, x, y, lambda method, model: method.loss(model, x, y)[0])
    graph_first = _clat_backward(model_name, cfg, x, y, lambda method, model: _graph_first_loss(method, model, x, y))
    _assert_bit_identical(plain, graph_first)  # running statistics updated once, by the clean batch


@pytest.mark.parametrize("model_name,layer,blocks", [("resnet18", "layer3.0.conv2", ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]),
                                                    ("tiny_cnn", "features.2.0", [])])
def test_clat_recompute_gives_identical_gradients_and_checkpoints_the_blocks_before_the_layer(model_name, layer, blocks):
    """clat.recompute=true (activation checkpointing in the feature attack, for memory): the same loss, gradients
    and BN statistics, bit for bit; the blocks checkpointed are those the attack's forward runs through."""
    from clat.layers.capture import recomputed_blocks

    torch.manual_seed(0)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    runs = [_clat_backward(model_name, load_config(None, ["attack.steps=2", f"clat.layers=[{layer}]", f"clat.recompute={r}"]), x, y,
                           lambda method, model: method.loss(model, x, y)[0]) for r in ("false", "true")]
    _assert_bit_identical(*runs)
    model = runs[1][3]
    with recomputed_blocks(model, [layer]) as found:
        assert found[: len(blocks)] == blocks and (blocks or not found)  # a chain of Sequentials has no block to recompute
        assert all("forward" in dict(model.named_modules())[b].__dict__ for b in found)
    assert not any("forward" in m.__dict__ for m in model.modules())  # the model is left as it was


def test_clat_reselects_on_schedule_and_not_when_non_dynamic():
    for dynamic, expect in [(True, [0, 10, 20]), (False, [0])]:
        cfg, model, method, x, y = _setup("clat", [f"clat.dynamic={str(dynamic).lower()}"])
        events = [0]
        for e in range(1, 25):
            if method.on_epoch_start(model, _ctx(x, y, e)):
                events.append(e)
        assert events == expect


def test_unknown_method_lists_known():
    from clat.base.errors import ConfigError

    with pytest.raises(ConfigError, match="known methods: standard, pgd_at"):
        create_method("trades++", Config(), [], default_k=1)


def test_k_too_large_is_a_clear_error():
    from clat.base.errors import ConfigError

    with pytest.raises(ConfigError, match="clat.k=9"):
        _setup("clat", ["clat.k=9"])


def test_a_new_baseline_is_one_file(monkeypatch, tmp_path, capsys):
    """Adding a method = one file: its config section, checks, label and registration live with the class.
    Registered here (as a user's file would), it trains, takes overrides, is listed and labelled in reports."""
    from dataclasses import dataclass

    import clat.config.schema as config_mod
    from clat.config.load import dump_yaml
    from clat.cli.main import main
    from clat.base.errors import ConfigError
    from clat.methods import PGDAT, registry
    from clat.analysis.report import run_report

    monkeypatch.setattr(registry.METHODS, "_entries", dict(registry.METHODS._entries))  # forget it after the test
    monkeypatch.setattr(config_mod, "_SECTIONS", dict(config_mod._SECTIONS))

    # ---- the whole of the new file -------------------------------------------------------
    @dataclass
    class HalfConfig:
        weight: float = 0.5  # weight of the clean CE next to the adversarial one

        def check(self, need):
            need(0 <= self.weight <= 1, f"half_at.weight must be in [0, 1], got {self.weight}")

    @registry.register_method("half_at", label="Half-AT", section=HalfConfig, baseline=True)
    class HalfAT(PGDAT):
        """Half-AT: a mix of clean and adversarial cross-entropy (a test's toy baseline)."""

        def __init__(self, attack, weight):  # built from the config: attack section, then half_at's fields as keywords
            super().__init__(attack)
            self.weight = weight

        def objective(self, model, x, x_adv, y):
            loss, metrics = super().objective(model, x, x_adv, y)
            return (1 - self.weight) * loss + self.weight * F.cross_entropy(model(x), y), metrics
    # ----------------------------------------------------------------------------------------

    cfg = load_config(None, ["model.name=tiny_cnn", "data.dataset=bundled", "data.train_size=200", "data.val_size=50", "data.test_size=20",
                             "data.batch_size=50", "attack.steps=1", "eval.n_examples=20", "eval.steps=1", "pretrain.epochs=1",
                             "pretrain.method=half_at", "half_at.weight=0.25", "finetune.epochs=1", "finetune.method=clat",
                             "clat.ce_on=base",
                             "clat.criticality.steps=1", "clat.criticality.batch_size=10", "progress=false"])
    assert cfg.half_at.weight == 0.25 and "half_at:\n  weight: 0.25" in dump_yaml(cfg)
    with pytest.raises(ConfigError, match=r"half_at.weight must be in \[0, 1\]"):
        load_config(None, ["half_at.weight=2"])
    summary = clat_train(cfg, tmp_path / "run")
    assert summary["finished"]
    base = create_method("clat", cfg, find_layers(create_model("tiny_cnn"))).base  # clat.ce_on=base wraps the new baseline
    assert isinstance(base, HalfAT) and base.weight == 0.25
    assert "Half-AT" in run_report(tmp_path / "run").read_text()
    assert main(["methods"]) == 0
    assert "half_at    Half-AT: a mix of clean and adversarial cross-entropy" in capsys.readouterr().out
