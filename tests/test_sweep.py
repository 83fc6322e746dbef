"""The layer oracle (``clat layer-sweep``) and the estimators it scores, at toy size."""

import json

import pytest
import torch

from clat.runs.checkpoint import save_weights
from clat.cli.main import main
from clat.criticality.estimators import compute_estimates, regret, score, spearman
from clat.layers.discovery import find_layers
from clat.models import create_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    torch.manual_seed(0)
    save_weights(d / "start.safetensors", create_model("tiny_cnn"), {"model": "tiny_cnn", "num_classes": 10})
    return d / "start.safetensors"


TOY = ["model.name=tiny_cnn", "data.dataset=bundled", "data.train_size=200", "data.val_size=40", "data.batch_size=50",
       "attack.steps=1", "clat.criticality.steps=1", "clat.criticality.batch_size=16", "finetune.lr=0.01"]


def test_layer_sweep_runs_resumes_and_reports(ckpt, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["-q", "layer-sweep", *TOY, f"init={ckpt}", "--out", str(out), "--epochs", "1", "--seeds", "0", "1", "--layers", "0", "1", "2",
            "--val-steps", "1", "--n-val", "20"]
    assert main([*argv, "--hours", "0.000001"]) == 0  # the budget ends after the shared items: nothing lost
    assert (out / "start.json").is_file() and (out / "estimators.json").is_file() and not list((out / "items").glob("*.json"))
    assert main(argv) == 0
    items = sorted(p.name for p in (out / "items").glob("*.json"))
    assert items == ["00_s0.json", "00_s1.json", "01_s0.json", "01_s1.json", "02_s0.json", "02_s1.json", "full_s0.json", "full_s1.json"]
    # seed by seed, each seed's reference right after its layers (a sweep stopped half-way is a whole comparison)
    order = [p.name for p in sorted((out / "items").glob("*.json"), key=lambda p: p.stat().st_mtime_ns)]
    assert order == ["00_s0.json", "01_s0.json", "02_s0.json", "full_s0.json", "00_s1.json", "01_s1.json", "02_s1.json", "full_s1.json"]
    one = json.loads((out / "items" / "01_s0.json").read_text())
    assert one["trainable_params"] < 20_000 and one["val"]["n"] == 20 and one["name"] == find_layers(create_model("tiny_cnn"))[1].name
    # every measurement keeps its per-image record beside its JSON (issue 34), keyed by validation-split positions
    from clat.eval.records import load_record, paired_difference

    rec = load_record(out / "items" / "01_s0.records.npz")
    assert rec.n == 20 and rec.meta["split"] == "val" and rec.meta["item"] == "01_s0" and list(rec.indices) == list(range(20))
    assert abs(rec["pgd"].mean() - one["val"]["pgd_acc"]) < 1e-9 and abs(rec["clean"].mean() - one["val"]["clean_acc"]) < 1e-9
    assert load_record(out / "start.records.npz").meta["item"] == "start"
    assert paired_difference(rec, load_record(out / "items" / "full_s0.records.npz"), "pgd")
    before = {p.name: p.read_bytes() for p in (out / "items").glob("*.json")}
    assert main(argv) == 0  # done: a second call changes nothing
    assert {p.name: p.read_bytes() for p in (out / "items").glob("*.json")} == before
    report = (out / "report.md").read_text()
    assert "Estimators against the oracle" in report and "random (expectation)" in report and (out / "oracle.png").stat().st_size > 1000
    scores = json.loads((out / "scores.json").read_text())
    assert {r["estimator"] for r in scores} >= {"paper", "input", "exact_eq5", "fisher", "rift", "params", "depth", "random"}
    # other settings into the same folder are refused
    assert main([*argv[:-2], "--n-val", "10"]) == 2


def test_layer_sweep_pgd_at_objective_trains_only_the_layer(ckpt, tmp_path):
    out = tmp_path / "sweep"
    assert main(["-q", "layer-sweep", *TOY, f"init={ckpt}", "--out", str(out), "--epochs", "1", "--seeds", "0", "--layers", "2",
                 "--objective", "pgd_at", "--no-reference", "--val-steps", "1", "--n-val", "10"]) == 0
    run = out / "runs" / "02_s0"
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["selected"] == [find_layers(create_model("tiny_cnn"))[2].name] and "feature_dist" not in rows[0]["train"]


def test_estimators_on_a_model():
    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    layers = find_layers(model)
    x, y = torch.rand(12, 3, 32, 32), torch.randint(0, 10, (12,))
    from clat.attacks.threat import ThreatModel

    est = compute_estimates(model, layers, x, y, ThreatModel(steps=1), rift_steps=1)
    assert all(len(v) == len(layers) for v in est.values())
    assert est["params"] == [float(l.num_params) for l in layers] and est["depth"] == [float(l.index) for l in layers]
    assert all(v > 0 for v in est["fisher"]) and all(v > 0 for v in est["exact_eq5"])
    # on a chain the exact Eq. 5 weakness (an attack per layer) is at least the one-attack weakness for the first layer
    assert est["exact_eq5"][0] >= est["paper"][0] * 0.999


def test_scoring():
    gains = [[0.01, 0.02], [0.03, 0.03], [-0.01, 0.0], [0.02, 0.02]]
    perfect = [2.0, 4.0, 1.0, 3.0]
    s = score(perfect, gains, n_boot=200)
    assert s["rho"] == pytest.approx(1.0) and s["regret_top1"] == 0 and s["regret_top2"] == 0
    worst = [-v for v in perfect]
    w = score(worst, gains, n_boot=200)
    assert w["rho"] == pytest.approx(-1.0) and w["regret_top1"] == pytest.approx(0.03 - (-0.005))
    r = score(None, gains, n_boot=500)
    assert -0.3 < r["rho"] < 0.3 and r["regret_top1"] > 0
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1) and regret([1, 0], [0.0, 1.0], 1) == 1.0
