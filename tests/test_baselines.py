"""Method-specific properties of the baselines, each checked against an independent computation."""

import copy

import pytest
import torch
import torch.nn.functional as F

from clat.config.schema import AttackConfig
from clat.config.load import load_config
from clat.layers.freezing import set_bn_train_mode
from clat.methods import AWP, MART, PGDAT, SCORE, TRADES, create_method
from clat.models import create_model

ATT = AttackConfig(eps=8 / 255, alpha=2 / 255, steps=2)


def _data(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_trades_kl_term_equals_hand_written_kl():
    model = create_model("tiny_cnn").double().eval()  # eval: both forwards see the same normalisation
    with torch.no_grad():
        model.classifier.weight.mul_(20)  # confident, distinct predictions: a KL well above rounding
    x, y = _data()
    x, x_adv = x.double(), torch.rand(x.shape, dtype=torch.float64)
    loss, m = TRADES(ATT, beta=6.0).objective(model, x, x_adv, y)
    p = F.softmax(model(x), 1)
    q = F.softmax(model(x_adv), 1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    assert m["robust"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert loss.item() == pytest.approx(F.cross_entropy(model(x), y).item() + 6.0 * kl.item(), rel=1e-5)


def test_trades_attack_increases_kl():
    model = create_model("tiny_cnn").eval()
    x, y = _data()
    t = TRADES(AttackConfig(eps=8 / 255, alpha=2 / 255, steps=5))
    p = F.softmax(model(x), 1).detach()
    x_adv = t.adversarial(model, x, y)
    with torch.no_grad():
        assert t.divergence(model(x_adv), p).mean() > t.divergence(model((x + 0.001 * torch.randn_like(x)).clamp(0, 1)), p).mean()
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-7


def test_mart_weighting_matches_independent_computation():
    model = create_model("tiny_cnn").eval()
    x, y = _data()
    x_adv = (x + 0.03 * torch.rand_like(x)).clamp(0, 1)
    loss, m = MART(ATT, beta=5.0).objective(model, x, x_adv, y)
    with torch.no_grad():
        pa, pn = F.softmax(model(x_adv), 1), F.softmax(model(x), 1)
        total = 0.0
        for i in range(len(y)):
            order = sorted(range(10), key=lambda c: pa[i, c].item())
            wrong = order[-2] if order[-1] == y[i].item() else order[-1]
            bce_i = -torch.log(pa[i, y[i]]) - torch.log(1.0001 - pa[i, wrong] + 1e-12)
            kl_i = sum(pn[i, c] * (torch.log(pn[i, c]) - torch.log(pa[i, c] + 1e-12)) for c in range(10))
            total += bce_i + 5.0 * kl_i * (1.0000001 - pn[i, y[i]])
    assert loss.item() == pytest.approx(total.item() / len(y), rel=1e-4)


def test_score_terms_are_squared_errors():
    model = create_model("tiny_cnn").eval()
    x, y = _data()
    x_adv = (x + 0.03 * torch.rand_like(x)).clamp(0, 1)
    loss, m = SCORE(ATT, beta=2.0).objective(model, x, x_adv, y)
    p, q = F.softmax(model(x), 1), F.softmax(model(x_adv), 1)
    nat = ((p - F.one_hot(y, 10)) ** 2).sum(1).mean()
    rob = ((q - p) ** 2).sum(1).mean()
    assert m["natural"].item() == pytest.approx(nat.item(), rel=1e-5)
    assert loss.item() == pytest.approx(nat.item() + 2.0 * rob.item(), rel=1e-5)


@pytest.mark.parametrize("base", ["pgd_at", "trades"])
def test_awp_restores_weights_exactly_except_for_the_real_update(base):
    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    x, y = _data()
    cfg = load_config(None, ["attack.steps=2", f"awp.base={base}", "awp.gamma=0.01"])
    awp = create_method("awp", cfg)
    assert isinstance(awp, AWP)
    set_bn_train_mode(model, None)
    ref = copy.deepcopy(model)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}

    # AWP through its hooks, plain SGD without momentum/decay
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(1)
    loss, _ = awp.loss(model, x, y)
    perturbed = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(perturbed[k], w0[k]) for k in w0 if k.endswith("weight"))  # weights were moved
    opt.zero_grad()
    loss.backward()
    awp.after_backward(model)
    for k, v in model.state_dict().items():  # restored bit for bit before the step
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, w0[k]), k
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()

    # independent computation: gradient of the base objective at w + v, applied to w
    torch.manual_seed(1)
    base_m = awp.base
    x_adv = base_m.adversarial(ref, x, y)
    obj, _ = base_m.objective(ref, x, x_adv, y)
    ws = [p for p in ref.parameters() if p.dim() > 1]
    g = torch.autograd.grad(obj, ws)
    with torch.no_grad():
        for w, gi in zip(ws, g):
            w.add_(gi * (0.01 * w.norm() / (gi.norm() + 1e-20)))
    obj2, _ = base_m.objective(ref, x, x_adv, y)
    g2 = dict(zip([n for n, _ in ref.named_parameters()], torch.autograd.grad(obj2, list(ref.parameters()))))
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], g2[n], atol=1e-6, rtol=1e-4), n
        assert torch.equal(p.detach(), w0[n].add(grads[n], alpha=-0.1)), n  # exactly what SGD does to w


def test_pgd_at_objective_is_ce_on_adversarial_input():
    model = create_model("tiny_cnn").eval()
    x, y = _data()
    x_adv = PGDAT(ATT).adversarial(model, x, y)
    loss, _ = PGDAT(ATT).objective(model, x, x_adv, y)
    assert loss.item() == pytest.approx(F.cross_entropy(model(x_adv), y).item(), rel=1e-6)
    assert loss.item() > F.cross_entropy(model(x), y).item()


def test_rift_interpolation_endpoints_are_exact():
    from clat.methods.rift import interpolate

    a = create_model("tiny_cnn").state_dict()
    torch.manual_seed(5)
    b = create_model("tiny_cnn").state_dict()
    for k, v in interpolate(a, b, 0.0).items():
        assert torch.equal(v, a[k])
    for k, v in interpolate(a, b, 1.0).items():
        assert torch.equal(v, b[k])
    mid = interpolate(a, b, 0.5)
    k = "features.0.0.weight"
    assert torch.allclose(mid[k], (a[k] + b[k]) / 2)


def test_rift_interpolation_follows_the_models_device():
    """A resumed RiFT stage reads θ_AT from a checkpoint on the CPU while the model is on the GPU
    (found on an H100: lerp refused cpu + cuda:0). The meta device stands in for the GPU here."""
    from clat.methods.rift import interpolate

    a = create_model("tiny_cnn").state_dict()
    b = {k: v.to("meta") for k, v in create_model("tiny_cnn").state_dict().items()}
    out = interpolate(a, b, 0.3)
    assert all(v.device.type == "meta" and v.shape == a[k].shape for k, v in out.items())


def test_rift_selects_lowest_mrc_layer_and_chooses_alpha_on_validation(tmp_path):
    import json

    from clat.training.loop import train
    from tests.test_train import FAST, tiny_splits

    over = FAST + ["pretrain.epochs=0", "finetune.method=rift", "finetune.epochs=2", "finetune.lr=0.05", "rift.batch_size=16",
                   "rift.steps=2", "rift.alphas=[0, 0.5, 1]"]
    s = train(load_config(None, over), tmp_path / "r", data=tiny_splits())
    sel = s["selection_history"][0]
    mrc = sel["criticality"]
    assert sel["selected_index"][0] == min(range(len(mrc) - 1), key=lambda i: mrc[i])  # classifier excluded
    rows = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    interp = rows[-1]["interpolation"]
    assert [c["alpha"] for c in interp["candidates"]] == [0, 0.5, 1]
    assert interp["chosen_alpha"] in (0, 0.5, 1)
    assert rows[0]["trainable_params"] < rows[0]["total_params"]


def test_lora_trains_only_adapters_and_merges_to_the_same_outputs():
    pytest.importorskip("peft")
    from clat.layers.discovery import find_layers
    from clat.methods.lora import merge_adapters

    model = create_model("tiny_cnn").eval()
    layers = find_layers(model)
    cfg = load_config(None, ["attack.steps=1", "lora.rank=2"])
    lora = create_method("lora", cfg, layers)
    plain_keys = set(model.state_dict())
    lora.setup(model)
    lora.on_epoch_start(model, None)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0] for n in trainable} == {l.name for l in layers if l.kind == "Conv2d"}
    x, y = _data()
    with torch.no_grad():  # make the adapters non-trivial (lora_B starts at zero)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    loss, _ = lora.loss(model, x, y)
    loss.backward()
    assert all((p.grad is not None) == ("lora_" in n) for n, p in model.named_parameters())
    with torch.no_grad():
        before = model(x)
    assert merge_adapters(model) == 4
    assert set(model.state_dict()) == plain_keys
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5)


def test_lora_run_saves_a_plain_checkpoint(tmp_path):
    pytest.importorskip("peft")
    from clat.runs.loading import load_model
    from clat.training.loop import train
    from tests.test_train import FAST, tiny_splits

    train(load_config(None, FAST + ["pretrain.epochs=0", "finetune.method=lora", "finetune.epochs=1"]), tmp_path / "r", data=tiny_splits())
    model, meta = load_model(tmp_path / "r")
    assert meta["model"] == "tiny_cnn"


def test_rift_resumed_mid_stage_still_interpolates(tmp_path, monkeypatch):
    from clat.runs.checkpoint import read_state_dict
    from clat.runs.folder import Checkpoints
    from clat.training.loop import train
    from tests.test_train import FAST, tiny_splits

    over = FAST + ["pretrain.epochs=0", "finetune.method=rift", "finetune.epochs=3", "rift.batch_size=16", "rift.steps=1",
                   "rift.alphas=[0, 1]"]
    train(load_config(None, over), tmp_path / "a", data=tiny_splits())
    real = Checkpoints.save

    def crash(self, epoch, *a, **k):
        out = real(self, epoch, *a, **k)
        if epoch == 1:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(Checkpoints, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, over), tmp_path / "b", data=tiny_splits())
    monkeypatch.setattr(Checkpoints, "save", real)
    train(None, tmp_path / "b", resume=True, data=tiny_splits())
    a, b = read_state_dict(tmp_path / "a" / "model.safetensors"), read_state_dict(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
