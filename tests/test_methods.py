import math

import pytest
import torch

from clat.config import Config, load_config
from clat.layers import find_layers
from clat.methods import CLAT, EpochContext, create_method, list_methods
from clat.models import create_model
from clat.stage import Stage

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
    cfg = load_config(None, ["attack.steps=2", "clat.criticality.steps=2", "clat.criticality.batch_size=8", "rift.batch_size=8", "rift.steps=1"] + overrides)
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


def test_clat_reselects_on_schedule_and_not_when_non_dynamic():
    for dynamic, expect in [(True, [0, 10, 20]), (False, [0])]:
        cfg, model, method, x, y = _setup("clat", [f"clat.dynamic={str(dynamic).lower()}"])
        events = [0]
        for e in range(1, 25):
            if method.on_epoch_start(model, _ctx(x, y, e)):
                events.append(e)
        assert events == expect


def test_unknown_method_lists_known():
    from clat.errors import ConfigError

    with pytest.raises(ConfigError, match="known methods: standard, pgd_at"):
        create_method("trades++", Config(), [], default_k=1)


def test_k_too_large_is_a_clear_error():
    from clat.errors import ConfigError

    with pytest.raises(ConfigError, match="clat.k=9"):
        _setup("clat", ["clat.k=9"])
