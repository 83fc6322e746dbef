"""Which layers CLAT trains: discovery, Eq. 6 and the paths that used to give a wrong answer silently.

One test (or more) per item of the audit "CLAT's layer choice exactly as the paper defines it":
layer provenance from the computation (not memory addresses), Eq. 6 as the default, the threat
model's norm in criticality, names that look like indices, float images, shared tensors,
parameters that belong to no layer, the validation split, composed methods, and the
deviations from the reference implementations (TRADES, MART, CLAT with CE on x+δ*).
"""

import math
import warnings

import pytest
import torch

from clat.attacks.threat import ThreatModel
import torch.nn.functional as F
from torch import nn

from clat.criticality import index as crit_mod
from clat.config.load import load_config
from clat.criticality.index import compute_criticality
from clat.base.errors import ConfigError, DataError
from clat.layers.discovery import find_layers, resolve_layers, unassigned_parameters
from clat.layers.freezing import set_bn_train_mode
from clat.methods import EpochContext, create_method
from clat.models import create_model, list_models
from tests.test_any_model import ANY_MODELS, TVResNet

HEAVY = {"wrn70_16", "wrn34_10", "resnet50", "densenet121"}  # 50 discoveries of these take 10-80 s each on 2 cores


# -- 1. discovery: provenance from the computation -------------------------------------------------
class InplaceChain(nn.Module):
    """In-place activations and an in-place residual sum on a BN output; a concatenation."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        a = F.relu_(self.b1(self.c1(x)))
        b = self.b2(self.c2(a))
        b += a  # in place on b2's output
        b = F.relu(b, inplace=True)
        c = self.c3(torch.cat([a, b], 1))
        return self.fc(c.mean((2, 3)))


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.block(self.block(F.relu(self.stem(x))))  # one module tree run twice
        return self.fc(x.mean((2, 3)))


def top_level_sequential():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )


STRESS = {"inplace_and_concat": InplaceChain, "called_twice": CalledTwice, "top_level_sequential": top_level_sequential,
          **{k: v[0] for k, v in ANY_MODELS.items()}}


def _repeat_discovery(model, n=50):
    x = torch.rand(2, 3, 32, 32)
    first = find_layers(model, x)
    for _ in range(n - 1):
        # fresh temporaries between calls: the old address-based check reused freed memory here
        junk = [torch.empty(2, 8, 32, 32) for _ in range(3)]
        assert find_layers(model, x) == first
        del junk
    return first


@pytest.mark.parametrize("name", [n for n in list_models() if n not in HEAVY])
def test_discovery_identical_over_50_calls_on_the_zoo(name):
    layers = _repeat_discovery(create_model(name).eval())
    assert [l.reads_model_input for l in layers] == [True] + [False] * (len(layers) - 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HEAVY))
def test_discovery_identical_over_20_calls_on_large_models(name):
    # one discovery costs about one forward pass of 2 images (~2 s on wrn70_16 here): 20 calls, the zoo above gets 50
    layers = _repeat_discovery(create_model(name).eval(), n=20)
    assert [l.reads_model_input for l in layers] == [True] + [False] * (len(layers) - 1)


@pytest.mark.parametrize("kind", list(STRESS))
def test_discovery_identical_over_50_calls_on_stress_models(kind):
    torch.manual_seed(0)
    layers = _repeat_discovery(STRESS[kind]().eval())
    assert layers[0].reads_model_input and not any(l.reads_model_input for l in layers[1:])


def test_no_layer_of_the_study_model_reads_the_model_input_but_the_stem():
    """The audit's reproduction: 30 discoveries as the loop makes them flagged layer3.0.conv2 five times."""
    model = create_model("resnet18_w16").eval()
    for _ in range(30):
        flagged = [l.name for l in find_layers(model, torch.rand(2, 3, 32, 32)) if l.reads_model_input]
        assert flagged == ["conv1"]


def test_sources_of_a_resnet_block_follow_the_dataflow():
    layers = {l.name: l for l in find_layers(create_model("resnet18_w16"))}
    # conv2 reads relu(bn1(conv1(x))): its source is conv1's feature (Eq. 6 on the chain)
    assert layers["layer2.0.conv2"].source().kind == "layer"
    assert layers["layer2.0.conv2"].source().layer == layers["layer2.0.conv1"].index
    # a block's first conv and its shortcut read relu(residual sum): both measured on that sum
    a, b = layers["layer2.0.conv1"].source(), layers["layer2.0.shortcut.0"].source()
    assert a.kind == b.kind == "tensor" and a == b and "layer1.1" in a.tap.where
    assert layers["conv1"].source().kind == "model_input"


def test_sources_through_inplace_ops_and_concatenation():
    layers = {l.name: l for l in find_layers(InplaceChain())}
    assert layers["c2"].source().kind == "layer" and layers["c2"].source().layer == 0
    src = layers["c3"].source()
    assert src.kind == "tensor" and src.tap.func == "cat" and src.tap.shape == (16, 32, 32)
    assert layers["c1"].inplace_after and layers["c2"].inplace_after


# -- 2. Eq. 6 is the default ----------------------------------------------------------------------
class ConvBnReluChain(nn.Module):
    def __init__(self, n=4):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1) for i in range(n))
        self.bns = nn.ModuleList(nn.BatchNorm2d(8) for _ in range(n))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        for c, b in zip(self.convs, self.bns):
            x = F.max_pool2d(F.relu(b(c(x))), 2) if c is self.convs[1] else F.relu(b(c(x)))
        return self.fc(x.mean((2, 3)))


def _trained_like(model):
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so BN is not the identity
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


@pytest.mark.parametrize("scaling", ["n", "sqrt_n", "none"])
def test_default_is_eq6_exactly_on_a_conv_bn_relu_chain(scaling):
    model = _trained_like(ConvBnReluChain())
    layers = find_layers(model)
    x, y = torch.rand(12, 3, 32, 32), torch.randint(0, 10, (12,))
    res = compute_criticality(model, layers, x, y, ThreatModel(steps=3), scaling=scaling, include_classifier=True)
    assert res.settings["denominator"] == "upstream"
    assert res.criticality[0] == res.weakness[0]  # C_0 = W_0
    for i in range(1, len(layers)):
        assert res.criticality[i] == res.weakness[i] / res.weakness[i - 1]  # bit for bit
    # the post-activation input (the earlier default) is a different number on this chain
    old = compute_criticality(model, layers, x, y, ThreatModel(steps=3), x_adv=None, scaling=scaling, denominator="input",
                              include_classifier=True)
    assert any(abs(o / n - 1) > 0.05 for o, n in zip(old.criticality[1:], res.criticality[1:]))


class TinyResidual(nn.Module):
    """A residual block whose pre-activation sum is kept for the test to measure."""

    def __init__(self):
        super().__init__()
        self.stem, self.b0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.short, self.bs = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)
        self.sums = []

    def forward(self, x):
        x = F.relu(self.b0(self.stem(x)))
        s = self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.bs(self.short(x))
        self.sums.append(s.detach().clone())
        return self.fc(self.head(F.relu(s)).mean((2, 3)))


def test_residual_denominator_is_the_weakness_of_the_residual_sum():
    model = _trained_like(TinyResidual())
    layers = find_layers(model)
    names = [l.name for l in layers]
    x, y = torch.rand(10, 3, 32, 32), torch.randint(0, 10, (10,))
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    model.sums.clear()
    res = compute_criticality(model, layers, x, y, x_adv=x_adv)
    # compute_criticality's passes: clean then adversarial, for each part of the batch it measures at once
    clean_sum, adv_sum = torch.cat(model.sums[0::2]), torch.cat(model.sums[1::2])
    assert len(clean_sum) == len(adv_sum) == len(x)
    w_sum = (adv_sum - clean_sum).flatten(1).norm(dim=1).mean().item() / clean_sum[0].numel()
    h = names.index("head")
    assert res.input_weakness[h] == pytest.approx(w_sum, rel=1e-6)
    assert res.criticality[h] == pytest.approx(res.weakness[h] / w_sum, rel=1e-6)
    # the shortcut and the block's first conv read the same tensor: same denominator, W of the stem
    c1, sh = names.index("c1"), names.index("short")
    assert res.input_weakness[c1] == res.input_weakness[sh] == res.weakness[0]


def test_previous_and_input_remain_as_named_ablations():
    model = _trained_like(TinyResidual())
    layers = find_layers(model)
    x, y = torch.rand(6, 3, 32, 32), torch.randint(0, 10, (6,))
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    prev = compute_criticality(model, layers, x, y, x_adv=x_adv, denominator="previous")
    assert all(prev.criticality[i] == prev.weakness[i] / prev.weakness[i - 1] for i in range(1, len(layers)))
    inp = compute_criticality(model, layers, x, y, x_adv=x_adv, denominator="input")
    assert inp.settings["denominator"] == "input" and inp.criticality[0] == inp.weakness[0]
    with pytest.raises(ConfigError, match="upstream, previous, input"):
        compute_criticality(model, layers, x, y, x_adv=x_adv, denominator="sideways")


# -- 3. the threat model reaches criticality whole --------------------------------------------------
def test_criticality_attacks_with_the_runs_norm(monkeypatch):
    seen = []
    real = crit_mod.pgd
    monkeypatch.setattr(crit_mod, "pgd", lambda *a, **k: (seen.append(a[3]), real(*a, **k))[1])
    model = create_model("tiny_cnn")
    layers = find_layers(model)
    cfg = load_config(None,
                      ["attack.norm=l2", "attack.eps=0.5", "attack.alpha=0.1", "clat.criticality.steps=2", "clat.criticality.batch_size=4"])
    method = create_method("clat", cfg, layers, default_k=1)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    method.on_epoch_start(model, EpochContext(0, 0, lambda n: (x[:n], y[:n]), torch.Generator().manual_seed(0)))
    assert seen == [ThreatModel("l2", eps=0.5, alpha=0.1, steps=2)]
    assert method.history[0]["denominator"] == "upstream"


# -- 4. names are names, integers are indices -------------------------------------------------------
def test_top_level_sequential_layer_named_3_is_that_layer():
    torch.manual_seed(0)
    model = top_level_sequential()
    layers = find_layers(model)
    assert [l.name for l in layers] == ["0", "3", "6", "11"]
    assert resolve_layers(layers, ["3"]) == [layers[1]]  # the layer *named* "3"
    assert resolve_layers(layers, [3]) == [layers[3]]  # index 3
    # CLAT pinned by name trains that layer, through a config (YAML keeps '3' a string, 3 an int)
    cfg = load_config(None, ["clat.layers=['3']", "clat.criticality.steps=1", "clat.criticality.batch_size=4", "attack.steps=1"])
    assert cfg.clat.layers == ["3"] and load_config(None, ["clat.layers=[1]"]).clat.layers == [1]
    method = create_method("clat", cfg, layers, default_k=1)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    method.on_epoch_start(model, EpochContext(0, 0, lambda n: (x[:n], y[:n]), torch.Generator().manual_seed(0)))
    assert [l.name for l in method.selected] == ["3"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"3.weight", "3.bias", "4.weight", "4.bias"}


def test_selection_by_criticality_resolves_names_exactly_on_a_top_level_sequential():
    """Criticality picks a layer; CLAT must train the layer it picked (the bug trained layer '9' for '3')."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for i in range(5) for m in (nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), nn.ReLU())],
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    layers = find_layers(model)
    cfg = load_config(None, ["clat.criticality.steps=1", "clat.criticality.batch_size=4", "attack.steps=1"])
    method = create_method("clat", cfg, layers, default_k=1)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    ev = method.on_epoch_start(model, EpochContext(0, 0, lambda n: (x[:n], y[:n]), torch.Generator().manual_seed(0)))
    picked = max(range(len(layers) - 1), key=lambda i: ev["selection"].criticality[i])
    assert [l.index for l in method.selected] == [picked]
    method.load_state_dict(method.state_dict())  # resume resolves the saved names the same way
    assert [l.index for l in method.selected] == [picked]


# -- 5. float images -----------------------------------------------------------------------------
def _float_splits(scale=1.0):
    from clat.data.loader import Splits

    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 32, 32, generator=g) * scale
    y = torch.randint(0, 10, (64,), generator=g)
    return Splits(x[:48], y[:48], x[48:56], y[48:56], x[56:], y[56:], 10, "float images")


def test_float_images_reach_criticality_unscaled(tmp_path, monkeypatch):
    from clat.training.loop import train

    seen = []
    monkeypatch.setattr(crit_mod, "pgd", lambda model, x, y, *a, **k: (seen.append(x.max().item()), x)[1])
    cfg = load_config(None, ["pretrain.epochs=0", "finetune.epochs=1", "attack.steps=1", "clat.criticality.batch_size=8",
                             "clat.criticality.steps=1", "data.batch_size=16", "eval.n_examples=0", "progress=false"])
    train(cfg, tmp_path / "run", model=create_model("tiny_cnn"), data=_float_splits())
    assert seen and seen[0] > 0.5  # [0, 1] images, not divided by 255 a second time


def test_float_images_outside_0_1_are_refused():
    with pytest.raises(DataError, match=r"must lie in \[0, 1\].*divide them by 255"):
        _float_splits(scale=255.0)


# -- 6. shared tensors save and load ----------------------------------------------------------------
class SharedModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.alias = self.block  # one module under two attribute names
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(F.relu(self.alias(F.relu(self.block(F.relu(self.stem(x)))))).mean((2, 3)))


def test_a_module_under_two_names_trains_saves_and_resumes(tmp_path, bundled_splits):
    from clat.runs.checkpoint import read_state_dict
    from clat.training.loop import train

    cfg = load_config(None, ["pretrain.epochs=1", "finetune.epochs=1", "attack.steps=1", "clat.criticality.batch_size=8",
                             "clat.criticality.steps=1", "data.batch_size=32", "eval.n_examples=16", "progress=false"])
    model = SharedModule()
    train(cfg, tmp_path / "run", model=model, data=bundled_splits, until_epoch=1)
    summary = train(None, tmp_path / "run", resume=True, model=SharedModule(), data=bundled_splits)
    assert summary["finished"]
    state = read_state_dict(tmp_path / "run" / "model.safetensors")
    assert torch.equal(state["alias.weight"], state["block.weight"])
    fresh = SharedModule()
    fresh.load_state_dict(state)
    assert fresh.alias is fresh.block


# -- 7. parameters that belong to no layer ------------------------------------------------------------
class TinyViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 8, 8)
        self.norm1 = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        h = self.norm1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        t = t + self.mlp(self.norm2(t))
        return self.head(t.mean(1))


class ConvGN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.g1 = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.c2, self.g2 = nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(F.relu(self.g2(self.c2(F.relu(self.g1(self.c1(x)))))).mean((2, 3)))


def test_clat_warns_once_listing_parameters_in_no_layer():
    model = TinyViT()
    layers = find_layers(model)
    rest = unassigned_parameters(model, layers)
    # attn.in_proj_weight is a raw parameter; attn.out_proj is a Linear whose forward never runs (F.multi_head_attention_forward)
    assert set(rest) == {"norm1", "norm2", "attn", "attn.out_proj"}
    cfg = load_config(None, ["clat.k=1"])
    method = create_method("clat", cfg, layers, default_k=1)
    with pytest.warns(UserWarning, match=r"clat: .* parameters belong to no selectable layer .*norm1 \(32\).*attn"):
        method.setup(model)


def test_merge_norms_makes_groupnorm_part_of_its_conv():
    model = ConvGN()
    plain = find_layers(model)
    assert [l.bn_name for l in plain] == [None, None, None] and set(unassigned_parameters(model, plain)) == {"g1", "g2"}
    with pytest.warns(UserWarning, match="model.merge_norms=true"):
        create_method("clat", load_config(), plain, default_k=1).setup(model)
    merged = find_layers(model, merge_norms=True)
    assert [l.bn_name for l in merged] == ["g1", "g2", None] and unassigned_parameters(model, merged) == {}
    assert merged[1].source().kind == "layer" and merged[1].source().layer == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_method("clat", load_config(), merged, default_k=1).setup(model)


def test_merge_norms_from_the_config(tmp_path, bundled_splits):
    from clat.training.loop import train

    cfg = load_config(None, ["model.merge_norms=true", "pretrain.epochs=0", "finetune.epochs=1", "attack.steps=1",
                             "clat.criticality.batch_size=8", "clat.criticality.steps=1", "data.batch_size=32",
                             "eval.n_examples=0", "progress=false"])
    s = train(cfg, tmp_path / "run", model=ConvGN(), data=bundled_splits)
    assert s["selection_history"][0]["trainable_params"] in (3 * 8 * 9 + 8 + 16, 8 * 8 * 9 + 8 + 16)


# -- 8. the validation split does not depend on the training seed -------------------------------------
def test_validation_split_is_the_same_for_every_seed(shared_cifar):
    from clat.data.prepare import prepare_data

    base = ["data.dataset=cifar10", f"data.root={shared_cifar}", "data.verify=false", "data.train_size=600", "data.val_size=100"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = prepare_data(load_config(None, [*base, "seed=0"]))
        b = prepare_data(load_config(None, [*base, "seed=1"]))
        assert torch.equal(a.x_val, b.x_val) and torch.equal(a.x_train, b.x_train)
    with pytest.warns(UserWarning, match="split_seed is null"):
        c = prepare_data(load_config(None, [*base, "seed=1", "data.split_seed=null"]))
    assert not torch.equal(a.x_val, c.x_val)  # the old behaviour, kept for resuming old runs, warns


# -- 9. composed methods -------------------------------------------------------------------------
def _epoch(method, model, stage_epoch, x, y):
    ev = method.on_epoch_start(model, EpochContext(stage_epoch, stage_epoch, lambda n: (x[:n], y[:n]), torch.Generator().manual_seed(0)))
    set_bn_train_mode(model, method.trainable_bns())
    return ev


def test_clat_over_awp_runs_and_forwards_the_warmup():
    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    layers = find_layers(model)
    cfg = load_config(None, ["clat.ce_on=base", "clat.base=awp", "awp.warmup=1", "attack.steps=1", "clat.criticality.steps=1",
                             "clat.criticality.batch_size=8"])
    method = create_method("clat", cfg, layers, default_k=1)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for stage_epoch, active in ((0, False), (1, True)):
        _epoch(method, model, stage_epoch, x, y)
        assert method.base._active is active
        assert {n for n,
                p in model.named_parameters() if p.requires_grad} <= {f"{m}.{w}" for l in method.selected for m in l.module_names
                                                                      for w in ("weight", "bias")}
        before = {k: v.clone() for k, v in model.state_dict().items()}
        loss, m = method.loss(model, x, y)  # used to fail: AWP perturbed weights the feature graph held
        opt.zero_grad(set_to_none=True)
        loss.backward()
        method.after_backward(model)
        # AWP restored the weights exactly before the step
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k)
        opt.step()
        assert math.isfinite(loss.item()) and "base_loss" in m


def test_lora_layers_are_anchored_names():
    pytest.importorskip("peft")
    model = TVResNet()
    layers = find_layers(model)
    method = create_method("lora", load_config(None, ["lora.layers=[conv1]"]), layers)
    method.setup(model)
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in model.named_parameters() if "lora_" in n}
    assert adapted == {"conv1"}  # not layer1.0.conv1 / layer2.0.conv1 as well


def test_clat_methods_describes_each_method_by_its_own_docstring(capsys):
    from clat.cli.main import main

    assert main(["methods"]) == 0
    out = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "RiFT" in out["rift"] and "LoRA" in out["lora"] and "CLAT" in out["clat"]


# -- 11. reference behaviour of TRADES and MART, one BN update per CLAT step ------------------------
@pytest.mark.parametrize("method_name", ["trades", "mart"])
def test_trades_and_mart_attack_in_eval_mode_like_the_reference(method_name, monkeypatch):
    from clat.attacks.threat import perturb as real_perturb
    from clat.methods import mart as mart_mod
    from clat.methods import trades as trades_mod

    model = create_model("tiny_cnn").train()
    modes, starts = [], []
    model.register_forward_pre_hook(lambda m, a: modes.append(m.training))

    def spy(objective, x, *a, **k):
        starts.append(k.get("delta0"))
        return real_perturb(objective, x, *a, **k)

    monkeypatch.setattr(trades_mod if method_name == "trades" else mart_mod, "perturb", spy)
    method = create_method(method_name, load_config(None, ["attack.steps=2"]))
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    method.adversarial(model, x, y)
    assert modes and not any(modes) and model.training  # every attack forward in eval mode; mode restored
    assert starts[0] is not None and 0.0005 < starts[0].std().item() < 0.002  # x + 0.001·N(0, I)
    legacy = create_method(method_name, load_config(None, ["attack.steps=1", f"{method_name}.attack_mode=train"]))
    modes.clear()
    legacy.adversarial(model, x, y)
    assert all(modes)


def test_clat_with_ce_on_adv_updates_bn_statistics_once_per_step():
    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    layers = find_layers(model)
    cfg = load_config(None,
                      ["clat.ce_on=adv", "clat.layers=[1]", "attack.steps=1", "clat.criticality.steps=1", "clat.criticality.batch_size=8"])
    method = create_method("clat", cfg, layers, default_k=1)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    _epoch(method, model, 0, x, y)
    bn = model.get_submodule(layers[1].bn_name)
    before, mean_before = int(bn.num_batches_tracked), bn.running_mean.clone()
    method.loss(model, x, y)
    assert int(bn.num_batches_tracked) == before + 1
    # the one update is the clean batch's
    with torch.no_grad():
        feats = {}
        h = model.get_submodule(layers[1].name).register_forward_hook(lambda m, a, o: feats.setdefault("pre", o))
        model.eval()
        model(x)
        h.remove()
    expected = (1 - bn.momentum) * mean_before + bn.momentum * feats["pre"].mean((0, 2, 3))
    assert torch.allclose(bn.running_mean, expected, atol=1e-6)


# -- 10. evaluation: the run's threat model, nothing overwritten silently -----------------------------
@pytest.fixture(scope="module")
def l2_run(tmp_path_factory):
    from clat.training.loop import train

    d = tmp_path_factory.mktemp("l2") / "run"
    cfg = load_config(None, ["model.name=tiny_cnn", "data.dataset=bundled", "data.train_size=160", "data.val_size=32", "data.test_size=64",
                             "attack.norm=l2", "attack.eps=0.5", "attack.alpha=0.2", "attack.steps=1", "pretrain.epochs=1",
                             "finetune.epochs=0", "eval.n_examples=16", "data.batch_size=32", "progress=false"])
    train(cfg, d)
    return d


def test_eval_uses_the_runs_threat_model_and_says_so(l2_run, capsys):
    import json

    from clat.cli.main import main

    assert main(["-q", "eval", str(l2_run), "--n-examples", "8", "--steps", "1"]) == 0
    res = json.loads((l2_run / "eval.json").read_text())
    assert res["threat_model"]["norm"] == "l2" and res["threat_model"]["eps"] == 0.5 and res["attack"]["norm"] == "l2"
    assert res["threat_model"]["alpha"] == 0.125  # the evaluation step is eps/4, whatever step training used (0.2)
    assert "the run's training threat model" in res["threat_model"]["source"] and "ℓ2 ε=0.5" in capsys.readouterr().out
    # criticality measures with the run's own step, as CLAT does while training
    assert main(["-q", "criticality", str(l2_run), "--batch-size", "4", "--steps", "1"]) == 0
    crit = json.loads((l2_run / "criticality.json").read_text())["settings"]
    assert (crit["norm"], crit["eps"], crit["alpha"]) == ("l2", 0.5, 0.2)
    # switching the norm needs a radius for it
    assert main(["-q", "eval", str(l2_run), "--norm", "linf", "--n-examples", "8"]) == 2
    assert "give --eps and --alpha" in capsys.readouterr().err


def test_eval_never_replaces_a_result_silently(l2_run, capsys):
    import json

    from clat.cli.main import main

    first = l2_run / "eval.json"
    if not first.exists():
        assert main(["-q", "eval", str(l2_run), "--n-examples", "8", "--steps", "1"]) == 0
    before = first.read_text()
    assert main(["-q", "eval", str(l2_run), "--n-examples", "6", "--steps", "1"]) == 0  # another setting: another file
    second = l2_run / "eval_test_n6_l2-0.5_pgd1x1_s0.json"
    assert first.read_text() == before and json.loads(second.read_text())["n"] == 6
    capsys.readouterr()
    assert main(["-q", "eval", str(l2_run), "--n-examples", "6", "--steps", "1"]) == 2  # the same setting again: refused
    assert "already holds an evaluation" in capsys.readouterr().err
    assert main(["-q", "eval", str(l2_run), "--n-examples", "6", "--steps", "1", "--force"]) == 0
    assert first.read_text() == before  # --force replaced the file of *this* setting, not eval.json
    from clat.analysis.report import read_run

    assert {"eval", "eval_test_n6_l2-0.5_pgd1x1_s0"} <= set(read_run(l2_run)["evals"])


def test_deepest_selection_trains_the_last_eligible_layers():
    """``clat.selection=deepest`` (the layer oracle's best predictor on ResNet-18/4): the k last eligible layers,
    whatever the criticality says (which is still measured and logged)."""
    model = create_model("tiny_cnn")
    layers = find_layers(model)
    cfg = load_config(None, ["clat.selection=deepest", "clat.k=2", "clat.criticality.steps=1", "clat.criticality.batch_size=4"])
    method = create_method("clat", cfg, layers)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    ev = method.on_epoch_start(model, EpochContext(0, 0, lambda n: (x[:n], y[:n]), torch.Generator().manual_seed(0)))
    eligible = [l.name for l, ok in zip(layers, method.eligible) if ok]
    assert [l.name for l in method.selected] == eligible[-2:] and len(ev["selection"].criticality) == len(layers)
    with pytest.raises(ConfigError, match="selection"):
        load_config(None, ["clat.selection=shallowest"])
