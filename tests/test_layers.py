import pytest
import torch
from torch import nn

from clat.layers.discovery import BN_TYPES, find_layers, layer_parameter_names, resolve_layers
from clat.layers.capture import FeatureExtractor
from clat.layers.freezing import freeze_all_but, frozen_bn_statistics
from clat.base.errors import ConfigError
from clat.models import create_model, list_models


def test_resnet18_layers_match_paper_table6():
    layers = find_layers(create_model("resnet18"))
    assert len(layers) == 21
    l11 = layers[11]
    assert l11.name == "layer3.0.conv2" and l11.bn_name == "layer3.0.bn2"
    assert l11.num_params == 590_336  # 589,824 + 512: Table 6's "590K"
    assert layers[0].name == "conv1" and layers[0].bn_name == "bn1" and layers[0].reads_model_input
    assert layers[-1].name == "linear" and layers[-1].kind == "Linear" and layers[-1].bn_name is None
    # a shortcut conv runs after its block's conv2 in execution order
    assert [l.name for l in layers[5:8]] == ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.shortcut.0"]
    assert layers[7].bn_name == "layer2.0.shortcut.1"


@pytest.mark.parametrize("name", list_models())
def test_every_model_layers_and_params(name):
    with torch.device("meta"):  # names and shapes only: wrn70_16 has 267M parameters
        model = create_model(name)
    layers = find_layers(model)
    assert [l.index for l in layers] == list(range(len(layers)))
    names = set(layer_parameter_names(model, layers))
    params = dict(model.named_parameters())
    # every parameter belongs to one layer, except those of standalone BatchNorms (a BN reading a
    # residual sum / concatenation in pre-activation nets; docs/models.md)
    modules = dict(model.named_modules())
    rest = set(params) - names
    assert names <= set(params)
    assert all(isinstance(modules[n.rsplit(".", 1)[0]], BN_TYPES) for n in rest)
    assert sum(l.num_params for l in layers) + sum(params[n].numel() for n in rest) == sum(p.numel() for p in model.parameters())


def test_early_stop_features_equal_full_forward():
    model = create_model("resnet18").eval()
    layers = find_layers(model)
    x = torch.rand(3, 3, 32, 32)
    pick = [layers[4], layers[11]]
    ext = FeatureExtractor(model, pick)
    full = ext(x, stop_early=False)
    early = ext(x, stop_early=True)
    assert full.logits is not None and early.logits is None
    for l in pick:
        assert torch.equal(full.outputs[l.name], early.outputs[l.name])
    assert torch.equal(full.logits, model(x))


def test_early_stop_skips_the_rest_of_the_network():
    model = create_model("resnet18").eval()
    layers = find_layers(model)
    ran = []
    h = model.layer4.register_forward_hook(lambda *a: ran.append(1))
    FeatureExtractor(model, [layers[11]])(torch.rand(2, 3, 32, 32))
    h.remove()
    assert ran == []


class InplaceNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.act(self.bn(self.conv(x))).mean((2, 3)))


def test_feature_is_bn_output_even_with_inplace_relu_after_it():
    model = InplaceNet().eval()
    layers = find_layers(model)
    assert layers[0].inplace_after
    x = torch.randn(2, 3, 8, 8)
    feats = FeatureExtractor(model, [layers[0]])(x, stop_early=False).outputs["conv"]
    ref = model.bn(model.conv(x))
    assert torch.equal(feats, ref)
    assert (feats < 0).any()  # not the ReLU output


class Shared(nn.Module):
    """One Linear module used twice in a forward pass, no BN."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 6)
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.shared(torch.relu(self.inp(x.flatten(1))))
        return self.out(self.shared(torch.relu(h)))


def test_module_called_twice_is_one_layer_with_first_call_feature():
    model = Shared()
    layers = find_layers(model, torch.rand(2, 12))
    assert [l.name for l in layers] == ["inp", "shared", "out"]
    assert layers[1].calls == 2
    x = torch.rand(4, 12)
    f = FeatureExtractor(model, [layers[1]])(x).outputs["shared"]
    assert torch.allclose(f, model.shared(torch.relu(model.inp(x))))


def test_resolve_by_name_and_index_and_errors():
    layers = find_layers(create_model("resnet18"))
    assert resolve_layers(layers, ["layer3.0.conv2", 0, 20]) == [layers[11], layers[0], layers[20]]
    with pytest.raises(ConfigError, match="write it as an integer"):
        resolve_layers(layers, ["20"])  # a string is a name, never an index
    with pytest.raises(ConfigError, match="out of range"):
        resolve_layers(layers, [21])
    with pytest.raises(ConfigError, match="no layer named"):
        resolve_layers(layers, ["layer9.conv"])


def test_freeze_all_but():
    model = create_model("resnet18")
    layers = find_layers(model)
    n = freeze_all_but(model, [layers[11]])
    assert n == 590_336
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer3.0.conv2.weight", "layer3.0.bn2.weight", "layer3.0.bn2.bias"}


def test_frozen_bn_statistics_keeps_running_stats():
    bn = nn.BatchNorm2d(3).train()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with frozen_bn_statistics(bn):
        out = bn(torch.randn(4, 3, 5, 5) * 3 + 1)
    assert abs(out.mean().item()) < 1e-5  # still normalizes with batch statistics
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    bn(torch.randn(4, 3, 5, 5) + 1)
    assert not torch.equal(bn.running_mean, before["running_mean"])  # restored afterwards


def test_find_layers_errors_clearly_on_bad_input_shape():
    with pytest.raises(ConfigError, match="example_input"):
        find_layers(create_model("tiny_cnn"), torch.rand(2, 5, 32, 32))
