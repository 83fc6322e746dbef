"""scripts/criticality_study.py: the layer oracle's sweeps (docs/criticality.md), the one from the overfitted start included."""

import importlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cs(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    for m in ("criticality_study", "study", "study_settings"):
        sys.modules.pop(m, None)
    yield importlib.import_module("criticality_study")
    for m in ("criticality_study", "study", "study_settings"):
        sys.modules.pop(m, None)


def test_the_overfitted_start_sweep_waits_for_the_variant_and_uses_a_fixed_lambda(cs, tmp_path, monkeypatch, capsys):
    """Issue 34: the oracle re-run from the last pretraining epoch starts from the checkpoint the study's
    resnet18_w16_last variant writes, with a fixed λ; until that exists the sweep waits (and the page says so)."""
    import study

    spec = cs.SWEEPS["resnet18_w16_last"]
    assert spec["init"] == study.StudySettings.variant("resnet18_w16_last").ckpts / "pgd_at_branch.safetensors"
    fixed, auto = cs.settings(spec), cs.settings(cs.SWEEPS["resnet18_w16"])
    assert (fixed.lam_mode, fixed.lam) == ("fixed", 0.1) and auto.lam_mode == "auto"
    monkeypatch.setattr(cs, "SWEEPS", {"resnet18_w16_last": {**spec, "init": tmp_path / "missing.safetensors"}})
    monkeypatch.setattr(cs, "OUT", tmp_path / "criticality")
    monkeypatch.setattr(cs, "DOC", tmp_path / "criticality.md")
    monkeypatch.setattr(cs, "IMG", tmp_path / "img")
    cs.run_all(0.01)  # nothing to sweep: it says what it waits for
    assert "waits for its start" in capsys.readouterr().out
    cs.render()
    page = (tmp_path / "criticality.md").read_text()
    assert "Not run yet. It starts from the checkpoint `python scripts/study.py --variant resnet18_w16_last` writes." in page
    assert "<!-- doc-test: skip" in page  # the page is generated: the mark of its long-running block is written with it
