"""CLAT on any model a user brings, and from any checkpoint a user has.

Models written here the way torchvision and timm write theirs (no downloads): layer
discovery names their layers, criticality runs, and one CLAT step changes only the
selected layers' parameters and buffers. Checkpoints in our format, as plain state
dicts and in RobustBench's layout load with ``load_model`` and start a CLAT run.
The Python example of docs/models.md runs as written.
"""

import re
from pathlib import Path

import pytest
import torch

from clat.attacks.threat import ThreatModel
import torch.nn.functional as F
from torch import nn

from clat.runs.checkpoint import load_into, read_state_dict, save_weights
from clat.runs.loading import load_model
from clat.config.load import load_config
from clat.criticality.index import compute_criticality
from clat.base.errors import CheckpointError
from clat.layers.discovery import BN_TYPES, find_layers
from clat.layers.capture import FeatureExtractor
from clat.layers.freezing import set_bn_train_mode
from clat.methods import EpochContext, create_method
from clat.models import create_model
from clat.training.loop import train

REPO = Path(__file__).resolve().parents[1]


# -- models in the styles users bring ---------------------------------------------------------
class TVBasicBlock(nn.Module):
    """torchvision's BasicBlock: one in-place ReLU module used twice, ``downsample`` Sequential,
    ``out += identity`` in place on the second BN's output."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVResNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(TVBasicBlock(8, 8))
        ds = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
        self.layer2 = nn.Sequential(TVBasicBlock(8, 16, 2, ds))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class InvertedResidual(nn.Module):
    """timm's InvertedResidual names: conv_pw -> bn1 -> act, conv_dw (depthwise) -> bn2 -> act,
    conv_pwl -> bn3, residual when the shape allows it."""

    def __init__(self, cin, cout, expand=2, stride=1):
        super().__init__()
        mid = cin * expand
        self.conv_pw = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv_dw = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv_pwl = nn.Conv2d(mid, cout, 1, groups=2, bias=False)  # a grouped (not depthwise) conv
        self.bn3 = nn.BatchNorm2d(cout)
        self.act = nn.Hardswish()
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x):
        out = self.act(self.bn1(self.conv_pw(x)))
        out = self.act(self.bn2(self.conv_dw(out)))
        out = self.bn3(self.conv_pwl(out))
        return out + x if self.has_skip else out


class MobileNetLike(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU6(inplace=True)
        self.blocks = nn.Sequential(
            nn.Sequential(InvertedResidual(8, 8)),
            nn.Sequential(InvertedResidual(8, 16, stride=2), InvertedResidual(16, 16)),
        )
        self.conv_head = nn.Conv2d(16, 32, 1)
        self.act2 = nn.ReLU6(inplace=True)
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.blocks(self.act1(self.bn1(self.conv_stem(x))))
        x = self.act2(self.conv_head(x))
        return self.classifier(x.mean((2, 3)))


class MLP(nn.Module):
    """Only Linear layers; flattens its input."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(3 * 32 * 32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, num_classes)
        )

    def forward(self, x):
        return self.net(x)


class NoBatchNorm(nn.Module):
    """No BatchNorm at all: a GroupNorm (never merged into a layer: it stays frozen) and bias convs."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, 2, 1)
        self.gn = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 16, 3, 2, 1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.relu(self.gn(self.c1(x)))
        x = F.relu(self.c2(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Reuse(nn.Module):
    """One conv module called twice in one forward pass (weight sharing), each call with its own BN."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.shared = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(8)
        self.bn_b = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.bn_a(self.shared(x)))
        x = F.relu(self.bn_b(self.shared(x)))  # second call: same layer, bn_b stays standalone
        return self.fc(x.mean((2, 3)))


# model, expected (layer name, merged BN) in execution order, a layer to pin in a second CLAT step
ANY_MODELS = {
    "torchvision_resnet": (
        TVResNet,
        [("conv1", "bn1"), ("layer1.0.conv1", "layer1.0.bn1"), ("layer1.0.conv2", "layer1.0.bn2"),
         ("layer2.0.conv1", "layer2.0.bn1"), ("layer2.0.conv2", "layer2.0.bn2"),
         ("layer2.0.downsample.0", "layer2.0.downsample.1"), ("fc", None)],
        "layer2.0.downsample.0",
    ),
    "timm_mobilenet": (
        MobileNetLike,
        [("conv_stem", "bn1")]
        + [(f"blocks.{b}.{conv}", f"blocks.{b}.{bn}") for b in ("0.0", "1.0", "1.1")
           for conv, bn in (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3"))]
        + [("conv_head", None), ("classifier", None)],
        "blocks.1.0.conv_dw",
    ),
    "mlp": (MLP, [("net.1", None), ("net.3", None), ("net.5", None)], "net.1"),
    "no_batchnorm": (NoBatchNorm, [("c1", None), ("c2", None), ("head", None)], "c1"),
    "reuse": (Reuse, [("stem", None), ("shared", "bn_a"), ("fc", None)], "shared"),
}


def _batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _clat_step(model, layers, overrides=()):
    cfg = load_config(None, ["attack.steps=2", "clat.criticality.steps=1", "clat.criticality.batch_size=4", *overrides])
    method = create_method("clat", cfg, layers, default_k=1)
    x, y = _batch()
    method.on_epoch_start(model, EpochContext(0, 0, lambda n: (x[:n], y[:n]), torch.Generator().manual_seed(0)))
    set_bn_train_mode(model, method.trainable_bns())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss, _ = method.loss(model, x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    mods = {m for l in method.selected for m in l.module_names}
    own = {k for k in before if k.rsplit(".", 1)[0] in mods}
    assert changed and changed <= own, (sorted(changed - own), mods)
    assert {f"{l.name}.weight" for l in method.selected} <= changed
    return method


@pytest.mark.parametrize("kind", list(ANY_MODELS))
def test_any_model_layers_criticality_and_clat_step(kind):
    factory, expected, pin = ANY_MODELS[kind]
    torch.manual_seed(0)
    model = factory()
    layers = find_layers(model)
    assert [(l.name, l.bn_name) for l in layers] == expected
    assert layers[0].reads_model_input
    x, y = _batch()
    res = compute_criticality(model, layers, x, y, ThreatModel(steps=1))
    assert len(res.criticality) == len(layers) and all(w >= 0 for w in res.weakness)
    assert not res.eligible[-1]  # the classifier
    method = _clat_step(model, layers)  # selected by criticality, k=1
    assert method.selected[0].name != expected[-1][0]
    method = _clat_step(model, layers, [f"clat.layers=[{pin}]"])  # pinned by name
    assert [l.name for l in method.selected] == [pin]


def test_torchvision_style_inplace_ops_are_seen():
    layers = {l.name: l for l in find_layers(TVResNet())}
    assert layers["conv1"].inplace_after  # in-place ReLU on bn1's output
    assert layers["layer2.0.conv2"].inplace_after  # ``out += identity`` on bn2's output
    assert not layers["fc"].inplace_after


def test_depthwise_and_grouped_convs_are_layers():
    model = MobileNetLike()
    layers = {l.name: l for l in find_layers(model)}
    dw, grouped = layers["blocks.1.0.conv_dw"], layers["blocks.1.0.conv_pwl"]
    assert model.blocks[1][0].conv_dw.groups == 16 and dw.num_params == 16 * 9 + 2 * 16
    assert model.blocks[1][0].conv_pwl.groups == 2 and grouped.num_params == 16 * 8 + 2 * 16


def test_no_batchnorm_model_keeps_other_norms_frozen():
    model = NoBatchNorm()
    assert not any(isinstance(m, BN_TYPES) for m in model.modules())
    layers = find_layers(model)
    method = _clat_step(model, layers, ["clat.layers=[c1]"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"c1.weight", "c1.bias"}
    assert method.trainable_bns() == []


def test_reused_module_is_one_layer_whose_feature_is_its_first_call():
    model = Reuse().eval()
    layers = find_layers(model)
    shared = next(l for l in layers if l.name == "shared")
    assert shared.calls == 2 and [l.calls for l in layers] == [1, 2, 1]
    x, _ = _batch()
    feat = FeatureExtractor(model, [shared])(x, stop_early=False).outputs["shared"]
    with torch.no_grad():
        first = model.bn_a(model.shared(F.relu(model.stem(x))))
    assert torch.equal(feat, first)
    # bn_b reads the second call's output: standalone, never trained
    method = _clat_step(model, layers, ["clat.layers=[shared]"])
    assert method.trainable_bns() == ["bn_a"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"shared.weight", "bn_a.weight", "bn_a.bias"}


# -- starting from a checkpoint ------------------------------------------------------------------
from tests.test_train import FAST, tiny_splits  # noqa: E402  (the shared tiny training setup)

RB_MEAN, RB_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # not CIFAR's: shows the checkpoint's own normalization is used


def _write(fmt, model, path):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if fmt == "ours":
        save_weights(path, model, {"model": "tiny_cnn", "num_classes": 10, "normalize": True})
    elif fmt == "plain":
        torch.save(sd, path)
    elif fmt == "robustbench":
        # RobustBench's CIFAR models normalize inside with ``mu``/``sigma`` buffers of shape (1, 3, 1, 1);
        # its checkpoint files wrap the state dict and keep DataParallel's ``module.`` prefix
        sd["mu"] = torch.tensor(RB_MEAN).view(1, 3, 1, 1)
        sd["sigma"] = torch.tensor(RB_STD).view(1, 3, 1, 1)
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 99, "best_acc": 0.5}, path)


@pytest.mark.parametrize("fmt,suffix", [("ours", ".safetensors"), ("plain", ".pt"), ("plain", ".pth"), ("robustbench", ".pt")])
def test_start_clat_from_a_checkpoint(fmt, suffix, tmp_path):
    torch.manual_seed(0)
    src = create_model("tiny_cnn")
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01 * torch.randn_like(p))  # weights that are not a fresh init
    path = tmp_path / f"init{suffix}"
    _write(fmt, src, path)
    norm = (RB_MEAN, RB_STD) if fmt == "robustbench" else (None, None)

    model, meta = load_model(path, model_name="tiny_cnn")
    ref = create_model("tiny_cnn", mean=norm[0], std=norm[1])
    ref.load_state_dict(src.state_dict())
    x, _ = _batch()
    assert torch.equal(model.eval()(x), ref.eval()(x))  # same weights, same input normalization

    over = FAST + ["pretrain.epochs=0", "finetune.epochs=1", "finetune.lr=0.05", f"init={path}"]
    summary = train(load_config(None, over), tmp_path / "run", data=tiny_splits())
    selected = summary["selection_history"][0]["selected"]
    out = tmp_path / "run" / "model.safetensors"
    tuned, meta = load_model(out, model_name="tiny_cnn")
    assert meta["model"] == "tiny_cnn"
    final = read_state_dict(out)
    assert all(torch.equal(tuned.state_dict()[k], v) for k, v in final.items())
    if fmt == "robustbench":  # the normalization travelled through training into the metadata
        assert tuple(tuned.normalize.mean.flatten().tolist()) == RB_MEAN and meta["std"] == list(RB_STD)
    # CLAT fine-tuned only the selected layer (its conv and BN) of the loaded weights
    start = ref.state_dict()
    changed = {k.rsplit(".", 1)[0] for k in final if not torch.equal(final[k], start[k])}
    layer = {l.name: l for l in find_layers(ref)}[selected[0]]
    assert changed == set(layer.module_names)


def test_robustbench_dm_layout_mean_std_buffers(tmp_path):
    """DeepMind's WideResNets on RobustBench keep ``mean``/``std`` buffers of shape (3, 1, 1), unwrapped."""
    src = create_model("tiny_cnn")
    sd = dict(src.state_dict(), mean=torch.tensor([0.4, 0.4, 0.4]).view(3, 1, 1), std=torch.tensor([0.2, 0.3, 0.4]).view(3, 1, 1))
    torch.save(sd, tmp_path / "dm.pt")
    model, _ = load_model(tmp_path / "dm.pt", model_name="tiny_cnn")
    assert model.normalize.std.flatten().tolist() == pytest.approx([0.2, 0.3, 0.4])
    # the normalization may also sit in a ``normalize`` submodule, behind a ``model.`` prefix
    sd = {f"model.{k}": v for k, v in src.state_dict().items()}
    sd.update({"model.normalize.mean": torch.zeros(3), "model.normalize.std": torch.ones(3)})
    torch.save({"model": sd}, tmp_path / "sub.pth")
    model, _ = load_model(tmp_path / "sub.pth", model_name="tiny_cnn")
    assert model.normalize.mean.flatten().tolist() == [0, 0, 0]


def test_checkpoint_normalization_without_a_place_for_it_is_a_clear_error(tmp_path):
    src = create_model("tiny_cnn")
    _write("robustbench", src, tmp_path / "rb.pt")
    with pytest.raises(CheckpointError, match=r"input normalization \(mean=\[0.5, 0.5, 0.5\].*no Normalize module"):
        load_model(tmp_path / "rb.pt", model_name="tiny_cnn", normalize=False)
    # an identity normalization needs no place
    sd = dict(src.state_dict(), mu=torch.zeros(1, 3, 1, 1), sigma=torch.ones(1, 3, 1, 1))
    m = create_model("tiny_cnn", normalize=False)
    load_into(m, sd)


def test_checkpoint_that_does_not_fit_names_what(tmp_path):
    src = create_model("tiny_cnn")
    sd = {f"model.{k}": v for k, v in src.state_dict().items()}
    sd["model.extra_head.weight"] = torch.zeros(3, 3)
    torch.save({"state_dict": sd}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"1 unexpected keys \(e.g. extra_head.weight\).*prefix 'model.'"):
        load_model(tmp_path / "x.pt", model_name="tiny_cnn")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_model(tmp_path / "x.pt", model_name="small_cnn")


def test_trades_wideresnet_checkpoint_drops_unused_sub_block1():
    """TRADES' WideResNet release carries a ``sub_block1`` its forward never uses (RobustBench's
    ``sub_block1=True``); a small WideResNet of the same layout shows it is dropped on load."""
    from clat.models.registry import Normalize
    from clat.models.wide_resnet import NetworkBlock, WideResNet

    src = WideResNet(10, 1, 10, Normalize((0.5,) * 3, (0.5,) * 3))
    sd = {f"module.{k}": v for k, v in src.state_dict().items()}
    sub = NetworkBlock(1, 16, 16, 1)
    sd.update({f"module.sub_block1.{k}": v for k, v in sub.state_dict().items()})
    dst = WideResNet(10, 1, 10, Normalize((0.5,) * 3, (0.5,) * 3))
    load_into(dst, sd)
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())


# -- the docs' example runs as written ----------------------------------------------------------
def test_docs_models_python_example_runs(tmp_path, monkeypatch):
    text = (REPO / "docs" / "models.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "docs/models.md has no python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "docs/models.md", "exec"), {"__name__": "docs_models"})
    assert (tmp_path / "runs" / "my-model" / "model.safetensors").is_file()
