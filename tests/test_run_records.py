"""The run's records (issue 35): metrics rows, selection events and summary.json are typed and carry a schema version;
epochs are numbered one way (from 1) in metrics, checkpoints, selections and reports; run folders written before
(schema 1: selections and checkpoint folders counted from 0) still load, resume bit-exactly and report. Also: CLAT's k
and chunk size resolved in one place (CLI, Python and config agree), and config variants built from typed values."""

import json
import shutil

import pytest
import torch

from clat.base.errors import ClatError, ConfigError
from clat.base.run_records import SCHEMA, MetricsRow, SelectionEvent, Summary, checkpoint_epoch, current_row, current_summary
from clat.cli.main import main
from clat.config.load import load_config, override, variant
from clat.data.loader import Splits
from clat.layers.discovery import find_layers
from clat.methods import create_method
from clat.methods.clat import reselection_chunk, resolve_chunk, resolve_k
from clat.models import create_model
from clat.runs.checkpoint import load_state, read_state_dict, save_state, sha256
from clat.runs.folder import RunDir
from clat.training.loop import train

# Written by clat before record schema 2 (commit 09635f1, a tiny_cnn PGD-AT -> CLAT run; copied from its files as they are).
OLD_ROW = ('{"epoch": 3, "stage": "finetune", "method": "clat", "lr": 0.07500000000000001, "train": {"acc": 0.1875, '
           '"ce": 2.239694118499756, "feature_dist": 7.603357791900635, "loss": 3.0000298023223877}, "trainable_params": 73984, '
           '"total_params": 98970, "optimizer_state_bytes": 295936, "epoch_time_s": 0.3898460865020752, "selection": {"epoch": 2, '
           '"stage_epoch": 0, "selected": ["features.3.0"], "selected_index": [3], "criticality": [0.0003641026960394811, '
           '0.6969774734842917, 0.686755396245019, 0.6985103707182627, 6.305329897638919], "weakness": [0.0003641026960394811, '
           '0.00025377137717441656, 0.0001742788626870606, 0.00012173559298389591, 0.0007675830740481616], "denominator": "upstream", '
           '"trainable_params": 73984, "lam": 0.1}, "selected": ["features.3.0"], "val": {"clean_acc": 0.3125, "pgd_acc": 0.3125, '
           '"n": 16}, "time_s": 0.4389791488647461}')
OLD_SUMMARY = ('{"run_dir": "old_full", "data": "synthetic", "model": {"model": "tiny_cnn", "num_classes": 10, "normalize": true}, '
               '"epochs": 5, "final_val": {"clean_acc": 0.3125, "pgd_acc": 0.3125, "n": 16}, "selection_history": [{"epoch": 2, '
               '"stage_epoch": 0, "selected": ["features.3.0"], "selected_index": [3], "criticality": [0.0003641026960394811, '
               '0.6969774734842917, 0.686755396245019, 0.6985103707182627, 6.305329897638919], "weakness": [0.0003641026960394811, '
               '0.00025377137717441656, 0.0001742788626870606, 0.00012173559298389591, 0.0007675830740481616], "denominator": "upstream", '
               '"trainable_params": 73984, "lam": 0.1}, {"epoch": 4, "stage_epoch": 2, "selected": ["features.3.0"], '
               '"selected_index": [3], "criticality": [0.00036359651858219877, 0.6978336008980971, 0.6834260249178665, '
               '0.8624910723964425, 6.564772826297985], "weakness": [0.00036359651858219877, 0.00025372986783622764, '
               '0.0001734055949782487, 0.00014956077757233288, 0.000981832528486848], "denominator": "upstream", '
               '"trainable_params": 73984, "lam": 0.1}], "trainable_params_last": 73984, "total_params": 98970, "layers": 5, '
               '"wall_time_s_this_session": 2.366497278213501, "train_time_s": 2.071913003921509, "world_size": 1, "precision": "fp32", '
               '"versions": {"clat": "0.2.0", "torch": "2.13.0+cpu", "python": "3.11.7", '
               '"git_commit": "09635f19994094df788ca607c66fe1479a2299de"}, "best_epoch": 1, "best_metric": "val.pgd_acc", '
               '"best_value": 0.3125, "best_clean_acc": 0.3125, "stopped_early": false, "finished": true}')
OLD_META = ('{"epoch": 4, "sha256": {"model.safetensors": "510d6ad8abbad1c711153583d369499295776391e1a302c56a89a0b242ded469", '
            '"state.pt": "ecb5a396cbe1caf0d6fc9b76871104154a4ae214dddfb8a7bca4aa0dd3a92f1c"}, "model": "tiny_cnn", "num_classes": 10, '
            '"normalize": true, "stage": "finetune", "method": "clat", "cpu_threads": 1, "health": {"loss": 2.9843780994415283, '
            '"max_abs_param": 1.0023083686828613, "limit": 1000.0, "sound": true, "unsound_since": null}}')

FAST = ["model.name=tiny_cnn", "attack.steps=1", "clat.criticality.steps=1", "clat.criticality.batch_size=16", "data.batch_size=32",
        "eval.n_examples=16", "eval.steps=1", "progress=false", "data.dataset=bundled", "deterministic=true"]
RUN = FAST + ["pretrain.epochs=2", "finetune.epochs=3", "clat.reselect_every=2", "keep_checkpoints=3"]


def tiny_splits(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 3, 32, 32, generator=g) * 255).to(torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return Splits(x, y, x[:16], y[:16], x[:16], y[:16], 10, "synthetic")


# -- the records, old and new ---------------------------------------------------------------------------------------
def test_old_records_read_in_todays_numbering_with_every_number_kept():
    old = json.loads(OLD_ROW)
    row = MetricsRow.from_dict(old)
    assert (row.epoch, row.stage, row.method, row.train, row.val, row.extra) == (3, "finetune", "clat", old["train"], old["val"],
                                                                                    {"selected": ["features.3.0"]})
    sel = row.selection
    assert (sel.epoch, sel.epoch_in_stage) == (3, 1)  # the epoch it trains: the row's own, and the stage's first
    assert sel.criticality == old["selection"]["criticality"] and sel.lam == 0.1 and sel.denominator == "upstream"
    new = row.to_dict()
    assert new["schema"] == SCHEMA and new["selection"]["epoch"] == new["epoch"] == 3 and "stage_epoch" not in new["selection"]
    assert {k: v for k, v in new.items() if k not in ("schema", "selection")} == {k: v for k, v in old.items() if k != "selection"}
    assert MetricsRow.from_dict(new) == row and current_row(old) == new

    s = Summary.from_dict(json.loads(OLD_SUMMARY))
    assert [(h.epoch, h.epoch_in_stage) for h in s.selection_history] == [(3, 1), (5, 3)]
    assert s.extra["best_epoch"] == 1 and s.finished and s.model["model"] == "tiny_cnn"
    assert Summary.from_dict(s.to_dict()) == s and current_summary(json.loads(OLD_SUMMARY)) == s.to_dict()
    assert checkpoint_epoch(json.loads(OLD_META)) == 5  # the old folder epoch_0004 holds the weights after epoch 5


def test_a_record_of_a_newer_clat_is_a_one_line_error():
    with pytest.raises(ClatError, match=r"written by a newer clat \(record schema 99; this clat reads up to 2\)"):
        MetricsRow.from_dict({**json.loads(OLD_ROW), "schema": 99})
    with pytest.raises(ClatError, match="invalid schema version"):
        SelectionEvent.from_dict({"schema": "2", "epoch": 1})


def test_a_method_returns_a_typed_selection_numbered_as_the_row():
    model = create_model("tiny_cnn")
    cfg = load_config(None, ["clat.k=1", "clat.criticality.steps=1", "clat.criticality.batch_size=4", "attack.steps=1"])
    method = create_method("clat", cfg, find_layers(model))
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    from clat.methods import EpochContext
    ev = method.on_epoch_start(model, EpochContext(4, 0, lambda n: (x[:n], y[:n]), torch.Generator().manual_seed(0)))["selection"]
    assert isinstance(ev, SelectionEvent) and (ev.epoch, ev.epoch_in_stage) == (5, 1)  # the run's 5th epoch, the stage's 1st
    assert method.state_dict()["history"] == [ev.to_dict()]


# -- a run: one numbering in metrics, checkpoints, selections, summary and report -----------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("records") / "ref"
    train(load_config(None, RUN), run, data=tiny_splits())
    return run


def test_a_run_numbers_its_epochs_one_way(reference):
    rd = RunDir(reference)
    rows = rd.metrics()
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5] and all(r["schema"] == SCHEMA for r in rows)
    assert [r["selection"]["epoch"] for r in rows if "selection" in r] == [3, 5]  # selections sit in the row of the epoch they train
    assert [r["selection"]["epoch_in_stage"] for r in rows if "selection" in r] == [1, 3]
    assert [d.name for d in rd.checkpoints().list()] == ["epoch_0003", "epoch_0004", "epoch_0005"]
    assert rd.checkpoints().epochs() == [3, 4, 5]
    for d in rd.checkpoints().list():
        meta = json.loads((d / "meta.json").read_text())
        assert meta["schema"] == SCHEMA and f"epoch_{meta['epoch']:04d}" == d.name == f"epoch_{load_state(d / 'state.pt')['epoch']:04d}"
    last, final = read_state_dict(rd.checkpoints().weights(epoch=5)), read_state_dict(rd.weights_path)
    assert torch.equal(last["classifier.weight"], final["classifier.weight"])
    s = json.loads(rd.summary_path.read_text())
    assert s["schema"] == SCHEMA and [h["epoch"] for h in s["selection_history"]] == [3, 5]
    assert [r.epoch for r in rd.metric_rows()] == [1, 2, 3, 4, 5]
    with pytest.raises(TypeError):
        rd.checkpoints().weights(4)  # an epoch counted from 0 by an older caller fails, never picks the wrong weights


def _as_written_before_schema_2(run):
    """The run folder as clat wrote it before record schema 2 (OLD_ROW, OLD_SUMMARY, OLD_META): no schema fields,
    selections counted from 0 (``stage_epoch``), checkpoint folders and their epochs counted from 0."""
    mp = run / "metrics.jsonl"
    rows = [json.loads(l) for l in mp.read_text().splitlines()]
    for r in rows:
        del r["schema"]
        if "selection" in r:
            sel = r["selection"]
            old = {"epoch": sel["epoch"] - 1, "stage_epoch": sel.pop("epoch_in_stage") - 1}
            r["selection"] = {**old, **{k: v for k, v in sel.items() if k not in ("schema", "epoch")}}
    mp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert list(json.loads(OLD_ROW)["selection"]) == list(next(r["selection"] for r in rows if "selection" in r))  # the old layout
    for d in sorted((run / "checkpoints").iterdir()):
        state = load_state(d / "state.pt")
        del state["schema"]
        state["epoch"] -= 1
        save_state(d / "state.pt", state)
        meta = json.loads((d / "meta.json").read_text())
        del meta["schema"]
        meta["epoch"] -= 1
        meta["sha256"]["state.pt"] = sha256(d / "state.pt")
        assert list(meta) == list(json.loads(OLD_META))
        (d / "meta.json").write_text(json.dumps(meta))
        d.rename(d.parent / f"epoch_{meta['epoch']:04d}")


def test_an_old_run_folder_loads_resumes_bit_exactly_and_reports(reference, tmp_path):
    run = tmp_path / "old"
    train(load_config(None, RUN), run, data=tiny_splits(), until_epoch=3)
    _as_written_before_schema_2(run)
    rd = RunDir(run)
    assert [d.name for d in rd.checkpoints().list()] == ["epoch_0000", "epoch_0001", "epoch_0002"]
    assert rd.checkpoints().epochs() == [1, 2, 3] and rd.checkpoints().dir(epoch=3).name == "epoch_0002"
    assert rd.latest_weights() == run / "checkpoints" / "epoch_0002" / "model.safetensors"
    assert [r["selection"]["epoch"] for r in rd.metrics() if "selection" in r] == [3]  # read in today's numbering
    from clat.runs.loading import load_model
    model, _ = load_model(run)  # the old folder's weights load (what `clat eval RUN` evaluates)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)

    s = train(None, run, resume=True, data=tiny_splits())  # continues after epoch 3, from the folder named epoch_0002
    ref = read_state_dict(reference / "model.safetensors")
    assert all(torch.equal(v, ref[k]) for k, v in read_state_dict(run / "model.safetensors").items())
    assert [h["epoch"] for h in s["selection_history"]] == [3, 5] and [h["epoch_in_stage"] for h in s["selection_history"]] == [1, 3]
    assert [d.name for d in rd.checkpoints().list()] == ["epoch_0002", "epoch_0004", "epoch_0005"]  # the old one, then today's names
    assert rd.checkpoints().epochs() == [3, 4, 5]
    assert ["schema" in json.loads(l) for l in rd.metrics_path.read_text().splitlines()] == [False, False, False, True, True]

    from clat.analysis.report import run_report
    text = run_report(run).read_text()
    table = text[text.index("## Critical layers over time"):]
    assert "| 3 | features." in table and "| 5 | features." in table


def test_a_report_of_old_files_labels_selections_by_the_epoch_they_train(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("model: {name: tiny_cnn}\n")
    (run / "metrics.jsonl").write_text(OLD_ROW + "\n")
    (run / "summary.json").write_text(OLD_SUMMARY)
    from clat.analysis.report import run_report
    text = run_report(run).read_text()
    table = text[text.index("## Critical layers over time"):]
    assert "| 3 | features.3.0 | [3] | 73,984 | 0.1 |" in table and "| 5 | features.3.0 | [3] | 73,984 | 0.1 |" in table


# -- CLAT's k and chunk size: one resolution ------------------------------------------------------------------------
@pytest.mark.parametrize("k", [None, 2])
def test_the_cli_python_and_the_config_give_the_same_k(tmp_path, k, capsys):
    over = ["model.name=tiny_cnn", "data.dataset=bundled", "data.train_size=100", "data.val_size=20", "data.batch_size=32",
            "pretrain.epochs=1", "finetune.epochs=0", "attack.steps=1", "eval.n_examples=8", "eval.steps=1", "progress=false",
            *([f"clat.k={k}"] if k else [])]
    cfg = load_config(None, over)
    run = tmp_path / "run"
    train(cfg, run)
    assert main(["-q", "criticality", str(run), "--batch-size", "8", "--steps", "1", "--out", str(tmp_path / "c")]) == 0
    cli_k = json.loads((tmp_path / "c" / "criticality.json").read_text())["k"]
    layers = find_layers(create_model("tiny_cnn"))
    python_k = create_method("clat", cfg, layers, zoo_model="tiny_cnn").k
    assert cli_k == python_k == resolve_k(cfg.clat.k, layers, "tiny_cnn") == (k or 1)
    assert f"top-{cli_k}:" in capsys.readouterr().out


def test_the_chunk_size_is_resolved_once():
    layers = find_layers(create_model("tiny_cnn"))
    for over, chunk in (([], reselection_chunk(128)), (["clat.criticality.chunk_size=7"], 7)):
        cfg = load_config(None, ["data.batch_size=128", *over])
        assert create_method("clat", cfg, layers).chunk_size == resolve_chunk(cfg.clat.criticality.chunk_size, 128) == chunk
    from clat.methods.clat import CLAT
    cfg = load_config(None, ["clat.k=2"])
    with pytest.raises(ConfigError, match="clat.k=2 but CLAT was built with k=1"):
        CLAT(cfg.attack, cfg.clat, layers, k=1)


# -- config variants from typed values ------------------------------------------------------------------------------
def test_a_variant_from_typed_values_is_the_config_of_the_same_overrides():
    values = {"clat.lam": 0.05, "attack.alpha": 3 / 255, "finetune.epochs": 2, "init": "w.safetensors", "progress": False,
              "clat.criticality.denominator": "input"}
    text = ["clat.lam=0.05", "attack.alpha=3/255", "finetune.epochs=2", "init=w.safetensors", "progress=false",
            "clat.criticality.denominator=input"]
    assert variant(None, values) == load_config(None, text)
    base = load_config(None, ["clat.lam=0.2"])
    new, changed = override(base, {"clat.lam": 0.5})
    assert new.clat.lam == 0.5 and base.clat.lam == 0.2 and changed == {"clat.lam": [0.2, 0.5]}
    with pytest.raises(ConfigError, match="unknown config key 'clat.lamda'"):
        variant(None, {"clat.lamda": 0.1})
    with pytest.raises(ConfigError, match="clat.reselect_every must be an integer"):
        variant(None, {"clat.reselect_every": "often"})


def test_the_demo_configs_are_those_of_its_former_overrides():
    from clat.cli.demo import FAST, _base_values
    s = FAST
    old = ["data.dataset=bundled", f"model.name={s.model}", f"data.train_size={s.train_size}", f"data.val_size={s.val_size}",
           f"data.test_size={s.test_size}", f"attack.steps={s.attack_steps}", f"attack.alpha={s.attack_alpha}",
           f"eval.n_examples={min(s.val_examples, s.val_size)}", f"eval.steps={s.val_steps}", "progress=false", "seed=0",
           "channels_last=true"]
    assert variant(None, {**_base_values(s, False), "clat.lam": s.lam}) == load_config(None, old + [f"clat.lam={s.lam}"])


def test_an_old_checkpoint_folder_copied_by_export_keeps_its_numbering(reference, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(reference, src)
    (src / "summary.json").unlink()  # an unfinished run: export copies its latest checkpoint
    assert RunDir(src).export(tmp_path / "dst", weights_of_epochs={3}) == "checkpoint"
    out = RunDir(tmp_path / "dst").checkpoints()
    assert [d.name for d in out.list()] == ["epoch_0003", "epoch_0005"] and out.epochs() == [3, 5]
