"""The study's one command (scripts/study.py) runs end to end at toy size and resumes."""

import importlib
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_study_pipeline_at_toy_size_renders_results_and_resumes(tmp_path, shared_cifar, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    for m in ("study", "study_report"):
        sys.modules.pop(m, None)
    study = importlib.import_module("study")
    monkeypatch.setattr(study, "ARMS", {k: study.ARMS[k] for k in ("pgd_at_cont", "clat", "trades_cont", "trades_clat")})
    monkeypatch.setattr(study, "CLAT_ARMS", {"clat", "trades_clat"})
    assert study.main(["--smoke", str(tmp_path), "--hours", "0"]) == 0  # budget spent at once: nothing done, report renders
    assert "0 of" in (tmp_path / "results.md").read_text()

    # a session that ends after two epochs of pretraining: the run is kept in study/partial/ ...
    real_check, calls = study.Budget.check, []

    def two_epochs(self):
        calls.append(1)
        if len(calls) > 2:
            raise study.OutOfTime
        real_check(self)

    monkeypatch.setattr(study.Budget, "check", two_epochs)
    assert study.main(["--smoke", str(tmp_path)]) == 0
    partial = tmp_path / "study" / "partial" / "pgd_at_pretrain"
    assert len((partial / "metrics.jsonl").read_text().splitlines()) == 2
    # ... and the next session, on a fresh clone (no runs/), continues it from epoch 3
    import shutil

    shutil.rmtree(tmp_path / "runs")
    monkeypatch.setattr(study.Budget, "check", real_check)
    assert study.main(["--smoke", str(tmp_path)]) == 0
    assert not partial.exists()
    pre = json.loads((tmp_path / "study" / "results" / "pgd_at_pretrain.json").read_text())
    assert [r["epoch"] for r in pre["rows"]] == [1, 2, 3]
    text = (tmp_path / "results.md").read_text()
    assert "the study is complete" in text and "TRADES + CLAT − TRADES continued" in text
    r = json.loads((tmp_path / "study" / "results" / "clat_s1.json").read_text())
    assert r["trainable_params"] < r["total_params"] and r["test"]["n_aa"] == 8 and len(r["rows"]) == 2
    assert r["test"]["aa_acc"] <= r["test"]["aa_clean_acc"]
    for img in ("study_overfitting.png", "study_curves.png", "study_criticality.png"):
        assert (tmp_path / "img" / img).stat().st_size > 1000
    for m in ("study", "study_report"):
        sys.modules.pop(m, None)
