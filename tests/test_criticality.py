import math

import pytest
import torch

from clat.attacks.threat import ThreatModel
from torch import nn

from clat.criticality.index import compute_criticality, eligible_mask, select_random
from clat.base.errors import ConfigError
from clat.layers.discovery import find_layers
from clat.models import create_model

FACTORS = [2.0, 3.0, 0.5, 5.0, 1.5]


def scaling_chain(factors, d=8):
    """Linear layers that multiply their input by known factors: F_i = (prod_{j<=i} s_j) x."""
    mods = [nn.Flatten()]
    for s in factors:
        lin = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            lin.weight.copy_(s * torch.eye(d))
        mods.append(lin)
    return nn.Sequential(*mods).double()


@pytest.mark.parametrize("denominator", ["input", "previous"])
def test_criticality_closed_form_on_a_scaling_chain(denominator):
    d = 8
    model = scaling_chain(FACTORS, d)
    x = torch.rand(16, 1, 2, 4, dtype=torch.float64)
    y = torch.randint(0, d, (16,))
    layers = find_layers(model, x[:2])
    assert len(layers) == len(FACTORS)
    res = compute_criticality(model, layers, x, y, denominator=denominator, include_classifier=True)
    # C_i = W_i / W_{i-1} = s_i for i >= 1; C_0 = W_0 = s_0 * mean ||delta|| / d
    for i in range(1, len(FACTORS)):
        assert res.criticality[i] == pytest.approx(FACTORS[i], rel=1e-5, abs=1e-5)
    x_adv_dist = res.weakness[0] * d / FACTORS[0]  # mean ||delta||_2
    assert res.criticality[0] == pytest.approx(res.weakness[0], rel=1e-12)
    assert 0 < x_adv_dist <= math.sqrt(d) * 8 / 255 + 1e-9
    top = [l.index for l in res.top_k(2)]
    assert top == [3, 1]  # factors 5 and 3


def test_criticality_on_conv_chain_with_bn_and_exclusion_of_classifier():
    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    layers = find_layers(model)
    x, y = torch.rand(10, 3, 32, 32), torch.randint(0, 10, (10,))
    res = compute_criticality(model, layers, x, y, ThreatModel(steps=2))
    assert res.eligible == [True, True, True, True, False]
    assert all(math.isfinite(c) and c >= 0 for c in res.criticality)
    assert layers[-1] not in res.top_k(4)
    with pytest.raises(ConfigError, match="k=5"):
        res.top_k(5)
    d = res.to_dict(1)
    assert sum(l["selected"] for l in d["layers"]) == 1
    assert d["layers"][-1]["rank"] is None


def test_scaling_options_change_only_the_normalization():
    model = create_model("tiny_cnn")
    layers = find_layers(model)
    x, y = torch.rand(6, 3, 32, 32), torch.randint(0, 10, (6,))
    from clat.attacks.threat import pgd

    model.eval()
    x_adv = pgd(model, x, y, ThreatModel(steps=2))
    a = compute_criticality(model, layers, x, y, x_adv=x_adv, scaling="n")
    b = compute_criticality(model, layers, x, y, x_adv=x_adv, scaling="none")
    for la, wa, wb in zip(layers, a.weakness, b.weakness):
        assert wa * la.numel == pytest.approx(wb, rel=1e-5)


def test_model_mode_is_restored():
    model = create_model("tiny_cnn").train()
    layers = find_layers(model)
    compute_criticality(model, layers, torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,)), ThreatModel(steps=1))
    assert model.training


def test_random_selection_is_reproducible_and_eligible():
    layers = find_layers(create_model("resnet18"))
    ok = eligible_mask(layers)
    a = select_random(layers, ok, 3, torch.Generator().manual_seed(1))
    b = select_random(layers, ok, 3, torch.Generator().manual_seed(1))
    assert a == b and len(a) == 3 and all(l.name != "linear" for l in a)
    with pytest.raises(ConfigError, match="k=30"):
        select_random(layers, ok, 30, torch.Generator())


def test_exclude_by_name():
    layers = find_layers(create_model("resnet18"))
    ok = eligible_mask(layers, exclude=["layer3.0.conv2"])
    assert not ok[11] and not ok[20] and sum(ok) == 19


@pytest.mark.parametrize("model_name, denominator, norm", [("resnet18_w16", "upstream", "linf"), ("tiny_cnn", "input", "l2"),
                                                           ("resnet18_w16", "previous", "linf")])
def test_chunked_criticality_is_the_whole_batch_s(model_name, denominator, norm):
    """A (re)selection attacks and measures its batch in chunks (peak memory of a chunk): the same perturbations
    (the random starts are slices of one draw), the same criticality, and the RNG left where one attack leaves it."""
    torch.manual_seed(0)
    model = create_model(model_name)
    layers = find_layers(model)
    x, y = torch.rand(10, 3, 32, 32), torch.randint(0, 10, (10,))
    threat = ThreatModel(norm, 8 / 255 if norm == "linf" else 0.5, 2 / 255 if norm == "linf" else 0.1, 3)
    results, after = [], []
    for chunk in (None, 4, 1):
        torch.manual_seed(1)
        results.append(compute_criticality(model, layers, x, y, threat, denominator=denominator, chunk_size=chunk))
        after.append(torch.rand(3))
    whole = results[0]
    for r in results[1:]:
        assert r.ranking == whole.ranking
        torch.testing.assert_close(torch.tensor(r.criticality), torch.tensor(whole.criticality), rtol=1e-5, atol=1e-9, equal_nan=True)
        torch.testing.assert_close(torch.tensor(r.weakness), torch.tensor(whole.weakness), rtol=1e-5, atol=1e-9)
    assert all(torch.equal(a, after[0]) for a in after)
