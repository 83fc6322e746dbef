"""Reports render from stored JSON alone (fixtures written here); nothing is re-run."""

import importlib
import json

import pytest

from clat.cli.main import main
from clat.analysis.plots import plot_curves
from clat.analysis.comparison import comparison_report
from clat.analysis.report import method_label, parameter_efficiency, run_report

LAYERS = ["features.0.0", "features.1.0", "features.2.0", "features.3.0", "classifier"]


def _rows(finetune: str) -> list[dict]:
    rows = []
    for e in range(1, 6):
        stage, method = ("pretrain", "pgd_at") if e <= 3 else ("finetune", finetune)
        clat_stage = method == "clat"
        row = {
            "epoch": e, "stage": stage, "method": method, "lr": 0.01, "train": {"loss": 2.3 - 0.1 * e},
            "trainable_params": 73728 if clat_stage else 98666, "total_params": 98666,
            "optimizer_state_bytes": (73728 if clat_stage else 98666) * 4, "epoch_time_s": 10.0 + e, "time_s": 12.0 + e,
            "val": {"clean_acc": 0.2 + 0.02 * e, "pgd_acc": 0.1 + 0.01 * e, "n": 500},
        }
        if clat_stage:
            row["selected"] = ["features.3.0"]
            row["selection"] = {"epoch": e - 1, "stage_epoch": e - 4, "selected": ["features.3.0"], "selected_index": [3],
                                "criticality": [0.01, 1.1, 1.3, 1.9 + 0.1 * e, 0.5], "weakness": [0.01] * 5, "trainable_params": 73728,
                                "lam": 0.01}
        rows.append(row)
    return rows


def _sanity(flag: bool) -> dict:
    checks = [
        {"name": "noise", "title": "PGD hurts more than random noise of the same ε", "flag": flag,
         "message": "uniform noise 30.0% vs PGD-10 " + ("30.0%: PGD is no stronger than random noise" if flag else "12.0%"), "values": {}},
        {"name": "gradient", "title": "input gradients are non-zero", "flag": False, "message": "zero for 0/200 examples", "values": {}},
    ]
    flags = [f"possible gradient masking: {c['title']}: {c['message']}" for c in checks if c["flag"]]
    return {"n": 200, "settings": {"eps": 8 / 255, "norm": "linf"}, "checks": checks, "flags": flags, "gradient_masking_suspected": flag}


def _eval(clean: float, pgd: float, aa: float, flag: bool) -> dict:
    sweep = [{"eps": e, "alpha": e / 4, "acc": max(0.0, clean - 12 * e)} for e in (0, 2 / 255, 4 / 255, 8 / 255, 16 / 255)]
    sanity = _sanity(flag)
    return {
        "n": 200, "clean_acc": clean, "pgd_acc": pgd, "pgd_acc_per_restart": [pgd + 0.01, pgd + 0.005], "pgd_acc_lowest_run": pgd + 0.005,
        "pgd_acc_mean_run": pgd + 0.0075,
        "attack": {"name": "pgd", "norm": "linf", "eps": 8 / 255, "alpha": 2 / 255, "steps": 10, "restarts": 2,
                   "random_start": "per-example, seeded", "seed": 0},
        "autoattack": {"n": 200, "library": "pyautoattack 0.2.0", "version": "standard",
                       "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"],
                       "clean_acc": clean, "robust_acc": aa,
                       "robust_acc_after": {"apgd-ce": aa + 0.01, "apgd-t": aa, "fab-t": aa, "square": aa},
                       "time_s": 60.0, "warnings": [], "within_eps": True, "max_perturbation": 8 / 255},
        "eps_sweep": {"n": 200, "norm": "linf", "steps": 10, "restarts": 1, "alpha_ratio": 0.25, "seed": 0, "clean_acc": clean,
                      "points": sweep},
        "sanity": sanity,
        "flags": sanity["flags"],
    }


def _write_run(d, finetune: str, clean: float, pgd: float, aa: float, flag: bool) -> None:
    d.mkdir(parents=True)
    rows = _rows(finetune)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "config.yaml").write_text("data: {dataset: bundled}\nmodel: {name: tiny_cnn}\n")
    summary = {"run_dir": str(d), "data": "CIFAR-10 subset", "model": {"model": "tiny_cnn", "num_classes": 10}, "epochs": 5,
               "selection_history": [r["selection"] for r in rows if "selection" in r], "total_params": 98666, "layers": 5}
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "eval.json").write_text(json.dumps(_eval(clean, pgd, aa, flag)))
    (d / "stability.json").write_text(json.dumps({
        "k": 2, "layers": LAYERS, "reference": {"size": 500, "top_k": [3, 2], "names": ["features.3.0", "features.2.0"], "time_s": 1.0},
        "repeats": 3, "attack": {"eps": 8 / 255, "alpha": 2 / 255, "steps": 10}, "seed": 0, "epoch_time_s": 11.0,
        "epoch_time_source": "metrics",
        "rows": [{"batch_size": b, "top_k": [[3, 2]] * 3, "overlap_mean": 1.0, "same_set": 1.0, "top1_agrees": 1.0,
                                                   "time_s_mean": 0.01 * b, "fraction_of_epoch": 0.01 * b / 11} for b in (10, 30, 50, 100)],
    }))


TRANSFER = {"names": ["PGD-AT + CLAT", "PGD-AT"], "n": 200, "matrix": [[0.19, 0.25], [0.27, 0.20]],
            "clean_acc": {"PGD-AT + CLAT": 0.31, "PGD-AT": 0.30},
            "attack": {"name": "pgd", "norm": "linf", "eps": 8 / 255, "alpha": 2 / 255, "steps": 10, "restarts": 1, "seed": 0}}


@pytest.fixture
def runs(tmp_path, monkeypatch):
    _write_run(tmp_path / "a", "clat", 0.31, 0.19, 0.17, flag=False)
    _write_run(tmp_path / "b", "pgd_at", 0.30, 0.20, 0.18, flag=True)
    (tmp_path / "a" / "transfer.json").write_text(json.dumps(TRANSFER))

    def refuse(*a, **k):
        raise AssertionError("a report must not run an attack")

    for mod, name in [("clat.attacks.threat", "perturb"), ("clat.eval.accuracy", "perturb"), ("clat.eval.autoattack", "autoattack"),
                      ("clat.criticality.index", "compute_criticality")]:
        monkeypatch.setattr(importlib.import_module(mod), name, refuse)
    return tmp_path


def test_run_report_from_json(runs):
    text = run_report(runs / "a").read_text()
    for needle in ["PGD-AT + CLAT", "## Evaluation", "17.00%", "AutoAttack", "No flag raised", "### Accuracy over ε", "## Parameter "
                                                                                                                      "efficiency",
                   "73,728", "74.7%", "## Critical layers over time", "selection.png", "Criticality stability", "## Black-box transfer",
                   "each method's own training objective"]:
        assert needle in text, needle
    for png in ("curves", "eps_sweep", "selection", "transfer"):
        assert (runs / "a" / "plots" / f"{png}.png").stat().st_size > 5000, png
    flagged = run_report(runs / "b").read_text()
    assert "**WARNING: possible gradient masking**" in flagged and "PGD is no stronger than random noise" in flagged


def test_comparison_in_the_papers_layout(runs):
    path = comparison_report([runs / "a", runs / "b"], runs / "cmp", transfer=TRANSFER)
    text = path.read_text()
    header = "| model | method | CIFAR-10 (bundled subset) clean | CIFAR-10 (bundled subset) PGD | CIFAR-10 (bundled subset) AutoAttack |"
    assert header in text
    assert "| tiny_cnn | PGD-AT + CLAT | 31.00% | 19.00% | 17.00% |" in text
    assert "|  | PGD-AT | 30.00% | 20.00% | 18.00% |" in text
    assert "WARNING: possible gradient masking" in text  # run b's flag surfaces in the comparison
    assert "paper Table 6" in text and "74.7%" in text
    for png in ("eps_sweep", "transfer"):
        assert (runs / "cmp" / "plots" / f"{png}.png").stat().st_size > 5000


def test_cli_report(runs, capsys):
    (runs / "t.json").write_text(json.dumps(TRANSFER))
    assert main(["-q", "report", str(runs / "a"), str(runs / "b"), "--transfer", str(runs / "t.json"), "--names", "CLAT,PGD-AT"]) == 0
    text = (runs / "comparison" / "report.md").read_text()
    assert "| tiny_cnn | CLAT |" in text and "Black-box transfer" in text
    assert str(runs / "comparison" / "report.md") in capsys.readouterr().out
    assert main(["-q", "report", str(runs / "a"), str(runs / "b"), "--names", "only-one"]) == 2


def test_parameter_efficiency_and_labels():
    pe = parameter_efficiency(_rows("clat"))
    pre, fine = pe["stages"]
    assert (pre["method"], pre["trainable_max"], pre["fraction_max"]) == ("pgd_at", 98666, 1.0)
    assert fine["trainable_max"] == 73728 and fine["optimizer_state_vs_full"] == pytest.approx(73728 / 98666)
    assert pe["full_model_optimizer_state_bytes"] == 98666 * 4
    assert method_label(_rows("clat")) == "PGD-AT + CLAT" and method_label(_rows("pgd_at")) == "PGD-AT"


def test_curves_without_validation_rows(tmp_path):
    rows = [{**r, "val": None} for r in _rows("clat")]
    for r in rows:
        del r["val"]
    assert plot_curves(rows, tmp_path / "c.png").stat().st_size > 5000
