"""Issue 35: the criticality settings travel whole. ``clat stability`` and ``clat criticality`` on a run rank its layers
with the run's own ``clat.criticality`` settings and ``model.merge_norms`` (they passed only the denominator before, and
``clat stability`` found the layers without ``merge_norms``), so the rankings they report are the ones training makes."""

import json

import pytest

import clat.criticality.index
import clat.layers.discovery
import clat.analysis.stability
import clat.cli.analyses
import clat.training.warmstart
from clat.cli.main import main

Q = ["-q"]
SETTINGS = {"denominator": "input", "scaling": "sqrt_n", "point": "pre_bn", "include_classifier": True}
TINY = ["model.name=tiny_cnn", "data.dataset=bundled", "data.train_size=300", "data.val_size=100", "attack.steps=1",
        "eval.n_examples=20", "eval.steps=1", "pretrain.epochs=1", "finetune.epochs=0", "data.batch_size=100", "model.merge_norms=true",
        *(f"clat.criticality.{k}={str(v).lower()}" for k, v in SETTINGS.items())]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("crit") / "run"
    assert main([*Q, "train", *TINY, "--run-dir", str(d)]) == 0
    return d


@pytest.fixture
def seen(monkeypatch):
    """What compute_criticality and find_layers were called with."""
    calls = {"crit": [], "merge_norms": []}
    real_crit, real_find = clat.criticality.index.compute_criticality, clat.layers.discovery.find_layers

    def crit(*a, **k):
        calls["crit"].append({key: k.get(key) for key in SETTINGS})
        return real_crit(*a, **k)

    def find(*a, **k):
        calls["merge_norms"].append(k.get("merge_norms", False))
        return real_find(*a, **k)

    for mod in (clat.analysis.stability, clat.criticality.index, clat.cli.analyses):
        monkeypatch.setattr(mod, "compute_criticality", crit, raising=False)
    monkeypatch.setattr(clat.analysis.stability, "find_layers", find)
    monkeypatch.setattr(clat.layers, "find_layers", find)
    monkeypatch.setattr(clat.training.warmstart, "find_layers", find)
    return calls


def test_stability_ranks_with_the_runs_own_criticality_settings(run, seen, tmp_path):
    out = tmp_path / "stability.json"
    assert main([*Q, "stability", str(run), "--batch-sizes", "4", "--repeats", "1", "--reference-size", "20", "--k", "1",
                 "--steps", "1", "--epoch-time", "5", "--out", str(out)]) == 0
    assert seen["crit"] and all(c == SETTINGS for c in seen["crit"])
    assert seen["merge_norms"] == [True]
    assert json.loads(out.read_text())["criticality"] == {**SETTINGS, "merge_norms": True}


def test_stability_flag_overrides_one_setting_and_keeps_the_others(run, seen, tmp_path):
    assert main([*Q, "stability", str(run), "--batch-sizes", "4", "--repeats", "1", "--reference-size", "20", "--k", "1",
                 "--steps", "1", "--epoch-time", "5", "--denominator", "upstream", "--out", str(tmp_path / "s.json")]) == 0
    assert all(c == {**SETTINGS, "denominator": "upstream"} for c in seen["crit"])


def test_criticality_command_ranks_with_the_runs_own_settings(run, seen, tmp_path):
    assert main([*Q, "criticality", str(run), "--batch-size", "16", "--steps", "1", "--out", str(tmp_path / "c")]) == 0
    assert seen["crit"] == [SETTINGS]
    assert json.loads((tmp_path / "c" / "criticality.json").read_text())["settings"]["denominator"] == "input"
