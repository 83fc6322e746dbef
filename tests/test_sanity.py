"""Sanity checks against gradient masking: a normal model raises no flag, masked ones do."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clat.attacks.threat import ThreatModel
from clat.data.loader import load_bundled
from clat.base.errors import ClatError, ConfigError
from clat.models import create_model
from clat.eval.sanity import autoattack_check, input_gradients, sanity_checks

SETTINGS = dict(threat=ThreatModel(steps=3), restarts=2, square_queries=50, seed=0)


@pytest.fixture(scope="module")
def trained():
    """tiny_cnn after a few SGD steps on real images: weak, but a normal classifier."""
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = load_bundled()
    model = create_model("tiny_cnn")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        idx = torch.randint(0, len(x_tr), (64,), generator=g)
        loss = F.cross_entropy(model(x_tr[idx].float() / 255), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x_te[:16], y_te[:16]


class Quantized(nn.Module):
    """Rounds its input to 4 grey levels: shattered gradients (exactly zero)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(torch.round(x * 3) / 3)


class ScaledOneHot(nn.Module):
    """Outputs 10 · one-hot(argmax): the loss is flat almost everywhere."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        z = self.m(x)
        return 10 * F.one_hot(z.argmax(1), z.shape[1]).float() + 0 * z


class Saturated(nn.Module):
    """Logits × 10⁴: the softmax saturates and the cross-entropy gradient underflows to 0."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x) * 1e4


def test_normal_model_raises_no_flag(trained):
    model, x, y = trained
    r = sanity_checks(model, x, y, **SETTINGS)
    assert r["flags"] == [] and not r["gradient_masking_suspected"], r["flags"]
    checks = {c["name"]: c for c in r["checks"]}
    assert set(checks) == {"more_steps", "more_restarts", "black_box", "eps_monotone", "large_eps", "noise", "gradient"}
    # the numbers behind each check are stored
    assert checks["noise"]["values"]["pgd_acc"] < checks["noise"]["values"]["noise_acc"]
    assert checks["large_eps"]["values"]["acc"] == 0.0
    assert checks["gradient"]["values"]["zero_gradients"] == 0
    assert r["white_box_acc"] <= r["clean_acc"]


@pytest.mark.parametrize("wrapper", [Quantized, ScaledOneHot, Saturated])
def test_masked_models_are_flagged(trained, wrapper):
    base, x, y = trained
    model = wrapper(base).eval()
    # the unmasked network as a transfer surrogate, as BPDA would use it
    r = sanity_checks(model, x, y, surrogates={"unmasked": base}, **SETTINGS)
    raised = {c["name"] for c in r["checks"] if c["flag"]}
    assert r["gradient_masking_suspected"] and len(r["flags"]) == len(raised) >= 3
    assert {"gradient", "noise", "black_box"} <= raised, raised
    bb = next(c for c in r["checks"] if c["name"] == "black_box")["values"]
    assert min(bb["black_box_acc"].values()) < bb["white_box_acc"]


def test_input_gradients_of_a_model_without_a_gradient_path(trained):
    base, x, y = trained

    class ArgMax(nn.Module):
        def forward(self, x):
            return F.one_hot(base(x).argmax(1), 10).float()

    m = ArgMax()
    m.p = nn.Parameter(torch.zeros(1))  # a parameter, so the model has a device
    assert torch.equal(input_gradients(m, x[:4], y[:4]), torch.zeros(4))
    assert (input_gradients(base, x[:4], y[:4]) > 0).all()
    with pytest.raises(ClatError, match="gradient masking"):
        sanity_checks(m, x[:4], y[:4], **SETTINGS)


def test_autoattack_check():
    assert not autoattack_check(0.40, 0.37, 100)["flag"]
    c = autoattack_check(0.40, 0.20, 100)
    assert c["flag"] and "overestimates" in c["message"] and c["values"]["autoattack_acc"] == 0.20
    assert autoattack_check(0.155, 0.105, 200)["flag"]  # 5 points, but a third of PGD's accuracy
    assert not autoattack_check(0.5, 0.0, 1)["flag"]  # a single example is no evidence


def test_bad_settings(trained):
    model, x, y = trained
    with pytest.raises(ConfigError):
        sanity_checks(model, x, y, large_eps=1 / 255)
    with pytest.raises(ConfigError):
        sanity_checks(model, x, y, restarts=0)
