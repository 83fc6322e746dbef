"""clat.benchmark: any model scored with clat eval's protocol in one call, and clat.runs.loading.load_model's mode."""

import json
import warnings

import pytest
import torch
from torch import nn

import clat
from clat.runs.checkpoint import save_weights
from clat.runs.loading import load_model
from clat.cli.main import main
from clat.data.loader import load_bundled
from clat.models import create_model
from clat.eval.protocol import EvalResult


@pytest.fixture(scope="module")
def test_split():
    _, _, x, y = load_bundled()
    return x, y


def _model(seed=0):
    torch.manual_seed(seed)
    return create_model("tiny_cnn")


def test_benchmark_equals_clat_eval_on_the_same_images(test_split, tmp_path, capsys):
    """The subset, the seeded starts and every number are those of `clat eval --n-examples N --seed S`."""
    x, y = test_split
    model = _model()
    save_weights(tmp_path / "m.safetensors", model, {"model": "tiny_cnn", "num_classes": 10})
    assert main(["-q", "eval", str(tmp_path / "m.safetensors"), "--dataset", "bundled", "--n-examples", "30", "--steps", "2",
                 "--restarts", "2", "--seed", "3", "--out", str(tmp_path / "e.json")]) == 0
    cli = json.loads((tmp_path / "e.json").read_text())
    res = clat.benchmark(model, x, y, threat=clat.ThreatModel(alpha=2 / 255, steps=2), attacks="pgd", restarts=2, n_examples=30, seed=3,
                         batch_size=7)
    assert isinstance(res, EvalResult) and res.n == 30 and res.autoattack_acc is None
    for key in ("clean_acc", "pgd_acc", "pgd_acc_per_restart", "pgd_acc_lowest_run"):
        assert res.to_dict()[key] == cli[key], key
    assert res.robust_acc == res.pgd_acc and res.flags == []


def test_numpy_images_in_either_layout_and_the_models_mode(test_split):
    x, y = test_split[0][:16], test_split[1][:16]
    model = _model().train()
    ref = clat.benchmark(model, x, y, threat=clat.ThreatModel(steps=1), attacks=["pgd"])
    assert model.training and all(m.training for m in model.modules())  # evaluated in eval mode, handed back as it came
    nhwc = x.permute(0, 2, 3, 1).numpy()
    for xs, ys in ((nhwc, y.numpy()), (nhwc.astype("float32") / 255, y.numpy().astype("int32"))):
        res = clat.benchmark(model, xs, ys, threat=clat.ThreatModel(steps=1), attacks=["pgd"])
        assert (res.clean_acc, res.pgd_acc) == (ref.clean_acc, ref.pgd_acc)


def test_autoattack_side_and_the_lowest_robust_accuracy(test_split):
    x, y = test_split[0][:12], test_split[1][:12]
    res = clat.benchmark(_model(), x, y, threat=clat.ThreatModel(steps=2), attacks=["pgd", "apgd_ce"])
    assert res.apgd_ce_acc is not None and res.robust_acc == min(res.pgd_acc, res.apgd_ce_acc)
    assert res.to_dict()["apgd_ce"]["library"].startswith("pyautoattack")
    clean = clat.benchmark(_model(), x, y, attacks=[])  # clean accuracy alone
    assert clean.pgd_acc is None and clean.robust_acc is None and clean.clean_acc == res.clean_acc


def test_flags_are_warnings_too(test_split, monkeypatch):
    import clat.eval.benchmark

    real = clat.eval.benchmark.run_protocol

    def flagged(*a, **k):
        r = real(*a, **k)
        return EvalResult(r.n, r.clean_acc, r.pgd_acc, None, None, ["possible gradient masking: a test flag"], r.details)

    monkeypatch.setattr(clat.eval.benchmark, "run_protocol", flagged)
    with pytest.warns(UserWarning, match="possible gradient masking: a test flag"):
        res = clat.benchmark(_model(), test_split[0][:4], test_split[1][:4], threat=clat.ThreatModel(steps=1), attacks="pgd")
    assert res.flags == ["possible gradient masking: a test flag"]


class _NoParams(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10]


@pytest.mark.parametrize("call, message", [
    (lambda m, x, y: clat.benchmark(m, x, y, attacks=["pgd", "autoatack"]), "unknown attack 'autoatack' for clat.benchmark; did you mean "
                                                                            "autoattack?"),
    (lambda m, x, y: clat.benchmark(m, x, y, attacks=["autoattack", "autoattack-plus"]), "one AutoAttack version"),
    (lambda m, x, y: clat.benchmark(m, x.float(), y), "float x must lie in [0, 1], got values from 0 to 255; divide them by 255"),
    (lambda m, x, y: clat.benchmark(m, x, y + 5), "y holds the label 14 but the model has 10 outputs (classes 0..9)"),
    (lambda m, x, y: clat.benchmark(m, x, y[:3]), "x has 4 images but y has 3 labels"),
    (lambda m, x, y: clat.benchmark(m, x, y, n_examples=5), "n_examples must be an integer from 1 to the 4 images given, got 5"),
    (lambda m, x, y: clat.benchmark(m, x, y, threat=8 / 255), "must be a clat.attacks.threat.ThreatModel"),
    (lambda m, x, y: clat.benchmark(m.state_dict(), x, y), "clat.benchmark scores an nn.Module, got OrderedDict"),
    (lambda m, x, y: clat.benchmark(_NoParams(), x, y), "the model has no parameters"),
])
def test_a_bad_argument_is_one_line(test_split, call, message):
    x, y = test_split[0][:4], test_split[1][:4].clone()
    y[0] = 9
    with pytest.raises(clat.ClatError) as e:
        call(_model(), x, y)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_load_model_returns_eval_mode(tmp_path):
    """RobustBench's load_model returns eval mode; so does clat's (it returned train mode before 0.2)."""
    model = _model()
    save_weights(tmp_path / "m.safetensors", model, {"model": "tiny_cnn", "num_classes": 10})
    torch.save(model.state_dict(), tmp_path / "m.pt")
    for path, name in ((tmp_path / "m.safetensors", None), (tmp_path / "m.pt", "tiny_cnn")):
        loaded, _ = load_model(path, model_name=name)
        assert not any(m.training for m in loaded.modules()), path
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            x = torch.rand(2, 3, 32, 32)
            assert torch.equal(loaded(x), loaded(x))  # no batch statistics: the same input gives the same output
