"""What a run leaves besides its final weights: the best epoch's weights (best/), early stopping, callbacks,
per-epoch console lines, metrics.csv, TensorBoard and Weights & Biases (docs/logging.md)."""

import json
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import clat
from clat.training.early_stop import ValHistory
from clat.runs.checkpoint import read_state_dict
from clat.runs.loading import load_model
from clat.cli.main import main
from clat.config.load import load_config
from clat.data.loader import Splits
from clat.base.errors import ConfigError
from clat.training.loop import train
from clat.runs.folder import Checkpoints, RunDir

# The validation images are training images: the held-out accuracy sits at 0.3125 for six epochs (ties), then climbs
# (a new best at epochs 7 and 8) at this learning rate.
FAST = ["model.name=tiny_cnn", "attack.steps=1", "eval.steps=1", "eval.n_examples=16", "data.batch_size=32", "progress=false",
        "data.dataset=bundled", "pretrain.lr=0.05", "pretrain.schedule=constant", "finetune.epochs=0", "data.augment=false",
        "keep_checkpoints=10", "deterministic=true"]
# real (bundled) images end to end, for the CLI
BUNDLED = ["model.name=tiny_cnn", "data.dataset=bundled", "data.train_size=96", "data.val_size=32", "data.test_size=32",
           "eval.n_examples=32",
           "attack.steps=1", "eval.steps=1", "data.batch_size=32", "progress=false", "pretrain.epochs=3", "finetune.epochs=0"]
TIMES = ("time_s", "epoch_time_s")


def tiny_splits(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 3, 32, 32, generator=g) * 255).to(torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return Splits(x, y, x[:16], y[:16], x[:16], y[:16], 10, "synthetic")


def run_fast(path, *over, **kw):
    return train(load_config(None, [*FAST, *over]), path, data=tiny_splits(), **kw)


def same_weights(a: Path, b: Path) -> bool:
    x, y = read_state_dict(a), read_state_dict(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def csv_without_times(path: Path) -> list[list[str]]:
    import csv

    rows = list(csv.reader(path.open()))
    keep = [i for i, h in enumerate(rows[0]) if h not in TIMES]
    return [[r[i] for i in keep] for r in rows]


def crash_before_checkpoint(monkeypatch, epoch: int):
    """The next run stops (KeyboardInterrupt) after ``epoch``'s row and best weights, before its checkpoint (epochs from 1)."""
    real = Checkpoints.save

    def save(self, e, *a, **k):
        if e == epoch:
            raise KeyboardInterrupt
        return real(self, e, *a, **k)

    monkeypatch.setattr(Checkpoints, "save", save)
    return real


# -- best checkpoint -------------------------------------------------------------------------------------
def test_best_holds_the_best_epochs_weights_and_ties_keep_the_earlier_epoch(tmp_path):
    s = run_fast(tmp_path / "r", "pretrain.epochs=6")
    rd = RunDir(tmp_path / "r")
    rows = rd.metrics()
    assert len({r["val"]["pgd_acc"] for r in rows}) == 1  # six equal accuracies: a tie throughout
    assert (s["best_epoch"], s["best_metric"], s["best_value"]) == (1, "val.pgd_acc", rows[0]["val"]["pgd_acc"])
    info = json.loads(rd.best_info_path.read_text())
    assert (info["epoch"], info["metric"], info["value"]) == (1, "val.pgd_acc", rows[0]["val"]["pgd_acc"])
    assert same_weights(rd.best_weights, rd.checkpoints().weights(epoch=1))
    assert not same_weights(rd.best_weights, rd.weights_path)
    assert "best" in rd.written()
    model, meta = load_model(rd.best_weights)  # the final weights' format: loads on its own
    assert meta["model"] == "tiny_cnn" and meta["best_epoch"] == 1


def test_val_history_ties_min_delta_and_patience():
    rows = [{"epoch": e, "stage": "pretrain", "method": "pgd_at", **({"val": {"pgd_acc": v, "clean_acc": 0.5}} if v is not None else {})}
            for e, v in enumerate([0.30, None, 0.30, 0.305, 0.40, 0.40, 0.39], 1)]
    h = ValHistory.of(rows)
    assert h.best["epoch"] == 5 and h.best["value"] == 0.40 and not h.stopped  # the tie at epoch 6 keeps epoch 5
    es = load_config(None, ["early_stop.patience=2", "early_stop.min_delta=0.01"]).early_stop
    assert [ValHistory.of(rows[:n], es).stopped for n in range(1, 8)] == [False, False, False, True, False, False, True]
    assert ValHistory.of(rows[:4], es).best["epoch"] == 4  # the best is any improvement; early stopping needs min_delta


def test_a_run_without_validation_says_it_kept_no_best(tmp_path, capsys):
    run = tmp_path / "r"
    s = train(load_config(None, [*BUNDLED, "data.val_size=0", "eval.n_examples=0", "pretrain.epochs=1"]), run)
    assert s["best_epoch"] is None and "no held-out evaluation" in s["best_note"] and not (run / "best").exists()
    assert main(["-q", "eval", str(run), "--which", "best", "--n-examples", "8", "--steps", "1"]) == 2
    assert "holds no best/ (no held-out evaluation" in capsys.readouterr().err


def test_kill_then_resume_gives_the_same_best_and_csv(tmp_path, monkeypatch):
    """Killed after epoch 7's row and best weights (a new best), before its checkpoint: the resumed run redoes the epoch."""
    pytest.importorskip("tensorboard")
    over = ["pretrain.epochs=8", "log.tensorboard=true"]
    run_fast(tmp_path / "a", *over)
    real = crash_before_checkpoint(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        run_fast(tmp_path / "b", *over)
    b = RunDir(tmp_path / "b")
    assert json.loads(b.best_info_path.read_text())["epoch"] == 7 and len(b.metrics()) == 7
    monkeypatch.setattr(Checkpoints, "save", real)
    s = train(None, tmp_path / "b", resume=True, data=tiny_splits())
    a = RunDir(tmp_path / "a")
    assert s["best_epoch"] == 8 and a.best_info_path.read_bytes() == b.best_info_path.read_bytes()
    assert a.best_weights.read_bytes() == b.best_weights.read_bytes()
    assert csv_without_times(a.csv_path) == csv_without_times(b.csv_path)
    assert len(csv_without_times(b.csv_path)) == 1 + 8
    assert tb_scalars(a.tensorboard_dir) == tb_scalars(b.tensorboard_dir)  # the interrupted session's epochs once each


def tb_scalars(d: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(d))
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"] if not t.endswith(TIMES)}


# -- early stopping ------------------------------------------------------------------------------------
def test_early_stopping_stops_records_it_and_a_resume_does_not_train_on(tmp_path, monkeypatch):
    over = ["pretrain.epochs=8", "early_stop.patience=3"]
    real = Checkpoints.save
    stopped_at = []

    def save(self, e, *a, **k):  # killed right after the stopping epoch's checkpoint, before the final files
        out = real(self, e, *a, **k)
        if e == 4:
            stopped_at.append(e)
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(Checkpoints, "save", save)
    with pytest.raises(KeyboardInterrupt):
        run_fast(tmp_path / "r", *over)
    monkeypatch.setattr(Checkpoints, "save", real)
    s = train(None, tmp_path / "r", resume=True, data=tiny_splits())
    assert s["stopped_early"] and s["epochs_done"] == 4 and s["epochs"] == 8 and s["best_epoch"] == 1
    assert s["early_stop"] == {"patience": 3, "min_delta": 0.0} and s["finished"]
    rd = RunDir(tmp_path / "r")
    assert [r["epoch"] for r in rd.metrics()] == [1, 2, 3, 4]
    assert same_weights(rd.weights_path, rd.checkpoints().weights(epoch=4))
    again = train(None, tmp_path / "r", resume=True, data=tiny_splits())
    assert again == s and len(rd.metrics()) == 4
    uninterrupted = run_fast(tmp_path / "u", *over)
    assert {k: v for k, v in uninterrupted.items() if "time" not in k and k != "run_dir"} == \
        {k: v for k, v in s.items() if "time" not in k and k != "run_dir"}


@pytest.mark.parametrize("over, needle", [
    (["early_stop.patience=0"], "early_stop.patience must be >= 1"),
    (["early_stop.min_delta=-0.1"], "early_stop.min_delta must be >= 0"),
    (["early_stop.patience=2", "eval.n_examples=0"], "early_stop.patience watches the held-out evaluation"),
])
def test_bad_early_stop_settings_are_refused(over, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, over)


def test_early_stopping_inside_a_lora_stage_saves_loadable_weights(tmp_path, monkeypatch):
    """Stopped in the first LoRA epoch, whose checkpoint holds the adapters: the final weights have them merged, also
    when the run was killed after that checkpoint and resumed (the stage is set up again to load it)."""
    pytest.importorskip("peft")
    over = ["pretrain.epochs=1", "finetune.epochs=6", "finetune.method=lora", "finetune.lr=1e-6", "early_stop.patience=1",
            "early_stop.min_delta=0.5"]
    s = run_fast(tmp_path / "a", *over)
    assert s["stopped_early"] and s["epochs_done"] == 2
    real = Checkpoints.save

    def save(self, e, *a, **k):
        out = real(self, e, *a, **k)
        if e == 2:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(Checkpoints, "save", save)
    with pytest.raises(KeyboardInterrupt):
        run_fast(tmp_path / "b", *over)
    monkeypatch.setattr(Checkpoints, "save", real)
    b = RunDir(tmp_path / "b")
    assert any("lora" in k for k in read_state_dict(b.checkpoints().weights(epoch=2)))
    train(None, b.path, resume=True, data=tiny_splits())
    for rd in (RunDir(tmp_path / "a"), b):
        for p in (rd.weights_path, rd.best_weights):
            assert not any("lora" in k for k in read_state_dict(p))
            load_model(p)
    assert same_weights(b.weights_path, tmp_path / "a" / "model.safetensors")


# -- eval --which and the report -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundled_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("outputs") / "run"
    train(load_config(None, [*BUNDLED, "early_stop.patience=1", "early_stop.min_delta=0.9"]), run)
    return run


def test_eval_best_and_last_keep_two_files(bundled_run, capsys):
    args = ["-q", "eval", str(bundled_run), "--n-examples", "8", "--steps", "1"]
    assert main(args) == 0
    assert main([*args, "--which", "best"]) == 0
    files = sorted(p.name for p in bundled_run.glob("eval*.json"))
    assert len(files) == 2 and any(f.endswith("_best.json") for f in files)
    evals = [json.loads((bundled_run / f).read_text()) for f in files]
    best = next(e for e in evals if e["which"] == "best")
    last = next(e for e in evals if e["which"] == "last")
    assert best["best"]["epoch"] == RunDir(bundled_run).summary()["best_epoch"]
    assert best["checkpoint"].endswith(str(Path("best") / "model.safetensors"))
    assert last["checkpoint"].endswith("model.safetensors") and "best" not in last
    assert main([*args, "--which", "best"]) == 2  # the same settings again: never replaced silently
    assert "already holds an evaluation" in capsys.readouterr().err


def test_eval_which_best_of_a_file_is_refused(bundled_run, capsys):
    assert main(["-q", "eval", str(bundled_run / "model.safetensors"), "--which", "best", "--n-examples", "8"]) == 2
    assert "--which best reads RUN/best/ of a run folder" in capsys.readouterr().err


def test_eval_which_best_of_a_half_written_best_is_refused(bundled_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(bundled_run, run)
    info = json.loads(RunDir(run).best_info_path.read_text())
    RunDir(run).best_info_path.write_text(json.dumps({**info, "sha256": "0" * 64}))
    assert main(["-q", "eval", str(run), "--which", "best", "--n-examples", "8"]) == 2
    assert "was interrupted while being written" in capsys.readouterr().err


def test_report_names_the_best_epoch_and_the_early_stop(bundled_run):
    assert main(["-q", "report", str(bundled_run)]) == 0
    text = (bundled_run / "report.md").read_text()
    assert f"at epoch {RunDir(bundled_run).summary()['best_epoch']}; its weights are in `best/`" in text
    assert "Stopped early after epoch 2 of 3" in text and "(best)" in text


# -- callbacks and console lines -----------------------------------------------------------------------
def test_callbacks_receive_every_row_and_the_summary(tmp_path):
    seen = {"start": [], "rows": [], "end": []}

    class Recorder(clat.Callback):
        def on_train_start(self, info):
            seen["start"].append(info)

        def on_epoch_end(self, row):
            seen["rows"].append(row)

    class EndOnly:  # any object with some of the hooks
        def on_train_end(self, summary):
            seen["end"].append(summary)

    s = run_fast(tmp_path / "r", "pretrain.epochs=3", callbacks=[Recorder(), EndOnly()])
    assert seen["rows"] == RunDir(tmp_path / "r").metrics()
    assert seen["end"] == [s] and seen["start"][0]["first_epoch"] == 1 and seen["start"][0]["config"]["pretrain"]["epochs"] == 3


def test_an_exception_in_a_callback_propagates_and_the_run_resumes(tmp_path):
    class Boom(clat.Callback):
        def on_epoch_end(self, row):
            if row["epoch"] == 2:
                raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_fast(tmp_path / "r", "pretrain.epochs=3", callbacks=[Boom()])
    assert train(None, tmp_path / "r", resume=True, data=tiny_splits())["finished"]


@pytest.mark.parametrize("bad, needle", [(clat.Callback(), "callbacks must be a list"), ([print], "has none of the methods")])
def test_bad_callbacks_are_refused_before_the_run_starts(tmp_path, bad, needle):
    with pytest.raises(ConfigError, match=needle):
        run_fast(tmp_path / "r", "pretrain.epochs=1", callbacks=bad)
    assert not (tmp_path / "r").exists()


def test_a_users_folder_named_like_a_logger_output_is_never_written_into(tmp_path):
    (tmp_path / "r" / "best").mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds best that clat did not write"):
        run_fast(tmp_path / "r", "pretrain.epochs=1")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["best"]


def test_console_lines_follow_log_console(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="clat")
    run_fast(tmp_path / "a", "pretrain.epochs=2")
    assert [m for m in caplog.messages if m.startswith("epoch ")][1].startswith("epoch   2 pgd_at")
    caplog.clear()
    run_fast(tmp_path / "b", "pretrain.epochs=2", "log.console=false")
    assert not [m for m in caplog.messages if m.startswith("epoch ")]


def test_the_python_api_prints_epoch_lines_where_logging_is_not_configured(tmp_path):
    code = ("import clat; clat.train(clat.load_config(None, " + repr([*BUNDLED,
                                                                      "pretrain.epochs=2"]) + "), " + repr(str(tmp_path / "r")) + ")")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert [l for l in p.stderr.splitlines() if l.startswith("epoch ")][1].startswith("epoch   2 pgd_at")


# -- loggers -------------------------------------------------------------------------------------------
def test_tensorboard_receives_per_epoch_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    run_fast(tmp_path / "r", "pretrain.epochs=3", "log.tensorboard=true")
    rd = RunDir(tmp_path / "r")
    sc = tb_scalars(rd.tensorboard_dir)
    rows = rd.metrics()
    assert [s for s, _ in sc["val/pgd_acc"]] == [1, 2, 3]
    assert [v for _, v in sc["train/loss"]] == pytest.approx([r["train"]["loss"] for r in rows])
    assert "tensorboard" in rd.written()


def test_a_missing_optional_package_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails
    with pytest.raises(ConfigError, match=r'log.wandb=true needs the wandb package: pip install "clat-at\[wandb\]"'):
        run_fast(tmp_path / "r", "pretrain.epochs=1", "log.wandb=true")
    assert not (tmp_path / "r").exists()


def wandb_records(run_file: Path):
    """The records of a W&B transaction log (.wandb: LevelDB's log format, 32 KiB blocks, after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf = run_file.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            r = pb.Record()
            r.ParseFromString(buf)
            yield r
            buf = b""


def test_wandb_offline_writes_a_run_under_the_run_folder_and_resume_continues_it(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": tmp_path / "cfg",
                 "WANDB_CACHE_DIR": tmp_path / "cache",
                 "WANDB_DATA_DIR": tmp_path / "data", "WANDB_DISABLE_GIT": "true"}.items():
        monkeypatch.setenv(k, str(v))
    run_fast(tmp_path / "r", "pretrain.epochs=3", "log.wandb=true", until_epoch=2)
    train(None, tmp_path / "r", resume=True, data=tiny_splits())
    rd = RunDir(tmp_path / "r")
    files = sorted(rd.wandb_dir.glob("offline-run-*/run-*.wandb"))
    run_id = (rd.wandb_dir / "clat-run-id").read_text()
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)  # one W&B run, continued
    history, config = {}, {}
    for f in files:
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                history[items["_step"]] = items
            elif kind == "run":
                config.update({u.key: json.loads(u.value_json) for u in r.run.config.update})
    rows = rd.metrics()
    assert sorted(history) == [1, 2, 3]
    assert [history[r["epoch"]]["val/pgd_acc"] for r in rows] == [r["val"]["pgd_acc"] for r in rows]
    assert config["pretrain"]["epochs"] == 3 and config["log"]["wandb"] is True
    assert "wandb" in rd.written()


def test_a_relative_run_folder_records_what_clat_wrote(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "train", *BUNDLED, "pretrain.epochs=1", "--run-dir", "runs/r"]) == 0
    assert main(["-q", "eval", "runs/r", "--which", "best", "--n-examples", "8", "--steps", "1"]) == 0
    written = RunDir(tmp_path / "runs" / "r").written()
    assert {"best", "metrics.csv", "eval.json"} <= set(written) and "runs" not in written
    assert main(["-q", "train", "--resume", "runs/r"]) == 0  # finished: nothing to do, nothing refused
