"""Issue 35, item 3: evaluation from attack objects. Every evaluation attack is an `EvalAttack` registered in
`clat.eval.attacks.ATTACKS`; `EvalProtocol(threat, attacks=[...])`, `clat.benchmark(attacks=[...])` and
`clat eval --attack` take built-in names, objects and the user's own `package.module:Class`; the former keywords
still build the same protocol (with a DeprecationWarning); the sanity checks and the stability analysis use the same
objects."""

import json
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

import clat
from clat.analysis.stability import criticality_stability
import clat.cli.commands
from clat.base.errors import ConfigError
from clat.cli.main import main
from clat.data.loader import load_bundled
from clat.eval.accuracy import evaluate
from clat.eval.attacks import (ATTACKS, APGDCE, PGD, AttackContext, AttackResult, AutoAttack, EpsSweep, EvalAttack, Noise, Square,
                               resolve_attack)
from clat.eval.protocol import EvalProtocol, flag_attacks, run_protocol
from clat.eval.records import load_record
from clat.eval.sanity import Sanity
from clat.models import create_model
from clat.runs.checkpoint import save_weights

# The user's file: an attack of their own (one-step FGSM from clat's attack loop), named as package.module:Class.
USER_ATTACK = '''
from dataclasses import dataclass

import torch

from clat.attacks.threat import ce_objective, perturb
from clat.eval.attacks import AttackResult, EvalAttack


@dataclass(frozen=True)
class FGSM(EvalAttack):
    """One signed-gradient step of size eps from the clean image."""

    name = "fgsm"

    def examples(self, model, x, y, threat, *, seed=None, indices=None, stream=0):
        return perturb(ce_objective(model, y), x, threat.replace(steps=1, alpha=threat.eps, random_start=False))

    def run(self, model, x, y, threat, ctx):
        xf, yd = x.float() / 255 if x.dtype == torch.uint8 else x, y
        with torch.no_grad():
            clean = model(xf).argmax(1) == yd
        ok = clean & (model(self.examples(model, xf, yd, threat)).argmax(1) == yd)
        acc = ok.float().mean().item()
        return AttackResult({"n": len(ok), "robust_acc": acc}, {"fgsm": ok}, robust_acc=acc)


class NotAnAttack:
    pass
'''
MOD = "clat_test_user_attack"


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    d = tmp_path_factory.mktemp("user")
    (d / f"{MOD}.py").write_text(textwrap.dedent(USER_ATTACK))
    sys.path.insert(0, str(d))
    yield f"{MOD}:FGSM"
    sys.path.remove(str(d))
    sys.modules.pop(MOD, None)


@pytest.fixture(scope="module")
def data():
    _, _, x, y = load_bundled()
    return x[:24], y[:24]


def _model():
    torch.manual_seed(0)
    return create_model("tiny_cnn").eval()


T = clat.ThreatModel(steps=2)


def test_the_registry_holds_every_built_in_attack_and_each_is_an_eval_attack():
    assert {"pgd", "apgd_ce", "autoattack", "autoattack_plus", "autoattack_rand", "eps_sweep", "square", "noise",
            "sanity"} <= set(ATTACKS.names())
    for name in ATTACKS.names():
        a = resolve_attack(name)
        assert isinstance(a, EvalAttack) and a.name and isinstance(a.describe()["settings"], dict), name
    assert resolve_attack("apgd-ce") == APGDCE() and resolve_attack("autoattack-plus") == AutoAttack("plus")


def test_a_user_attack_runs_through_the_protocol(user_module, data):
    x, y = data
    r = run_protocol(_model(), x, y, EvalProtocol(T, ["pgd", user_module], batch_size=10))
    d = r.to_dict()
    assert d["fgsm"]["robust_acc"] == r.accuracies["fgsm"] and set(r.accuracies) == {"pgd", "fgsm"}
    assert r.robust_acc == min(r.pgd_acc, d["fgsm"]["robust_acc"])
    assert [c["name"] for c in d["checks"]] == ["pgd_vs_autoattack"] and "fgsm" in d["checks"][0]["title"]  # checked against PGD
    assert [a["name"] for a in d["protocol"]["attacks"]] == ["pgd", "fgsm"]  # the flags cannot say it: the attacks are listed
    assert set(r.record().outcomes) == {"clean", "pgd/run0", "pgd", "fgsm"}
    assert any(line.startswith("fgsm ") for line in r.summary_lines())
    assert r.pgd_acc == evaluate(_model(), x, y, T, seed=0, batch_size=10)["pgd_acc"]  # PGD as before


def test_a_user_attack_through_benchmark_is_the_same(user_module, data):
    x, y = data
    ref = run_protocol(_model(), x, y, EvalProtocol(T, ["pgd", user_module], batch_size=10))
    import clat_test_user_attack

    for attacks in (["pgd", user_module], ["pgd", clat_test_user_attack.FGSM()]):
        res = clat.benchmark(_model(), x, y, threat=T, attacks=attacks, batch_size=7)
        assert (res.pgd_acc, res.accuracies["fgsm"], res.robust_acc) == (ref.pgd_acc, ref.accuracies["fgsm"], ref.robust_acc)


def test_benchmark_refuses_restarts_that_no_pgd_takes(data):
    with pytest.raises(ConfigError, match=r"add 'pgd', or give PGD\(restarts=3\)"):
        clat.benchmark(_model(), data[0][:4], data[1][:4], attacks=[PGD()], restarts=3)


def test_clat_eval_attack_flag_runs_a_user_attack(user_module, tmp_path, monkeypatch, capsys):
    save_weights(tmp_path / "m.safetensors", _model(), {"model": "tiny_cnn", "num_classes": 10})
    out = tmp_path / "e.json"
    assert main(["-q", "eval", str(tmp_path / "m.safetensors"), "--dataset", "bundled", "--n-examples", "16", "--steps", "1",
                 "--attack", user_module, "--attack", "noise", "--out", str(out)]) == 0
    e = json.loads(out.read_text())
    assert 0 <= e["fgsm"]["robust_acc"] <= e["clean_acc"] and "noise" in e
    assert e["settings_tag"].endswith("_pgd1x1_clat-test-user-attack-FGSM_noise_s0")
    rec = load_record(tmp_path / "e.records.npz")
    assert {"fgsm", "noise", "pgd"} <= set(rec.outcomes) and rec.acc("fgsm") == e["fgsm"]["robust_acc"]
    assert "fgsm" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--attack", "sqaure"], "unknown attack 'sqaure'"),
    (["--attack", f"{MOD}:NotAnAttack"], "not a clat.eval.attacks.EvalAttack"),
    (["--attack", "nosuchmodule_x:Y"], "cannot import nosuchmodule_x"),
    (["--restarts", "2", "--attack", "pgd"], "one PGD"),
])
def test_a_bad_attack_stops_before_any_work_in_one_line(user_module, tmp_path, argv, message, capsys, monkeypatch):
    save_weights(tmp_path / "m.safetensors", _model(), {"model": "tiny_cnn", "num_classes": 10})
    monkeypatch.setattr(clat.cli.commands, "run_protocol", lambda *a, **k: pytest.fail("attacked before checking --attack"))
    assert main(["-q", "eval", str(tmp_path / "m.safetensors"), "--dataset", "bundled", "--out", str(tmp_path / "e.json"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "e.json").exists()


def test_the_former_keywords_build_the_same_protocol_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="restarts, autoattack, eps_sweep, sanity"):
        old = EvalProtocol(T, restarts=3, autoattack="plus", eps_sweep=(0.0, 0.01), sanity=True, square_queries=7, seed=2)
    new = EvalProtocol(T, [PGD(3), AutoAttack("plus"), EpsSweep((0.0, 0.01)), Sanity(7)], seed=2)
    assert old == new and old.to_dict() == new.to_dict() and "attacks" not in new.to_dict()
    assert new.to_dict()["restarts"] == 3 and new.to_dict()["square_queries"] == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new form warns of nothing
        assert EvalProtocol(T).attacks == (PGD(),) and EvalProtocol(T, []).attacks == ()
    assert flag_attacks(pgd=False, apgd_ce=True) == [APGDCE()]


@pytest.mark.parametrize("make, message", [
    (lambda: EvalProtocol(T, ["pgd"], restarts=2), "not both"),
    (lambda: EvalProtocol(T, [AutoAttack("standard"), AutoAttack("rand")]), "one AutoAttack version"),
    (lambda: EvalProtocol(T, [PGD(1), PGD(2)]), "one PGD"),
    (lambda: EvalProtocol(T, ["pgdd"]), "did you mean pgd"),
    (lambda: EvalProtocol(T, [42]), "an attack is an EvalAttack or its name"),
    (lambda: PGD(0), "restarts must be >= 1"),
    (lambda: EpsSweep(()), "one or more finite radii"),
    (lambda: AutoAttack("fast"), "unknown AutoAttack version"),
])
def test_bad_attacks_are_one_line_errors(make, message):
    with pytest.raises(ConfigError) as e:
        make()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_an_attack_may_not_take_another_ones_key_or_outcomes(data):
    class Clash(EvalAttack):
        name = "clash"

        def run(self, model, x, y, threat, ctx):
            return AttackResult({}, {"pgd": torch.ones(len(x), dtype=torch.bool)})

    class Flags(EvalAttack):
        name = "flags"

    with pytest.raises(ConfigError, match="outcome 'pgd'"):
        run_protocol(_model(), data[0][:4], data[1][:4], EvalProtocol(T, ["pgd", Clash()]))
    with pytest.raises(ConfigError, match="top-level key"):
        EvalProtocol(T, [Flags()])


def test_attack_objects_give_what_the_functions_gave(data):
    x, y = data
    ctx = AttackContext(seed=1, batch_size=9)
    r = PGD(restarts=2).run(_model(), x, y, T, ctx)
    ref = evaluate(_model(), x, y, T, restarts=2, seed=1, batch_size=5)
    assert r.robust_acc == ref["pgd_acc"] and r.details["pgd_acc_per_restart"] == ref["pgd_acc_per_restart"]
    sweep = EpsSweep().run(_model(), x, y, T, ctx).details  # default radii: ε × (0, 1/4, 1/2, 1, 2)
    assert [p["eps"] for p in sweep["points"]] == [0, T.eps / 4, T.eps / 2, T.eps, 2 * T.eps]
    noise = Noise().run(_model(), x, y, T, ctx)
    assert noise.outcomes["noise"].shape == (len(x),) and noise.robust_acc <= r.details["clean_acc"]
    sq = Square(n_queries=5).run(_model(), x[:6], y[:6], T, ctx)
    assert sq.outcomes["square"].dtype == torch.bool and sq.details["n_queries"] == 5


def test_stability_measures_criticality_on_an_attack_objects_examples(user_module, data):
    xtr, ytr = load_bundled()[:2]
    kw = dict(batch_sizes=(4,), repeats=1, reference_size=8, k=2, threat=clat.ThreatModel(steps=1))
    torch.manual_seed(3)
    default = criticality_stability(_model(), xtr[:30], ytr[:30], **kw)
    torch.manual_seed(3)
    explicit = criticality_stability(_model(), xtr[:30], ytr[:30], attack=PGD(), **kw)
    assert explicit["attack"].pop("evaluation_attack")["name"] == "pgd"
    assert [r["top_k"] for r in default["rows"]] == [r["top_k"] for r in explicit["rows"]]
    assert default["reference"]["top_k"] == explicit["reference"]["top_k"] and "evaluation_attack" not in default["attack"]
    own = criticality_stability(_model(), xtr[:30], ytr[:30], attack=user_module, **kw)
    assert own["attack"]["evaluation_attack"]["name"] == "fgsm" and own["rows"][0]["batch_size"] == 4
    with pytest.raises(ConfigError, match="no adversarial examples"):
        criticality_stability(_model(), xtr[:30], ytr[:30], attack="noise", **kw)


def test_records_of_a_protocol_of_objects_equal_those_of_the_flags(data):
    x, y = data
    with pytest.warns(DeprecationWarning):
        old = run_protocol(_model(), x, y, EvalProtocol(T, restarts=2, seed=4, batch_size=10), index_offset=3)
    new = run_protocol(_model(), x, y, EvalProtocol(T, [PGD(restarts=2)], seed=4, batch_size=10), index_offset=3)
    a, b = old.record(), new.record()
    assert a.meta == b.meta and list(a.outcomes) == list(b.outcomes)
    assert all(np.array_equal(a.outcomes[k], b.outcomes[k]) for k in a.outcomes)
