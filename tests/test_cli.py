"""Smoke tests of every CLI command, run in-process through clat.cli.main.main."""

import json

import pytest
import torch

from clat.cli.main import main

SMALL = ["model.name=tiny_cnn", "data.dataset=bundled", "data.train_size=300", "data.val_size=100", "data.test_size=100",
         "attack.steps=1", "clat.criticality.steps=1", "clat.criticality.batch_size=20", "data.batch_size=64",
         "eval.n_examples=50", "eval.steps=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    cfg = run.parent / "exp.yaml"
    cfg.write_text("pretrain:\n  epochs: 1\n  lr: 0.05\nfinetune:\n  epochs: 1\n  lr: 0.01\nclat:\n  k: 1\n  lam: 8/255\n")
    assert main(["-q", "train", str(cfg), *SMALL, "--run-dir", str(run)]) == 0
    return run


def test_train_writes_everything(trained):
    for f in ("config.yaml", "metrics.jsonl", "model.safetensors", "summary.json", "report.md", "plots/curves.png"):
        assert (trained / f).exists(), f
    rows = [json.loads(l) for l in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["pgd_at", "clat"]
    for key in ("train", "val", "trainable_params", "epoch_time_s", "lr"):
        assert key in rows[-1]
    assert rows[-1]["selected"] and rows[-1]["trainable_params"] < rows[0]["trainable_params"]


def test_train_refuses_existing_run_and_resume_of_finished_run_is_a_noop(trained, capsys):
    assert main(["-q", "train", "data.dataset=bundled", "--run-dir", str(trained)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["-q", "train", "--resume", str(trained)]) == 0


def test_eval(trained, capsys):
    out = trained / "e.json"
    assert main(["-q", "eval", str(trained), "--n-examples", "40", "--steps", "2", "--restarts", "2", "--eps", "8/255", "--out",
                 str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 40 and 0 <= res["pgd_acc"] <= res["clean_acc"] <= 1
    assert len(res["pgd_acc_per_restart"]) == 2 and res["pgd_acc"] <= min(res["pgd_acc_per_restart"])
    assert "PGD-2" in capsys.readouterr().out


def test_criticality(trained, capsys):
    assert main(["-q", "criticality", str(trained), "--batch-size", "20", "--steps", "2", "--out", str(trained / "crit")]) == 0
    data = json.loads((trained / "crit" / "criticality.json").read_text())
    assert len(data["layers"]) == 5 and sum(l["selected"] for l in data["layers"]) == 1
    assert (trained / "crit" / "criticality.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "criticality C" in out and "top-1" in out


def test_criticality_of_a_fresh_model(tmp_path):
    assert main(["-q", "criticality", "--model", "tiny_cnn", "--batch-size", "10", "--steps", "1", "--out", str(tmp_path)]) == 0


def test_report(trained):
    assert main(["-q", "report", str(trained)]) == 0
    text = (trained / "report.md").read_text()
    assert "Critical layers over time" in text and "curves.png" in text


def test_models_and_methods(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "resnet18" in out and "11,173,962" in out
    assert main(["methods"]) == 0
    assert "clat" in capsys.readouterr().out


def test_demo_fast(tmp_path):
    assert main(["-q", "demo", "--fast", "--out", str(tmp_path / "demo")]) == 0
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "Test accuracy" in report and "+ CLAT" in report
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(res) == {"pretrained (PGD-AT)", "+ CLAT", "+ PGD-AT continued"}
    assert main(["-q", "demo", "--fast", "--out", str(tmp_path / "demo")]) == 2  # never overwritten without --force


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "nonexistent.yaml"], "does not exist"),
        (["train", "model.name=vgg99", "data.dataset=bundled"], "unknown model 'vgg99'; did you mean vgg19? known models"),
        (["train", "finetune.method=nope", "data.dataset=bundled"], "unknown method"),
        (["train", "attack.eps=-1"], "attack.eps must be > 0"),
        (["train", "clat.k=0"], "clat.k must be >= 1"),
        (["train", "clat.kk=1"], "unknown config key 'clat.kk'"),
        (["train", "data.batch_size=abc"], "must be an integer"),
        (["train", "data.dataset=cifar10", "data.root=/nonexistent"], "data"),
        (["eval", "/nonexistent.safetensors"], "does not exist"),
    ],
)
def test_bad_input_gives_one_line_error(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clat: error:") and needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2


def test_eval_of_mismatched_checkpoint(tmp_path, capsys):
    from clat.runs.checkpoint import save_weights
    from clat.models import create_model

    p = tmp_path / "w.safetensors"
    save_weights(p, create_model("tiny_cnn", 100), {"model": "tiny_cnn", "num_classes": 100})
    assert main(["-q", "eval", str(p), "--num-classes", "10", "--n-examples", "5"]) == 2
    assert "does not fit this model" in capsys.readouterr().err
    torch.save({"w": torch.zeros(1)}, tmp_path / "sd.pt")
    assert main(["-q", "eval", str(tmp_path / "sd.pt"), "--n-examples", "5"]) == 2
    assert "--model" in capsys.readouterr().err
