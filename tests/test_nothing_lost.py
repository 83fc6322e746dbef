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

from clat.runs.checkpoint import read_state_dict, save_weights
from clat.cli.main import main
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
    from clat.config.load import load_config
    from clat.training.loop import train

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
    stale = run / "checkpoints" / "epoch_0001" / ".state.pt.k3j9x2.tmp"
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

    commands = importlib.import_module("clat.cli.commands")
    run = copy_run(finished_run, tmp_path / "run")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == run and mode == os.W_OK else real(p, mode, **k))
    monkeypatch.setattr(commands, "run_protocol", lambda *a, **k: pytest.fail("attacked before checking the output"))
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


# -- the manifest owns every output, and says which command made the folder (issue 37) ---------------
def test_train_records_its_report_and_a_short_force_retrain_leaves_no_stale_report(finished_run, tmp_path):
    from clat.runs.folder import RunDir

    m = json.loads((finished_run / ".clat-manifest.json").read_text())
    assert {"report.md", "plots"} <= set(m["written"]) and m["made_by"] == "train"
    run = copy_run(finished_run, tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    assert main([*Q, "train", *TINY, "pretrain.epochs=2", "seed=1", "--force", "--until-epoch", "1", "--run-dir", str(run)]) == 0
    assert not (run / "report.md").exists() and not (run / "plots").exists()  # the deleted model's report went with it
    assert (run / "notes.txt").read_text() == "mine" and RunDir(run).made_by() == "train"


def test_force_removes_the_report_a_manifest_of_before_did_not_list(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    m = json.loads((run / ".clat-manifest.json").read_text())
    old = {"written": [n for n in m["written"] if n not in ("report.md", "plots")], "by": "clat"}  # a manifest of before issue 37
    (run / ".clat-manifest.json").write_text(json.dumps(old))
    assert main([*Q, "train", *TINY, "pretrain.epochs=2", "--force", "--until-epoch", "1", "--run-dir", str(run)]) == 0
    assert not (run / "report.md").exists() and not (run / "plots").exists()


def test_demo_force_never_replaces_a_training_run_and_says_what_it_is(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    before = snapshot(run)
    for argv in (["demo", "--fast", "--force", "--out", str(run)], ["report", str(run)], ["demo", "--fast", "--out", str(run)],
                 ["demo", "--fast", "--force", "--out", str(run)]):
        rc = main([*Q, *argv])
        err = capsys.readouterr().err
        if argv[0] == "demo":
            assert rc == 2 and "holds a finished training run (made by `clat train`); clat demo never replaces it" in err, err
            assert "previous demo" not in err and "did not write" not in err
    after = snapshot(run)
    assert {k: v for k, v in after.items() if not k.startswith(("report.md", "plots"))} == \
        {k: v for k, v in before.items() if not k.startswith(("report.md", "plots"))}


def test_a_users_report_in_a_run_folder_is_never_replaced(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    shutil.rmtree(run / "plots")
    (run / "report.md").write_text("my own report")
    m = json.loads((run / ".clat-manifest.json").read_text())
    (run / ".clat-manifest.json").write_text(json.dumps({**m, "written": [n for n in m["written"] if n not in ("report.md", "plots")]}))
    assert main([*Q, "report", str(run)]) == 2
    assert "holds report.md that clat did not write" in capsys.readouterr().err
    assert main([*Q, "train", *TINY, "--force", "--run-dir", str(run)]) == 2  # refused before training: it would write a report
    assert "holds report.md that clat did not write" in capsys.readouterr().err and (run / "report.md").read_text() == "my own report"


def test_an_interrupted_command_records_what_it_wrote(finished_run, tmp_path, monkeypatch, capsys):
    import clat.cli.analyses
    from clat.runs.folder import RunDir

    run = copy_run(finished_run, tmp_path / "run")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(clat.cli.analyses, "plot_criticality", interrupted)  # criticality.json is written, then Ctrl-C
    assert main([*Q, "criticality", str(run), "--batch-size", "4", "--steps", "1"]) == 130
    assert (run / "criticality.json").is_file() and "criticality.json" in RunDir(run).written()
    assert "run the same `clat criticality` command again" in capsys.readouterr().err
    assert main([*Q, "train", *TINY, "--force", "--run-dir", str(run)]) == 0
    assert not (run / "criticality.json").exists()  # the old model's result went with it


@pytest.mark.parametrize("command, patch, hint", [
    ("eval", "clat.cli.commands.run_protocol", "run the same `clat eval` command again"),
    ("report", "clat.analysis.report.plot_curves", "run `clat report` again"),
    ("train", "clat.training.loop._run_epoch", "continue"),
])
def test_ctrl_c_says_what_fits_the_command(finished_run, tmp_path, monkeypatch, capsys, command, patch, hint):
    import importlib

    run = copy_run(finished_run, tmp_path / "run")
    mod, _, name = patch.rpartition(".")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(mod), name, interrupted)
    argv = {"eval": ["eval", str(run), "--n-examples", "4", "--steps", "1"], "report": ["report", str(run)],
            "train": ["train", *TINY, "--run-dir", str(tmp_path / "new")]}[command]
    assert main([*Q, *argv]) == 130
    err = capsys.readouterr().err
    assert hint in err and (command == "train") == ("train --resume" in err), err
    if command == "train":
        assert f"clat train --resume {tmp_path / 'new'}`" in err


# -- metrics.jsonl: a damaged line is named, never silently shortens a report -------------------------
def _cut_line(run: Path, n: int) -> None:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[n - 1] = lines[n - 1][:30]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def three_epoch_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("three") / "run"
    assert main([*Q, "train", *TINY, "pretrain.epochs=2", "finetune.epochs=1", "keep_checkpoints=3", "--run-dir", str(run)]) == 0
    return run


def test_report_names_a_damaged_metrics_line_and_the_epochs_it_shows(three_epoch_run, tmp_path, capsys):
    run = copy_run(three_epoch_run, tmp_path / "run")
    _cut_line(run, 2)
    with pytest.warns(UserWarning) as seen:
        assert main([*Q, "report", str(run)]) == 0
    msgs = [str(w.message) for w in seen]
    line = f"{run / 'metrics.jsonl'} line 2 (after epoch 1's row) is not valid JSON"
    assert any(line in m and "shows epochs 1, 3 only" in m for m in msgs), msgs
    text = (run / "report.md").read_text()
    assert "WARNING: metrics.jsonl is damaged" in text and "show epochs 1, 3 only" in text
    assert text.startswith("# Run report: `run` (PGD-AT + CLAT)")  # the rows after the damaged line are kept


def test_resume_says_what_it_does_with_a_damaged_metrics_line(three_epoch_run, tmp_path, capsys, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="clat")
    run = copy_run(three_epoch_run, tmp_path / "run")
    (run / "summary.json").unlink()
    (run / "model.safetensors").unlink()
    _cut_line(run, 2)
    with pytest.warns(UserWarning, match=r"line 2 \(after epoch 1's row\) is not valid JSON.*--resume drops it, so the row it held"):
        assert main([*Q, "train", "--resume", str(run)]) == 0
    assert [r["epoch"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [1, 3]
    # a line cut by the interruption, after the checkpoint, is the epoch trained again: said, not warned
    run2 = copy_run(three_epoch_run, tmp_path / "run2")
    shutil.rmtree(run2 / "checkpoints" / "epoch_0003")
    (run2 / "summary.json").unlink()
    _cut_line(run2, 3)
    caplog.clear()
    assert main([*Q, "train", "--resume", str(run2)]) == 0
    assert any("line 3 (after epoch 2's row) is cut short" in m and "trained again" in m for m in caplog.messages), caplog.messages
    assert [r["epoch"] for r in map(json.loads, (run2 / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3]


def test_a_full_disk_while_appending_metrics_names_the_file_and_leaves_no_empty_file(tmp_path, capsys, monkeypatch):
    import builtins

    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            self.f.write(text[:7])  # part of the line reaches the disk, then it is full
            self.f.flush()
            raise OSError(28, "No space left on device")

        def __getattr__(self, k):
            return getattr(self.f, k)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    def full_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return Full(f) if str(path).endswith("metrics.jsonl") and "a" in mode else f

    monkeypatch.setattr(builtins, "open", full_open)  # whichever module appends the rows
    run = tmp_path / "run"
    assert main([*Q, "train", *TINY, "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"clat: error: could not append epoch 1's row to {run / 'metrics.jsonl'} (No space left on device); free some disk "
                       f"space and continue with `clat train --resume {run}` (the epochs before are kept)"), err
    assert not (run / "metrics.jsonl").exists()  # neither empty nor half a line
    monkeypatch.undo()
    assert main([*Q, "train", "--resume", str(run)]) == 0 and len((run / "metrics.jsonl").read_text().splitlines()) == 1


# -- divergence: the advice ends in a fix that works ------------------------------------------------------
def test_following_the_divergence_advice_ends_in_a_working_run(tmp_path, capsys):
    """The issue's loop: a pretraining rate far too high explodes the weights while the loss stays finite, and the loss
    becomes NaN only in the fine-tuning stage. The advice must not send the user down ever-lower finetune.lr values."""
    import re

    run = str(tmp_path / "d")
    tiny = ["model.name=tiny_cnn", "data.train_size=300", "data.val_size=100", "data.batch_size=100", "eval.n_examples=20", "eval.steps=1",
            "attack.steps=1", "pretrain.epochs=1", "finetune.epochs=2"]
    argv, overrides, advice = ["train", "cpu/bundled_quick", *tiny, "pretrain.lr=1e10", "--run-dir", run], {}, []
    for _ in range(4):
        rc = main([*Q, *argv])
        err = capsys.readouterr().err
        if rc == 0:
            break
        assert rc == 2 and "loss became nan" in err, err
        advice.append(err)
        key, value = re.findall(r"(\w+\.lr)=([0-9.e+-]+[0-9])", err)[-1]  # the advice's (the first names the rate that diverged)
        if f"clat train --resume {run} " in err:
            argv = ["train", "--resume", run, f"{key}={value}"]
        else:
            assert "--force" in err, err
            overrides[key] = value
            fixed = [f"{k}={v}" for k, v in overrides.items()]
            argv = ["train", "cpu/bundled_quick", *tiny, "pretrain.lr=1e10", *fixed, "--force", "--run-dir", run]
    assert rc == 0, advice
    assert len(advice) == 1 and "weights had already exploded in epoch 1 (pretrain stage" in advice[0], advice
    assert "pretrain.lr=0.1 --force" in advice[0], advice
    meta = json.loads(next((tmp_path / "d" / "checkpoints").glob("epoch_*/meta.json")).read_text())
    assert meta["health"]["sound"] and meta["health"]["max_abs_param"] < 10


def test_a_sound_last_checkpoint_is_continued_with_a_lower_rate(tmp_path, capsys, monkeypatch):
    import clat.training.loop

    run = tmp_path / "r"
    real = clat.training.loop._run_epoch

    def nan_in_epoch_2(r, stage, loader, epoch, *a):
        row = real(r, stage, loader, epoch, *a)
        if epoch == 1:
            raise clat.training.loop._diverged(r, epoch, "pretrain", r.cfg.pretrain, {"loss": float("nan")})
        return row

    monkeypatch.setattr(clat.training.loop, "_run_epoch", nan_in_epoch_2)
    assert main([*Q, "train", *TINY, "pretrain.epochs=2", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"the last checkpoint (epoch_0001) is sound (finite loss and weights). Lower the learning rate and continue from it: " \
           f"clat train --resume {run} pretrain.lr=0.01" in err, err


# -- resume at another CPU thread count: the condition is said -------------------------------------------
def test_resume_at_another_thread_count_says_it_is_not_bit_identical(tmp_path, caplog):
    import logging

    from clat.config.load import load_config
    from clat.training.loop import train

    caplog.set_level(logging.WARNING, logger="clat")
    cfg = load_config(None, [*TINY, "pretrain.epochs=2", "progress=false"])
    n = torch.get_num_threads()
    train(cfg, tmp_path / "r", until_epoch=1)
    assert json.loads((tmp_path / "r" / "checkpoints" / "epoch_0001" / "meta.json").read_text())["cpu_threads"] == n
    torch.set_num_threads(n + 1)
    try:
        train(None, tmp_path / "r", resume=True)
    finally:
        torch.set_num_threads(n)
    assert any(f"was written with {n} CPU threads and this process uses {n + 1}: the resumed run is not bit-identical" in m
               and f"OMP_NUM_THREADS={n}" in m for m in caplog.messages), caplog.messages


def test_resume_at_the_same_thread_count_says_nothing_of_it(tmp_path, caplog):
    from clat.config.load import load_config
    from clat.training.loop import train

    cfg = load_config(None, [*TINY, "pretrain.epochs=2", "progress=false"])
    train(cfg, tmp_path / "r", until_epoch=1)
    train(None, tmp_path / "r", resume=True)
    assert not [m for m in caplog.messages if "CPU threads" in m]


# -- a checkpoint that matches its checksums but does not load: the previous one ------------------------
def test_an_unloadable_state_that_matches_its_manifest_falls_back_to_the_previous_checkpoint(tmp_path):
    from clat.runs.checkpoint import sha256
    from clat.config.load import load_config
    from clat.training.loop import train

    cfg = load_config(None, [*TINY, "pretrain.epochs=3", "keep_checkpoints=2", "progress=false"])
    train(cfg, tmp_path / "ref")
    run = tmp_path / "r"
    train(cfg, run, until_epoch=2)
    d = run / "checkpoints" / "epoch_0002"
    (d / "state.pt").write_bytes(b"not a torch file, but its checksum is recorded")
    meta = json.loads((d / "meta.json").read_text())
    meta["sha256"]["state.pt"] = sha256(d / "state.pt")
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"epoch_0002 cannot be loaded \(could not read training state .*\); falling back to the previous"):
        train(None, run, resume=True)
    want, got = read_state_dict(tmp_path / "ref" / "model.safetensors"), read_state_dict(run / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)  # epochs 2 and 3 trained again from epoch 1's checkpoint


# -- messages that name their file and one fix, cheap checks first -----------------------------------------
def test_eval_out_an_existing_folder_writes_into_it_and_says_what_it_holds(finished_run, tmp_path, capsys, monkeypatch):
    import clat.cli.commands

    out = tmp_path / "results"
    out.mkdir()
    args = [*Q, "eval", str(finished_run / "model.safetensors"), "--n-examples", "4", "--steps", "1", "--out", str(out)]
    assert main(args) == 0 and json.loads((out / "eval.json").read_text())["n"] == 4
    assert main([*args[:-2], "--steps", "2", "--out", str(out)]) == 0  # other settings: beside it
    assert len(list(out.glob("eval_*.json"))) == 1
    monkeypatch.setattr(clat.cli.commands, "run_protocol", lambda *a, **k: pytest.fail("attacked before checking --out"))
    assert main(args) == 2
    assert f"{out / 'eval.json'} already holds an evaluation with these settings" in capsys.readouterr().err
    (tmp_path / "mine.json").write_text("[1, 2]")
    assert main([*args[:-1], str(tmp_path / "mine.json"), "--force"]) == 2
    assert "is not an evaluation that clat wrote; clat never replaces it, --force or not" in capsys.readouterr().err
    assert (tmp_path / "mine.json").read_text() == "[1, 2]"
    monkeypatch.undo()
    assert main([*args, "--force"]) == 0  # replaced, not "Is a directory" after the attack


def test_eps_sweep_is_checked_before_any_attack(finished_run, tmp_path, monkeypatch, capsys):
    import clat.cli.commands

    monkeypatch.setattr(clat.cli.commands, "run_protocol", lambda *a, **k: pytest.fail("attacked before checking --eps-sweep"))
    assert main([*Q, "eval", str(finished_run), "--n-examples", "4", "--eps-sweep=0,-8/255", "--out", str(tmp_path / "e.json")]) == 2
    assert "argument --eps-sweep: needs one or more finite radii >= 0, got '0,-8/255'" in capsys.readouterr().err


def test_a_surrogate_state_dict_loads_with_model(finished_run, tmp_path):
    sur = tmp_path / "surrogate.pt"
    torch.save(read_state_dict(finished_run / "model.safetensors"), sur)
    out = tmp_path / "e.json"
    assert main([*Q, "eval", str(finished_run), "--n-examples", "4", "--steps", "1", "--sanity", "--square-queries", "0",
                 "--surrogate", str(sur),
                 "--model", "tiny_cnn", "--out", str(out)]) == 0
    black_box = next(c for c in json.loads(out.read_text())["sanity"]["checks"] if c["name"] == "black_box")
    assert "transfer from surrogate.pt" in black_box["values"]["black_box_acc"]


def test_a_read_only_location_is_named_before_the_lock(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == ro and mode == os.W_OK else real(p, mode, **k))
    for argv, fix in ((["train", *TINY, "--run-dir", str(ro / "run")], "choose another --run-dir"),
                      (["demo", "--fast", "--out", str(ro / "demo")], "choose another --out")):
        assert main([*Q, *argv]) == 2
        assert capsys.readouterr().err.strip() == f"clat: error: cannot write into {argv[-1]}: {ro} is not writable; {fix}"
    assert list(ro.iterdir()) == []  # not even a lock file


def test_a_real_read_only_filesystem_gives_the_friendly_message(finished_run, tmp_path, capsys):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:80]})")
    try:
        shutil.copytree(finished_run, mnt / "run", ignore=shutil.ignore_patterns("plots", "report.md"))
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        for argv, needle in ((["train", *TINY, "--run-dir", str(mnt / "new")], f"cannot write into {mnt / 'new'}: {mnt} is not writable"),
                             (["train", "--resume", str(mnt / "run")], "copy the run folder to a writable place and resume it there"),
                             (["demo", "--fast", "--out", str(mnt / "demo")], "choose another --out")):
            assert main([*Q, *argv]) == 2
            err = capsys.readouterr().err
            assert needle in err and len(err.strip().splitlines()) == 1, err
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
