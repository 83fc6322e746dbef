import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clat.attacks.threat import Shard, ThreatModel, feature_distance, fgsm_rs, perturb, pgd
from clat.base.errors import ConfigError
from clat.layers.discovery import find_layers
from clat.layers.capture import FeatureExtractor
from clat.models import create_model

EPS = 8 / 255


def _model():
    return create_model("tiny_cnn").eval()


def _feature_attack(model, x, y, steps=5, norm="linf"):
    layers = find_layers(model)
    ext = FeatureExtractor(model, [layers[2]])
    target = {k: v.detach() for k, v in ext(x).outputs.items()}
    return perturb(lambda xa: feature_distance(ext(xa).outputs, target), x, ThreatModel(norm, EPS, 2 / 255, steps))


ATTACKS = {
    "pgd": lambda m, x, y: pgd(m, x, y, ThreatModel(eps=EPS, steps=3)),
    "pgd_l2": lambda m, x, y: pgd(m, x, y, ThreatModel("l2", eps=0.5, alpha=0.2, steps=3)),
    "fgsm_rs": lambda m, x, y: fgsm_rs(m, x, y, ThreatModel(eps=EPS)),
    "feature": lambda m, x, y: _feature_attack(m, x, y, steps=3),
}


@pytest.mark.parametrize("name", ATTACKS)
def test_attack_stays_in_threat_model_and_box(name):
    model = _model()
    x = torch.rand(6, 3, 32, 32)
    x[0] = 0.0
    x[1] = 1.0  # pixels at the box edges
    y = torch.randint(0, 10, (6,))
    x_adv = ATTACKS[name](model, x, y)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if name == "pgd_l2":
        assert (x_adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5
    else:
        assert (x_adv - x).abs().max() <= EPS + 1e-7
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients accumulated


def test_pgd_increases_loss():
    model = _model()
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        clean = ce(model(x), y)
        adv = ce(model(pgd(model, x, y, ThreatModel(steps=5))), y)
    assert adv > clean


def test_feature_attack_increases_feature_distance():
    model = _model()
    layers = find_layers(model)
    ext = FeatureExtractor(model, [layers[2]])
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    clean = {k: v.detach() for k, v in ext(x).outputs.items()}
    noise = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
    x_adv = _feature_attack(model, x, y, steps=10)
    with torch.no_grad():
        d_noise = feature_distance(ext(noise).outputs, clean).mean()
        d_one = feature_distance(ext(_feature_attack(model, x, y, steps=1)).outputs, clean).mean()
        d_adv = feature_distance(ext(x_adv).outputs, clean).mean()
    assert d_adv > d_one > d_noise


@settings(max_examples=40, deadline=None)
@given(
    eps=st.floats(1e-3, 0.5),
    scale=st.floats(0.0, 5.0),
    norm=st.sampled_from(["linf", "l2"]),
    seed=st.integers(0, 2**16),
)
def test_projection_property(eps, scale, norm, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 2, 4, 4, generator=g)
    delta = (torch.rand(3, 2, 4, 4, generator=g) * 2 - 1) * scale
    t = ThreatModel(norm, eps)
    d = t.project(x, delta)
    xa = x + d
    assert xa.min() >= -1e-7 and xa.max() <= 1 + 1e-7
    if norm == "linf":
        assert d.abs().max() <= eps + 1e-6
    else:
        assert d.flatten(1).norm(dim=1).max() <= eps + 1e-5
    # projecting twice changes nothing
    assert torch.allclose(t.project(x, d), d, atol=1e-6)


def test_bad_attack_parameters():
    with pytest.raises(ConfigError, match="eps"):
        ThreatModel(eps=0.0)
    with pytest.raises(ConfigError, match="eps"):
        ThreatModel(eps=float("nan"))
    with pytest.raises(ConfigError, match="steps"):
        ThreatModel(steps=0)
    with pytest.raises(ConfigError, match="alpha"):
        ThreatModel(alpha=-1.0)
    with pytest.raises(ConfigError, match="norm"):
        ThreatModel("l1")
    with pytest.raises(ConfigError, match="steps"):
        DEFAULT.replace(steps=0)
    with pytest.raises(ConfigError, match="ThreatModel"):
        pgd(_model(), torch.rand(1, 3, 32, 32), torch.tensor([0]), {"eps": 8 / 255})


DEFAULT = ThreatModel()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_shards_of_a_batch_draw_what_the_whole_batch_draws(norm):
    """Two ranks of a data-parallel step, each passed its Shard, take exactly the random starts one process
    with the global batch takes (the RNG in the same state on both)."""
    t = ThreatModel(norm, eps=0.5 if norm == "l2" else EPS)
    x = torch.rand(6, 3, 4, 4)
    torch.manual_seed(7)
    whole = t.sample(x)
    parts = []
    for offset in (0, 3):
        torch.manual_seed(7)
        parts.append(t.sample(x[offset : offset + 3], Shard(offset, 6)))
    assert torch.equal(torch.cat(parts), whole)
    torch.manual_seed(7)
    assert not torch.equal(t.sample(x[3:]), whole[3:])  # without its shard, the second rank would draw the first rank's numbers


def test_threat_model_owns_its_checks_and_its_text():
    """Issue 35: the ℓ∞ rule ε < 1 lives in ThreatModel itself (a library user building one directly gets it too),
    and one method writes it the way reports and messages do."""
    with pytest.raises(ConfigError, match="whole"):
        ThreatModel(eps=1.0)
    assert ThreatModel("l2", eps=1.0, alpha=0.25).eps == 1.0  # an ℓ2 radius of 1 is an ordinary one
    assert ThreatModel().text() == "ℓ∞ ε=8/255, step 2/255"
    assert ThreatModel("l2", eps=0.5, alpha=0.125).text() == "ℓ2 ε=0.5, step 0.125"
