"""Nothing lost, nothing half-done: --force, run-folder locks, full disks, resume of every method,
one-line errors for damaged run files, range checks, and cheap checks before expensive work.

Each test reproduces a finding of the independent trial of bad inputs and interruptions (the
issue "Nothing lost, nothing half-done") and shows it fixed.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clat.checkpoint import read_state_dict, save_weights
from clat.cli import main
from clat.methods import METHODS
from clat.models import create_model

Q = ["-q"]
TINY = ["model.name=tiny_cnn", "data.dataset=bundled", "data.train_size=300", "data.val_size=100", "data.test_size=50", "attack.steps=1",
        "eval.n_examples=20", "eval.steps=1", "pretrain.epochs=1", "finetune.epochs=0", "data.batch_size=100"]


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main([*Q, "train", *TINY, "--run-dir", str(run)]) == 0
    return run


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- --force ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    ["model.name=vgg99"],
    ["data.dataset=cifar10", "data.root=/nonexistent/data"],
    ["init=/nonexistent/weights.safetensors"],
    ["finetune.epochs=1", "clat.k=999"],
    ["pretrain.lr=inf"],
], ids=["unknown model", "missing data root", "missing init", "k too large", "lr inf"])
def test_force_validates_everything_before_removing_the_old_run(finished_run, tmp_path, capsys, bad):
    run = copy_run(finished_run, tmp_path / "run")
    before = snapshot(run)
    assert main([*Q, "train", *TINY, *bad, "--force", "--run-dir", str(run)]) == 2
    assert capsys.readouterr().err.startswith("clat: error:")
    assert snapshot(run) == before  # the old run is intact: nothing removed, nothing written


def test_force_with_a_mismatched_init_keeps_the_old_run(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    other = tmp_path / "small.safetensors"
    save_weights(other, create_model("small_cnn"), {"model": "small_cnn", "num_classes": 10})
    before = snapshot(run)
    assert main([*Q, "train", *TINY, f"init={other}", "--force", "--run-dir", str(run)]) == 2
    assert "does not fit this model" in capsys.readouterr().err and snapshot(run) == before


def test_force_never_touches_a_folder_that_is_not_a_clat_run(tmp_path, capsys):
    d = tmp_path / "mine"
    (d / "checkpoints").mkdir(parents=True)
    (d / "config.yaml").write_text("my: own settings\n")
    (d / "checkpoints" / "weights.bin").write_bytes(b"precious")
    before = snapshot(d)
    assert main([*Q, "train", *TINY, "--force", "--run-dir", str(d)]) == 2
    assert "that clat did not write" in capsys.readouterr().err
    assert snapshot(d) == before


def test_force_replaces_clats_results_and_keeps_the_users(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    assert main([*Q, "eval", str(run), "--n-examples", "4", "--steps", "1"]) == 0
    assert main([*Q, "criticality", str(run), "--batch-size", "4", "--steps", "1"]) == 0
    assert main([*Q, "report", str(run)]) == 0
    (run / "notes.txt").write_text("my notes")
    for f in ("eval.json", "criticality.json", "criticality.png", "report.md", "plots"):
        assert (run / f).exists(), f
    assert main([*Q, "train", *TINY, "seed=1", "--force", "--run-dir", str(run)]) == 0
    # the old model's evaluation, criticality and report are gone; the new run wrote its own report
    assert not (run / "eval.json").exists() and not (run / "criticality.json").exists()
    assert "seed: 1" in (run / "config.yaml").read_text() and (run / "report.md").is_file()
    assert (run / "notes.txt").read_text() == "my notes"


def test_force_recognises_a_run_of_clat_0_1_without_manifest(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    (run / ".clat-manifest.json").unlink()  # as clat 0.1 left its folders (without the files later versions add)
    shutil.rmtree(run / "best")
    (run / "metrics.csv").unlink()
    (run / "eval.json").write_text("{}")
    (run / "keep.txt").write_text("mine")
    assert main([*Q, "train", *TINY, "--force", "--run-dir", str(run)]) == 0
    assert not (run / "eval.json").exists() and (run / "keep.txt").read_text() == "mine"


def test_demo_force_removes_only_the_demos_own_files(tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "data").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "data" / "x.bin").write_bytes(b"\x00\x01")
    assert main([*Q, "demo", "--fast", "--out", str(out)]) == 0  # other files do not block a demo
    first = (out / "results.json").read_text()
    assert main([*Q, "demo", "--fast", "--out", str(out)]) == 2  # a demo is there: --force needed
    assert main([*Q, "demo", "--fast", "--force", "--out", str(out)]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "data" / "x.bin").read_bytes() == b"\x00\x01"
    assert json.loads((out / "results.json").read_text()).keys() == json.loads(first).keys()
    # a report.md that clat did not write is never replaced, --force or not
    other = tmp_path / "other"
    other.mkdir()
    (other / "report.md").write_text("my report")
    capsys.readouterr()
    assert main([*Q, "demo", "--fast", "--force", "--out", str(other)]) == 2
    assert "did not write" in capsys.readouterr().err and (other / "report.md").read_text() == "my report"
    assert sorted(p.name for p in other.iterdir()) == ["report.md"]


# -- one process per run folder ----------------------------------------------------------------
def _clat(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "clat", "-q", *args], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_two_trainers_into_one_folder_one_is_refused(tmp_path):
    run = tmp_path / "run"
    long = [*TINY, "pretrain.epochs=3", "data.train_size=600"]
    a = _clat("train", *long, "--run-dir", str(run))
    lock = run / ".clat.lock"
    deadline = time.time() + 60
    while not (lock.is_file() and lock.read_text()) and a.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert a.poll() is None, a.communicate()[1].decode()
    b = _clat("train", *long, "seed=1", "--run-dir", str(run))  # another config into the same folder
    c = _clat("train", "--resume", str(run))  # or a resume of the same run
    rb, rc = b.wait(timeout=120), c.wait(timeout=120)
    errs = [p.communicate()[1].decode() for p in (b, c)]
    assert a.wait(timeout=300) == 0, a.communicate()[1].decode()
    assert rb == rc == 2 and all("is in use by `clat train` (pid" in e for e in errs), errs
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # one trainer, each epoch once
    assert "seed: 0" in (run / "config.yaml").read_text()


def test_a_stale_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    assert main([*Q, "train", *TINY, "pretrain.epochs=2", "--until-epoch", "1", "--run-dir", str(run)]) == 0
    (run / ".clat.lock").write_text("`clat train` (pid 999999 on a machine that died, since yesterday)")  # left by kill -9
    assert main([*Q, "train", "--resume", str(run)]) == 0
    assert (run / "summary.json").is_file()


# -- resume, bit for bit, for every method across every stage boundary ----------------------------
RESUME = ["model.name=tiny_cnn", "data.dataset=bundled", "data.train_size=300", "data.val_size=60", "data.batch_size=60", "attack.steps=1",
          "eval.n_examples=30", "eval.steps=1", "clat.criticality.steps=1", "clat.criticality.batch_size=20", "rift.batch_size=20",
          "rift.steps=1", "rift.alphas=[0.0,0.5,1.0]", "pretrain.epochs=1", "finetune.epochs=2", "clat.reselect_every=1", "progress=false"]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_resume_is_bit_identical_for_every_method_at_every_boundary(method, tmp_path):
    if method == "lora":
        pytest.importorskip("peft")
    from clat.config import load_config
    from clat.loop import train

    cfg = load_config(None, [*RESUME, f"finetune.method={method}"])
    train(cfg, tmp_path / "ref")
    want = read_state_dict(tmp_path / "ref" / "model.safetensors")
    for stop in (1, 2):  # 1: at the pretrain -> finetune boundary; 2: inside the finetune stage
        run = tmp_path / f"stop{stop}"
        train(cfg, run, until_epoch=stop)
        train(None, run, resume=True)
        got = read_state_dict(run / "model.safetensors")
        assert got.keys() == want.keys()
        diff = [k for k in want if not torch.equal(got[k], want[k])]
        assert not diff, f"{method}, resumed after epoch {stop}: {diff[:4]}"


def test_resume_can_lower_the_learning_rate_and_records_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*Q, "train", *TINY, "pretrain.epochs=2", "--until-epoch", "1", "--run-dir", str(run)]) == 0
    assert main([*Q, "train", "--resume", str(run), "finetune.method=trades"]) == 2  # not a learning rate: refused
    assert "--resume cannot change finetune.method" in capsys.readouterr().err
    assert main([*Q, "train", "--resume", str(run), "pretrain.lr=0.01"]) == 0
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["resume_overrides"] == {"pretrain.lr": [0.1, 0.01]}
    # the cosine schedule continues from the new base value: half-way (after epoch 1 of 2) it is near 0.01 * cos-factor
    assert rows[1]["lr"] < 0.0051 and "lr: 0.01" in (run / "config.yaml").read_text()
    assert json.loads((run / "summary.json").read_text())["resume_overrides"] == [{"pretrain.lr": [0.1, 0.01]}]


def test_resume_removes_half_written_temporary_files(tmp_path):
    run = tmp_path / "run"
    assert main([*Q, "train", *TINY, "pretrain.epochs=2", "--until-epoch", "1", "--run-dir", str(run)]) == 0
    stale = run / "checkpoints" / "epoch_0000" / ".state.pt.k3j9x2.tmp"
    stale.write_bytes(b"half")
    (run / "my.tmp").write_text("a user's file that happens to end in .tmp")
    assert main([*Q, "train", "--resume", str(run)]) == 0
    assert not stale.exists() and (run / "my.tmp").exists()


# -- full disks ------------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.decode().strip()[:80]})")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_a_real_full_disk_stops_with_one_line(small_fs, capsys):
    run = small_fs / "run"
    rc = main([*Q, "train", *TINY, "pretrain.epochs=3", "keep_checkpoints=3", "--run-dir", str(run)])
    err = capsys.readouterr().err
    lines = [l for l in err.strip().splitlines() if not l.startswith("clat: warning:")]
    assert rc == 2 and len(lines) == 1 and "No space left on device" in lines[0] and "Traceback" not in err, err
    assert not [p for p in run.rglob("*.tmp")]  # no half-written file left


# -- one reader of run files, one-line errors --------------------------------------------------
@pytest.mark.parametrize("text", ["model: {name: tiny_cnn\n", "model: !!python/object/apply:os.system ['echo hi']\n", "- a list\n",
                                  "modle: {name: x}\n"], ids=["invalid yaml", "refused tag", "not a mapping", "unknown key"])
def test_a_damaged_run_config_gives_one_line_everywhere(finished_run, tmp_path, capsys, text):
    run = copy_run(finished_run, tmp_path / "run")
    (run / "config.yaml").write_text(text)
    for argv in (["train", "--resume", str(run)], ["eval", str(run), "--n-examples", "4"], ["report", str(run)]):
        assert main([*Q, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("clat: error:") and "is not a valid clat config" in err and "Traceback" not in err, (argv, err)
        assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("meta", [{"model": 5}, {"model": "tiny_cnn", "num_classes": "ten"}, {"model": "tiny_cnn", "mean": [1e999, 0, 0]},
                                  {"model": "tiny_cnn", "normalize": "yes"}, {"model": "tiny_cnn", "aliases": {"a.weight": "missing"}}],
                         ids=["model not a name", "classes not int", "mean not finite", "normalize not bool", "alias to nothing"])
def test_crafted_safetensors_metadata_gives_one_line(tmp_path, capsys, meta):
    from safetensors.torch import save_file

    f = tmp_path / "crafted.safetensors"
    state = {k: v.contiguous() for k, v in create_model("tiny_cnn").state_dict().items()}
    save_file(state, str(f), metadata={"clat": json.dumps(meta)})
    assert main([*Q, "eval", str(f), "--n-examples", "4", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clat: error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_config_yaml_near_a_weights_file_is_not_taken_for_its_run(tmp_path, capsys):
    project = tmp_path / "other_tool_project"
    (project / "models").mkdir(parents=True)
    (project / "config.yaml").write_text("trainer: {gpus: 8}\n")  # another tool's config
    torch.save(create_model("tiny_cnn").state_dict(), project / "models" / "weights.pt")
    assert main([*Q, "eval", str(project / "models" / "weights.pt"), "--model", "tiny_cnn", "--n-examples", "4", "--steps", "1",
                 "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["threat_model"]["source"] == "the default threat model"


# -- values that pass types but make no sense --------------------------------------------------
@pytest.mark.parametrize("argv,needle", [
    (["train", *TINY, "pretrain.lr=inf"], "pretrain.lr must be a finite number"),
    (["train", *TINY, "clat.lam=inf"], "clat.lam must be a finite number"),
    (["train", *TINY, "attack.eps=inf"], "attack.eps must be a finite number"),
    (["train", *TINY, "attack.eps=nan"], "attack.eps must be a finite number"),
    (["train", *TINY, "attack.eps=2"], "covers the whole [0, 1] pixel range"),
    (["train", *TINY, "attack.norm=l2", "attack.eps=100"], "exceeds the l2 diameter"),
    (["train", *TINY, "rift.alphas=[0.0,.inf]"], "rift.alphas[1] must be a finite number"),
])
def test_nonsense_values_are_refused(argv, needle, capsys):
    assert main([*Q, *argv]) == 2
    assert needle in capsys.readouterr().err


def test_eval_eps_beyond_the_image_range_is_refused(tmp_path, capsys):
    f = tmp_path / "m.safetensors"
    save_weights(f, create_model("tiny_cnn"), {"model": "tiny_cnn", "num_classes": 10})
    assert main([*Q, "eval", str(f), "--eps", "5", "--n-examples", "4"]) == 2
    assert "covers the whole [0, 1] image range" in capsys.readouterr().err


def test_nan_weights_are_evaluated_with_a_warning(tmp_path, capsys):
    m = create_model("tiny_cnn")
    with torch.no_grad():
        next(m.parameters()).fill_(float("nan"))
    f = tmp_path / "nan.safetensors"
    save_weights(f, m, {"model": "tiny_cnn", "num_classes": 10})
    with pytest.warns(UserWarning, match="non-finite weights .* every accuracy measured on it is meaningless"):
        assert main([*Q, "eval", str(f), "--n-examples", "4", "--steps", "1", "--out", str(tmp_path / "e.json")]) == 0


# -- cheap checks first ---------------------------------------------------------------------------
def test_eval_into_a_read_only_run_folder_refuses_before_attacking(finished_run, tmp_path, capsys, monkeypatch):
    import importlib

    evaluate_mod = importlib.import_module("clat.evaluate")  # (the package attribute clat.evaluate is the function)
    run = copy_run(finished_run, tmp_path / "run")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == run and mode == os.W_OK else real(p, mode, **k))
    monkeypatch.setattr(evaluate_mod, "evaluate", lambda *a, **k: pytest.fail("attacked before checking the output"))
    assert main([*Q, "eval", str(run), "--n-examples", "4"]) == 2
    assert "not writable" in capsys.readouterr().err


def test_criticality_k0_and_report_with_a_missing_transfer_file_change_nothing(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    assert main([*Q, "criticality", str(run), "--batch-size", "4", "--steps", "1"]) == 0
    assert main([*Q, "report", str(run)]) == 0
    before = snapshot(run)
    assert main([*Q, "criticality", str(run), "--k", "0"]) == 2
    assert main([*Q, "criticality", str(run), "--k", "99", "--batch-size", "4", "--steps", "1"]) == 2
    assert main([*Q, "report", str(run), "--transfer", str(tmp_path / "missing.json")]) == 2
    assert snapshot(run) == before


def test_a_crafted_manifest_cannot_point_force_outside_the_folder(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important.txt").write_text("keep")
    (run / ".clat-manifest.json").write_text(json.dumps({"written": ["config.yaml", "../victim"]}))
    assert main([*Q, "train", *TINY, "--force", "--run-dir", str(run)]) == 2
    assert "is damaged" in capsys.readouterr().err and (victim / "important.txt").read_text() == "keep"
