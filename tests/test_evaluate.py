"""Evaluation: PGD with seeded per-example starts, AutoAttack (pyautoattack), transfer,
ε sweep, criticality stability, and the `clat eval / transfer / stability` commands."""

import json

import pytest
import torch

from clat.runs.checkpoint import save_weights
from clat.cli.main import main
from clat.data.loader import load_bundled
from clat.base.errors import ClatError
from clat.attacks.threat import ThreatModel
from clat.eval.autoattack import autoattack
from clat.eval.accuracy import eps_sweep, evaluate, pgd_correct, seeded_start, transfer_matrix
from clat.analysis.stability import criticality_stability, measure_pgd_at_epoch_time
from clat.models import create_model

EPS = 8 / 255


@pytest.fixture(scope="module")
def data():
    _, _, x, y = load_bundled()
    return x[:24], y[:24]


def _model(seed=0):
    torch.manual_seed(seed)
    return create_model("tiny_cnn").eval()


def _without_time(d):
    return {k: v for k, v in d.items() if k != "time_s"}


def test_seeded_starts_do_not_depend_on_batching():
    full = seeded_start((3, 4, 4), range(10), ThreatModel(eps=EPS), seed=3)
    part = seeded_start((3, 4, 4), [4, 5, 6], ThreatModel(eps=EPS), seed=3)
    assert torch.equal(full[4:7], part)
    assert full.abs().max() <= EPS and not torch.equal(full, seeded_start((3, 4, 4), range(10), ThreatModel(eps=EPS), seed=4))
    l2 = seeded_start((3, 4, 4), range(10), ThreatModel("l2", eps=0.5), seed=0)
    assert l2.flatten(1).norm(dim=1).max() <= 0.5 + 1e-6


def test_result_does_not_depend_on_batch_size(data):
    x, y = data
    m = _model()
    state = torch.get_rng_state()
    a = evaluate(m, x, y, ThreatModel(steps=3), restarts=2, batch_size=7, seed=1)
    b = evaluate(m, x, y, ThreatModel(steps=3), restarts=2, batch_size=64, seed=1)
    assert _without_time(a) == _without_time(b)
    assert torch.equal(torch.get_rng_state(), state)  # seeded evaluation leaves the global RNG alone
    ca, ra = pgd_correct(m, x, y, ThreatModel(steps=3), restarts=2, batch_size=5, seed=1)
    cb, rb = pgd_correct(m, x, y, ThreatModel(steps=3), restarts=2, batch_size=24, seed=1)
    assert torch.equal(ca, cb) and torch.equal(ra, rb)


def test_restart_statistics(data):
    x, y = data
    r = evaluate(_model(), x, y, ThreatModel(steps=2), restarts=3, seed=0)
    assert len(r["pgd_acc_per_restart"]) == 3
    assert r["pgd_acc_lowest_run"] == min(r["pgd_acc_per_restart"])
    assert r["pgd_acc"] <= r["pgd_acc_lowest_run"] <= r["pgd_acc_mean_run"] <= r["clean_acc"]
    assert r["attack"]["random_start"] == "per-example, seeded"
    clean_only = evaluate(_model(), x, y, attack=False)
    assert "pgd_acc" not in clean_only and clean_only["clean_acc"] == r["clean_acc"]


def test_l2_and_uint8_and_float_inputs_agree(data):
    x, y = data
    m = _model()
    a = evaluate(m, x, y, ThreatModel("l2", eps=0.5, alpha=0.2, steps=2), seed=0)
    b = evaluate(m, x.float() / 255, y, ThreatModel("l2", eps=0.5, alpha=0.2, steps=2), seed=0)
    assert _without_time(a) == _without_time(b)


def test_eps_sweep(data):
    x, y = data
    m = _model()
    s = eps_sweep(m, x, y, [8 / 255, 0, 0.5], ThreatModel(steps=3))
    assert [p["eps"] for p in s["points"]] == [0, 8 / 255, 0.5]
    assert s["points"][0]["acc"] == s["clean_acc"] == evaluate(m, x, y, attack=False)["clean_acc"]
    assert s["points"][2]["acc"] <= s["points"][1]["acc"] <= s["points"][0]["acc"]
    assert s["points"][1]["acc"] == evaluate(m, x, y, ThreatModel(steps=3), seed=0)["pgd_acc"]  # same seeded starts


def test_transfer_matrix_shape_and_diagonal(data):
    x, y = data
    models = {"a": _model(0), "b": _model(1), "c": _model(2)}
    t = transfer_matrix(models, x, y, ThreatModel(steps=2), restarts=2, batch_size=10, seed=5)
    assert t["names"] == ["a", "b", "c"] and len(t["matrix"]) == 3 and all(len(r) == 3 for r in t["matrix"])
    for i, (name, m) in enumerate(models.items()):
        white = evaluate(m, x, y, ThreatModel(steps=2), restarts=2, batch_size=64, seed=5)
        assert t["matrix"][i][i] == white["pgd_acc"]
        assert t["clean_acc"][name] == white["clean_acc"]
        assert all(t["matrix"][j][i] <= white["clean_acc"] for j in range(3))


def test_apgd_ce_from_pyautoattack_is_quiet_and_checked(data, capsys):
    x, _ = data
    m = _model()
    x = x[:8]
    with torch.no_grad():
        y = m(x.float() / 255).argmax(1)  # every example starts correct: the attack has work to do
    y[0] = (y[0] + 1) % 10  # and one starts wrong
    state = torch.get_rng_state()
    r = autoattack(m, x, y, version="apgd-ce", device="cpu")
    assert capsys.readouterr() == ("", "")  # the library's printing and logging are captured
    assert torch.equal(torch.get_rng_state(), state)
    assert r["attacks"] == ["apgd-ce"] and r["apgd_restarts"] == 1 and r["library"].startswith("pyautoattack")
    assert r["within_eps"] and r["max_perturbation"] <= EPS + 1e-6
    assert 0 <= r["robust_acc"] <= r["clean_acc"] == evaluate(m, x, y, attack=False)["clean_acc"]
    assert r["n"] == 8
    assert r["clean_acc"] == 7 / 8 and set(r["robust_acc_after"]) == {"apgd-ce"}


@pytest.mark.slow
def test_standard_autoattack(data):
    x, _ = data
    m = _model()
    x = x[:8]
    with torch.no_grad():
        y = m(x.float() / 255).argmax(1)
    pgd = evaluate(m, x, y, ThreatModel(steps=10), seed=0)
    r = autoattack(m, x, y, version="standard", device="cpu")
    assert r["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"] and r["clean_acc"] == 1.0
    assert r["within_eps"] and r["robust_acc"] <= pgd["clean_acc"]
    assert list(r["robust_acc_after"]) == r["attacks"] and r["robust_acc_after"]["square"] == r["robust_acc"]
    # the time of each attack that ran (what a screening with the first stages would save is the others')
    by = r["time_s_by_attack"]
    assert list(by) == [a for a in r["attacks"] if a in by] and "apgd-ce" in by and all(v > 0 for v in by.values())
    assert sum(by.values()) <= r["time_s"]


def test_gradient_free_model_gives_a_clear_error(data):
    class ArgMax(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = _model()

        def forward(self, x):
            return torch.nn.functional.one_hot(self.m(x).argmax(1), 10).float()

    x, y = data
    with pytest.raises(ClatError, match="gradient masking"):
        evaluate(ArgMax(), x[:4], y[:4], ThreatModel(steps=1), seed=0)


def test_criticality_stability(data):
    xtr, ytr, _, _ = load_bundled()
    m = _model()
    s = criticality_stability(m, xtr[:40], ytr[:40], batch_sizes=(4, 8), repeats=2, reference_size=16, k=2, threat=ThreatModel(steps=1),
                              epoch_time_s=10.0)
    assert s["k"] == 2 and len(s["reference"]["top_k"]) == 2 and [r["batch_size"] for r in s["rows"]] == [4, 8]
    for r in s["rows"]:
        assert len(r["top_k"]) == 2 and all(len(t) == 2 for t in r["top_k"])
        assert 0 <= r["same_order"] <= r["same_set"] <= r["overlap_mean"] <= 1 and -1 <= r["spearman_mean"] <= 1
        assert r["fraction_of_epoch"] == pytest.approx(r["time_s_mean"] / 10.0)
    # a top-k covering every eligible layer would agree trivially: k is lowered
    s = criticality_stability(m, xtr[:30], ytr[:30], batch_sizes=(4,), repeats=1, reference_size=8, k=10, threat=ThreatModel(steps=1))
    assert s["eligible_layers"] == 4 and s["k"] == 3 and "fraction_of_epoch" not in s["rows"][0]


def test_measure_epoch_time_leaves_the_model_alone(data):
    x, y = data
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    t = measure_pgd_at_epoch_time(m, x, y, n_train=48, batch_size=8, threat=ThreatModel(steps=1), n_batches=1)
    assert t > 0
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


# -- command line ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    for i in range(2):
        save_weights(d / f"m{i}.safetensors", _model(i), {"model": "tiny_cnn", "num_classes": 10})
    return d


def test_cli_eval_everything(ckpts, capsys):
    out = ckpts / "eval.json"
    argv = ["-q", "eval", str(ckpts / "m0.safetensors"), "--n-examples", "8", "--steps", "2", "--restarts", "2", "--apgd-ce",
            "--eps-sweep", "0,8/255,0.5", "--sanity", "--square-queries", "20", "--surrogate", str(ckpts / "m1.safetensors"),
            "--batch-size", "5", "--out", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert res["n"] == 8 and len(res["pgd_acc_per_restart"]) == 2 and "PGD-2" in printed and "APGD-CE" in printed
    assert res["apgd_ce"]["n"] == 8 and [p["eps"] for p in res["eps_sweep"]["points"]] == [0, 8 / 255, 0.5]
    names = {c["name"] for c in res["sanity"]["checks"]}
    assert {"more_steps", "more_restarts", "black_box", "eps_monotone", "large_eps", "noise", "gradient"} <= names
    assert "transfer from m1.safetensors" in next(c for c in res["sanity"]["checks"] if c["name"] == "black_box")["values"]["black_box_acc"]
    # every raised flag is stored and printed
    assert len(res["flags"]) == printed.count("WARNING:")
    for f in res["sanity"]["flags"]:
        assert f"WARNING: {f}" in printed and f.startswith("possible gradient masking")


def test_cli_transfer(ckpts, capsys):
    out = ckpts / "t" / "transfer.json"
    assert main(["-q", "transfer", str(ckpts / "m0.safetensors"), str(ckpts / "m1.safetensors"), "--names", "A,B",
                 "--n-examples", "6", "--steps", "1", "--out", str(out)]) == 0
    t = json.loads(out.read_text())
    assert t["names"] == ["A", "B"] and len(t["matrix"]) == 2 and t["n"] == 6
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "attacker" in capsys.readouterr().out
    assert main(["-q", "transfer", str(ckpts / "m0.safetensors"), "--names", "A,B"]) == 2


def test_cli_stability(ckpts):
    out = ckpts / "stability.json"
    assert main(["-q", "stability", str(ckpts / "m0.safetensors"), "--batch-sizes", "4,6", "--repeats", "1", "--reference-size", "20",
                 "--k", "2", "--steps", "1", "--epoch-time", "5", "--out", str(out)]) == 0
    s = json.loads(out.read_text())
    assert [r["batch_size"] for r in s["rows"]] == [4, 6] and s["epoch_time_s"] == 5 and "--epoch-time" in s["epoch_time_source"]


def test_run_protocol_is_what_clat_eval_runs(data):
    """The library's evaluation policy: a typed result whose headline numbers are those of the pieces it ran,
    with AutoAttack checked against PGD."""
    from clat import EvalProtocol, run_protocol

    x, y = data
    m = _model()
    threat = ThreatModel(steps=2)
    r = run_protocol(m, x[:12], y[:12], EvalProtocol(threat, restarts=2, apgd_ce=True, eps_sweep=(0.0, 8 / 255), seed=3))
    alone = evaluate(m, x[:12], y[:12], threat, restarts=2, seed=3)
    assert (r.n, r.clean_acc, r.pgd_acc) == (12, alone["clean_acc"], alone["pgd_acc"])
    assert r.apgd_ce_acc == r.to_dict()["apgd_ce"]["robust_acc"] and r.autoattack_acc is None
    assert r.robust_acc == min(r.pgd_acc, r.apgd_ce_acc)
    assert [c["name"] for c in r.to_dict()["checks"]] == ["pgd_vs_autoattack"] and r.flags == r.to_dict()["flags"]
    assert r.to_dict()["protocol"]["threat"] == threat.to_dict() and len(r.summary_lines()) == 4
    json.dumps(r.to_dict())
    with pytest.raises(ClatError, match="restarts"):
        EvalProtocol(restarts=0)
    with pytest.raises(ClatError, match="ThreatModel"):
        EvalProtocol({"eps": 8 / 255})
