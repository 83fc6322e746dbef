"""The model zoo: every registered model builds, has the paper's size, trains, and its layers are found.

Parametrized over ``clat.models.list_models()`` (timm's ``tests/test_models.py`` idea), so a
newly registered model is tested without editing this file — except for its expected layer
count, which is hard-coded below on purpose (a change in layer discovery must show here).
WRN-70-16 (267M parameters) is built on the meta device wherever only shapes and names
matter; its real forward/backward, criticality and CLAT step are one ``slow`` test.
"""

import functools

import pytest
import torch

from clat.attacks.threat import ThreatModel
from clat.config.load import load_config
from clat.criticality.index import compute_criticality
from clat.layers.discovery import BN_TYPES, find_layers, layer_parameter_names
from clat.layers.freezing import set_bn_train_mode
from clat.methods import EpochContext, create_method
from clat.models import create_model, list_models, model_info

MODELS = list_models()
HEAVY = {"wrn70_16"}  # real runs only in the slow test
LIGHT = [m for m in MODELS if m not in HEAVY]

# Table 6 of the paper: total parameters (10 classes); must hold within 2%.
PAPER_PARAMS = {
    "densenet121": 6.96e6,
    "wrn70_16": 267e6,
    "resnet50": 23.7e6,
    "wrn34_10": 46.16e6,
    "resnet18": 11.2e6,
    "vgg19": 39.3e6,
}
# The paper's k (Section 4 / SPEC); preact_resnet18 follows RN18.
PAPER_K = {"densenet121": 5, "wrn70_16": 4, "resnet50": 3, "wrn34_10": 2, "vgg19": 1, "resnet18": 1, "preact_resnet18": 1}

# Measured layer counts (find_layers), with where they come from, and the BatchNorms that belong
# to no layer because no conv output feeds them directly (they read residual sums / concatenations):
#   name: (layers, standalone BNs, first layer (conv, merged BN), last layer)
EXPECTED_LAYERS = {
    # 17 convs (stem + 16 in blocks) + 3 shortcut convs + linear; every BN directly follows a conv
    "resnet18": (21, 0, ("conv1", "bn1"), "linear"),
    "resnet18_w16": (21, 0, ("conv1", "bn1"), "linear"),  # the same network at 1/4 width
    # stem + 16 block convs + 3 shortcut convs + linear. Standalone: the bn1 of 7 blocks
    # (a residual sum) + the final bn; layer1.0.bn1 reads the stem output and is merged with it
    "preact_resnet18": (21, 8, ("conv1", "layer1.0.bn1"), "linear"),
    # stem + 16 bottlenecks x 3 convs + 4 shortcut convs + linear
    "resnet50": (54, 0, ("conv1", "bn1"), "linear"),
    # stem + 15 blocks x 2 convs + 3 shortcut convs + fc. Standalone: 14 block bn1 + final bn1
    "wrn34_10": (35, 15, ("conv1", "block1.layer.0.bn1"), "fc"),
    # stem + 33 blocks x 2 convs + 3 shortcut convs + logits. Standalone: 32 batchnorm_0 + final
    "wrn70_16": (71, 33, ("init_conv", "layer.0.block.0.batchnorm_0"), "logits"),
    # 16 convs (each + BN) + 3 linears (512-4096-4096-classes)
    "vgg19": (19, 0, ("features.0", "features.1"), "classifier.6"),
    # 8 convs (each + BN) + 3 linears (128-256-256-classes)
    "vgg11_w16": (11, 0, ("features.0", "features.1"), "classifier.6"),
    # stem + 58 bottlenecks x 2 convs + 3 transition convs + linear. Standalone: 57 bottleneck bn1
    # (concatenations) + 3 transition bn + final bn; dense1.0.bn1 reads the stem output
    "densenet121": (121, 61, ("conv1", "dense1.0.bn1"), "linear"),
    # 4 conv+BN stages + linear
    "small_cnn": (5, 0, ("features.0.0", "features.0.1"), "classifier"),
    "tiny_cnn": (5, 0, ("features.0.0", "features.0.1"), "classifier"),
}


def _meta_model(name, num_classes=10):
    with torch.device("meta"):
        return create_model(name, num_classes)


@functools.lru_cache(maxsize=None)
def _real(name):
    """One real 10-class model per name for the whole module (building some takes seconds)."""
    torch.manual_seed(0)
    model = create_model(name)
    return model, find_layers(model)


def _fresh(name):
    model, layers = _real(name)
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    return model, layers


def _batch(n=2, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_registry_has_the_paper_zoo():
    assert set(PAPER_PARAMS) | {"preact_resnet18", "small_cnn", "tiny_cnn"} <= set(MODELS)
    assert set(EXPECTED_LAYERS) == set(MODELS), "hard-code the layer count of a new model in EXPECTED_LAYERS"


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("num_classes", [10, 100])
def test_builds_counts_parameters_and_maps_shapes(name, num_classes):
    model = _meta_model(name, num_classes)
    n = sum(p.numel() for p in model.parameters())
    assert n > 0
    if num_classes == 10 and name in PAPER_PARAMS:
        assert abs(n / PAPER_PARAMS[name] - 1) < 0.02, f"{name}: {n:,} parameters vs {PAPER_PARAMS[name]:,.0f} in Table 6"
    out = model(torch.empty(2, 3, 32, 32, device="meta"))  # shapes only: free even for WRN-70-16
    assert tuple(out.shape) == (2, num_classes)


@pytest.mark.parametrize("name", MODELS)
def test_default_k_is_the_papers(name):
    assert model_info(name).default_k == PAPER_K.get(name, 1)


@pytest.mark.parametrize("name", MODELS)
def test_layer_discovery(name):
    n_layers, n_standalone, (first, first_bn), last = EXPECTED_LAYERS[name]
    model = _meta_model(name)  # shapes and names only: no weights needed
    layers = find_layers(model)
    assert len(layers) == n_layers
    assert [l.index for l in layers] == list(range(n_layers))
    assert (layers[0].name, layers[0].bn_name) == (first, first_bn)
    assert layers[-1].name == last and layers[-1].kind == "Linear" and layers[-1].bn_name is None
    assert len({l.name for l in layers}) == n_layers and all(l.calls == 1 for l in layers)
    # every parameter belongs to exactly one layer, or to a standalone BatchNorm
    merged_bns = [l.bn_name for l in layers if l.bn_name]
    assert len(merged_bns) == len(set(merged_bns))
    standalone = [n for n, m in model.named_modules() if isinstance(m, BN_TYPES) and n not in merged_bns]
    assert len(standalone) == n_standalone, standalone[:5]
    owned = layer_parameter_names(model, layers)
    assert len(owned) == len(set(owned))
    free = {f"{bn}.{p}" for bn in standalone for p in ("weight", "bias")}
    assert set(owned) | free == {n for n, _ in model.named_parameters()} and not set(owned) & free
    assert sum(l.num_params for l in layers) + sum(2 * dict(model.named_modules())[b].num_features for b in standalone) == sum(
        p.numel() for p in model.parameters()
    )


def test_named_layers_match_the_paper_and_public_layouts():
    layers = {l.name: l for l in _real("resnet18")[1]}
    assert layers["layer3.0.conv2"].index == 11 and layers["layer3.0.conv2"].num_params == 590_336  # Table 6: RN18 590K
    wrn = {l.name: l for l in find_layers(_meta_model("wrn70_16"))}
    assert wrn["layer.1.block.0.conv_0"].bn_name == "layer.1.block.0.batchnorm_1"
    assert wrn["layer.1.block.0.shortcut"].bn_name is None  # feeds the residual sum
    keys = set(_meta_model("wrn34_10").state_dict())
    assert {"block1.layer.0.convShortcut.weight", "block3.layer.4.conv2.weight", "bn1.running_mean", "fc.bias"} <= keys
    assert not any(k.startswith("sub_block1") for k in keys)
    keys = set(_meta_model("densenet121").state_dict())
    assert {"dense4.15.conv2.weight", "trans3.conv.weight", "bn.weight", "linear.weight"} <= keys
    keys = set(_meta_model("vgg19").state_dict())
    assert {"classifier.0.weight", "classifier.3.weight", "classifier.6.weight", "features.49.weight"} <= keys
    assert {"layer4.1.bn1.weight", "layer2.0.shortcut.0.weight", "bn.weight"} <= set(_meta_model("preact_resnet18").state_dict())
    assert "layer4.2.conv3.weight" in set(_meta_model("resnet50").state_dict())


def _clat_step(model, layers, default_k, overrides=()):
    """CLAT's epoch hook (criticality on a 2-image batch, PGD with 1 step, top-k) and one SGD step."""
    cfg = load_config(None, ["attack.steps=1", "clat.criticality.steps=1", "clat.criticality.batch_size=2", *overrides])
    method = create_method("clat", cfg, layers, default_k=default_k)
    x, y = _batch()
    event = method.on_epoch_start(model, EpochContext(0, 0, lambda n: (x[:n], y[:n]), torch.Generator().manual_seed(0)))
    set_bn_train_mode(model, method.trainable_bns())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    loss, _ = method.loss(model, x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    own = {k for k in before if k.rsplit(".", 1)[0] in {m for l in method.selected for m in l.module_names}}
    return method, event["selection"], changed, own


def assert_only_selected_changed(method, changed, own, k):
    assert len(method.selected) == k
    assert changed and changed <= own, (sorted(changed - own)[:5], [l.name for l in method.selected])
    weights = {f"{l.name}.weight" for l in method.selected}
    assert weights <= changed  # every selected layer did train


@pytest.mark.parametrize("name", LIGHT)  # 0.5-4 s each on 2 cores (WRN-34-10 the longest)
def test_forward_backward_criticality_and_one_clat_step(name):
    model, layers = _fresh(name)
    assert layers[0].reads_model_input  # (meta tensors cannot tell; checked here on real ones)
    # forward/backward on 2 images: every parameter gets a finite gradient
    model.train()
    x, y = _batch()
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    torch.nn.functional.cross_entropy(out, y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    for p in model.parameters():
        p.grad = None
    # criticality (inside CLAT's selection: PGD-1 on 2 images) and one CLAT step
    k = model_info(name).default_k
    method, sel, changed, own = _clat_step(model, layers, k)
    assert len(sel.criticality) == len(layers) and all(w >= 0 for w in sel.weakness)
    eligible = [i for i in range(len(layers) - 1)]  # all but the classifier
    top = sorted(eligible, key=lambda i: -sel.criticality[i])[:k]
    assert sorted(top) == sorted(sel.selected_index)
    assert_only_selected_changed(method, changed, own, k)


def test_compute_criticality_directly():
    model, layers = _fresh("preact_resnet18")
    x, y = _batch()
    res = compute_criticality(model, layers, x, y, ThreatModel(steps=1))
    assert len(res.criticality) == len(layers) and not res.eligible[-1]  # classifier excluded by default
    assert res.top_k(1)[0].index < len(layers) - 1


def test_pin_a_layer_by_name_on_resnet18():
    model, layers = _fresh("resnet18")
    method, _, changed, own = _clat_step(model, layers, 1, ["clat.layers=[layer3.0.conv2]"])
    assert [l.name for l in method.selected] == ["layer3.0.conv2"]
    bn_state = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    assert changed == own == {"layer3.0.conv2.weight"} | {f"layer3.0.bn2.{s}" for s in bn_state}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer3.0.conv2.weight", "layer3.0.bn2.weight", "layer3.0.bn2.bias"}


def test_pin_layers_by_index_and_exclude_on_zoo_models():
    model, layers = _fresh("preact_resnet18")
    method, _, changed, own = _clat_step(model, layers, 1, ["clat.layers=[0, 5]"])
    assert [l.name for l in method.selected] == ["conv1", layers[5].name]
    assert_only_selected_changed(method, changed, own, 2)
    # excluding every layer but one (by name and index) forces the choice
    model, layers = _fresh("resnet18")
    keep = "layer2.0.conv1"
    exclude = [str(l.index) if l.index % 2 else l.name for l in layers[:-1] if l.name != keep]
    method, _, changed, own = _clat_step(model, layers, 1, [f"clat.exclude=[{', '.join(exclude)}]"])
    assert [l.name for l in method.selected] == [keep]
    assert_only_selected_changed(method, changed, own, 1)


def test_classifier_is_excluded_by_default_but_can_be_included_or_pinned():
    model, layers = _fresh("small_cnn")
    x, y = _batch()
    assert compute_criticality(model, layers, x, y, ThreatModel(steps=1), include_classifier=True).eligible == [True] * len(layers)
    method, _, changed, own = _clat_step(model, layers, 1, ["clat.layers=[classifier]"])
    assert [l.name for l in method.selected] == ["classifier"] and changed == own == {"classifier.weight", "classifier.bias"}


@pytest.mark.slow
def test_wrn70_16_real_forward_criticality_and_clat_step():
    """267M parameters: ~3 s to build, ~8 s per forward of 2 images on 2 CPU cores."""
    torch.manual_seed(0)
    model = create_model("wrn70_16")
    layers = find_layers(model)
    assert len(layers) == EXPECTED_LAYERS["wrn70_16"][0] and layers[0].reads_model_input
    # criticality on 2 images (PGD-1: one forward/backward through the whole network, two more
    # forwards); pinned early layers keep the feature attack short, the CE term runs the whole network
    method, sel, changed, own = _clat_step(model, layers, 4, ["clat.layers=[0, 1, 2, 3]"])
    assert len(sel.criticality) == 71 and all(w >= 0 for w in sel.weakness)
    assert_only_selected_changed(method, changed, own, 4)
