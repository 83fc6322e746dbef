"""The study's one command (scripts/study.py) runs end to end at toy size and resumes."""

import argparse
import ast
import dataclasses
import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


STUDY_SCRIPTS = ("study", "study_report", "study_settings", "study_verdict")


@pytest.fixture
def study(monkeypatch):
    """scripts/study.py imported afresh (the tests replace some of its functions), dropped afterwards."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    for m in STUDY_SCRIPTS:
        sys.modules.pop(m, None)
    yield importlib.import_module("study")
    for m in STUDY_SCRIPTS:
        sys.modules.pop(m, None)


def test_the_study_scripts_import_as_a_tree():
    """study.py imports study_report and study_settings; study_report imports study_settings, never study.py."""
    imports = {}
    for m in STUDY_SCRIPTS:
        tree = ast.parse((REPO / "scripts" / f"{m}.py").read_text())
        imports[m] = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not any(isinstance(n, ast.Global) for n in ast.walk(tree)), f"{m}.py rebinds a module global"
    assert "study" not in imports["study_report"] | imports["study_settings"]
    assert "study_report" not in imports["study_settings"]
    assert not {"study", "study_report"} & imports["study_verdict"]


@pytest.mark.slow
def test_study_pipeline_at_toy_size_renders_results_and_resumes(study, tmp_path, shared_cifar, monkeypatch):
    settings_of = study.settings_of  # four of the arms: the pipeline, not every arm
    monkeypatch.setattr(study, "settings_of",
                        lambda args: dataclasses.replace(settings_of(args), arms=("pgd_at_cont", "clat", "trades_cont", "trades_clat")))
    assert study.main(["--smoke", str(tmp_path), "--hours", "0"]) == 0  # budget spent at once: nothing done, report renders
    assert "0 of" in (tmp_path / "results.md").read_text()
    # parallel workers (--seeds/--arms) refuse to start before the items every arm shares are done
    assert study.main(["--smoke", str(tmp_path), "--arms", "clat", "--no-report"]) == 1
    with pytest.raises(SystemExit):  # a worker must not render the shared report
        study.main(["--smoke", str(tmp_path), "--seeds", "2", "--arms", "clat"])

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
    shutil.rmtree(tmp_path / "runs")
    monkeypatch.setattr(study.Budget, "check", real_check)
    assert study.main(["--smoke", str(tmp_path)]) == 0
    assert not partial.exists()
    pre = json.loads((tmp_path / "study" / "results" / "pgd_at_pretrain.json").read_text())
    assert [r["epoch"] for r in pre["rows"]] == [1, 2, 3]
    text = (tmp_path / "results.md").read_text()
    assert "the study is complete" in text and "TRADES + CLAT − TRADES continued" in text
    assert "### CLAT against its ablations" in text and "In total, the runs behind this page took" in text
    assert "| arm − its branch checkpoint |" in text
    r = json.loads((tmp_path / "study" / "results" / "clat_s1.json").read_text())
    assert r["trainable_params"] < r["total_params"] and r["test"]["n_aa"] == 8 and len(r["rows"]) == 2
    assert r["test"]["aa_acc"] <= r["test"]["aa_clean_acc"]
    for img in ("study_overfitting.png", "study_curves.png", "study_criticality.png"):
        assert (tmp_path / "img" / img).stat().st_size > 1000
    # a session that ends during an arm's AutoAttack keeps the trained weights: a fresh clone re-runs only the missing chunk
    before = json.loads((tmp_path / "study" / "results" / "clat_s1.json").read_text())
    study.save_partial(study.StudySettings.smoke(tmp_path), tmp_path / "runs" / "clat_s1")
    assert (tmp_path / "study" / "partial" / "clat_s1" / "model.safetensors").is_file()
    shutil.rmtree(tmp_path / "runs" / "clat_s1")
    (tmp_path / "study" / "results" / "clat_s1.json").unlink()
    (tmp_path / "study" / "eval" / "clat_s1" / "aa_00004.json").unlink()
    assert study.main(["--smoke", str(tmp_path)]) == 0
    after = json.loads((tmp_path / "study" / "results" / "clat_s1.json").read_text())
    assert after["rows"] == before["rows"] and after["test"]["aa_acc"] == before["test"]["aa_acc"]
    assert (tmp_path / "study" / "eval" / "clat_s1" / "aa_00004.json").is_file()
    assert not (tmp_path / "study" / "partial" / "clat_s1").exists()
    # every result records the machines that trained and evaluated it
    assert after["train_devices"] == [study.device_label()] and after["test"]["eval_devices"] == [study.device_label()]
    # a worker of a parallel run (scripts/study_gpu.sh): one arm, a seed beyond the plan, no report
    assert study.main(["--smoke", str(tmp_path), "--seeds", "2", "--arms", "clat", "--no-report"]) == 0
    results = tmp_path / "study" / "results"
    assert sorted(f.name for f in results.glob("*_s2.json")) == ["clat_s2.json"]
    # a seed trained on another machine: the report names the machines by seed and times them apart
    r2 = json.loads((results / "clat_s2.json").read_text())
    r2["train_devices"] = ["NVIDIA H100 80GB HBM3"]
    (results / "clat_s2.json").write_text(json.dumps(r2))
    assert study.main(["--smoke", str(tmp_path), "--report"]) == 0
    text = (tmp_path / "results.md").read_text()
    assert "seed 2 on NVIDIA H100 80GB HBM3" in text and f"| {study.ARMS['clat'][3]} | 3 |" in text
    assert "(CPU ×2) · " in text and "(H100 ×1) |" in text
    # only the latest checkpoint and the best validation epoch's are kept on disk
    for run in (tmp_path / "runs").iterdir():
        if (run / "checkpoints").is_dir():
            assert 1 <= len(list((run / "checkpoints").glob("epoch_*"))) <= 2, run


@pytest.mark.slow
def test_study_gpu_script_runs_one_worker_per_arm_and_packs_what_they_wrote(study, tmp_path, shared_cifar):
    """scripts/study_gpu.sh (more seeds on a lent GPU): workers in parallel, their output packed in <16 MiB parts."""
    import subprocess
    import tarfile

    env = {**__import__("os").environ, "PY": sys.executable, "HOURS": "1", "ARMS": "pgd_at_cont clat", "LOGS": str(tmp_path / "logs"),
           "STUDY_ARGS": f"--smoke {tmp_path}", "STUDY_DIR": str(tmp_path / "study"), "OUT": str(tmp_path / "out")}
    (tmp_path / "out").mkdir()
    script = ["bash", str(REPO / "scripts" / "study_gpu.sh"), "5"]
    r = subprocess.run(script, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "not done yet" in r.stderr + r.stdout  # no shared items yet: no worker starts
    s = study.StudySettings.smoke(tmp_path)  # the items all arms share: pretraining, λ, the branch evaluations
    budget = study.Budget(1)
    study.do_trades_pretraining(s, budget, study.do_pretraining(s, budget)["epoch"])
    study.do_lambda_sweep(s, budget)
    study.do_reference(s, "pgd_at", budget)
    study.do_reference(s, "trades", budget)
    r = subprocess.run(script, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all workers ended" in r.stdout
    parts = sorted((tmp_path / "out").glob("study.tgz.*"))
    assert parts and all(p.stat().st_size <= 15 * 2**20 for p in parts)
    (tmp_path / "joined.tgz").write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(tmp_path / "joined.tgz") as t:
        names = t.getnames()
    for arm in ("pgd_at_cont", "clat"):
        assert any(n.endswith(f"study/results/{arm}_s5.json") for n in names), names
        assert any(n.endswith(f"logs/{arm}.log") for n in names)
    assert not any(n.endswith("branch.json") for n in names)  # only what the workers wrote


def test_trained_arm_stays_in_partial_until_its_result_is_written(study, tmp_path, monkeypatch):
    """A session killed during an arm's evaluation (not only one whose budget ends) keeps the trained
    weights in study/partial/ (committed); only the written result lets them go."""
    s = study.StudySettings.smoke(tmp_path)
    partial = s.study / "partial" / "clat_s3"
    partial.mkdir(parents=True)
    summary = {"trainable_params_last": 5, "total_params": 10, "train_time_s": 1.0, "selection_history": []}
    (partial / "summary.json").write_text(json.dumps(summary))
    (partial / "metrics.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")
    (partial / "model.safetensors").write_bytes(b"weights")
    monkeypatch.setattr(study, "arm_cfg", lambda *a: None)
    monkeypatch.setattr(study, "_train_epochs", lambda *a: None)  # already trained: nothing to do

    def killed(*a, **k):
        raise KeyboardInterrupt  # what a session's end does to the process

    monkeypatch.setattr(study, "evaluate_weights", killed)
    with pytest.raises(KeyboardInterrupt):
        study.do_arm(s, "clat", 3, 0.1, study.Budget(1))
    assert (partial / "model.safetensors").read_bytes() == b"weights"
    assert (s.runs / "clat_s3" / "model.safetensors").is_file()  # restored for the evaluation

    monkeypatch.setattr(study, "evaluate_weights", lambda *a, **k: {"clean_acc": 0.5})
    study.do_arm(s, "clat", 3, 0.1, study.Budget(1))
    assert json.loads((s.results / "clat_s3.json").read_text())["test"] == {"clean_acc": 0.5}
    assert not partial.exists()


def test_arm_trained_this_session_is_kept_in_partial_before_its_evaluation(study, tmp_path, monkeypatch):
    """An arm trained from scratch in this session has its weights copied to study/partial/ before the
    evaluation starts, so a session killed during the evaluation loses no training."""
    s = study.StudySettings.smoke(tmp_path)
    summary = {"trainable_params_last": 5, "total_params": 10, "train_time_s": 1.0, "selection_history": []}

    def train(run, *a):
        if (run / "summary.json").is_file():
            return  # trained already (what clat.train does then)
        assert not study.partial_dir(s, run).exists(), "a fresh arm: nothing saved yet"
        run.mkdir(parents=True, exist_ok=True)
        for name, text in (("config.yaml", "x: 1\n"), ("metrics.jsonl", json.dumps({"epoch": 1}) + "\n"),
                           ("summary.json", json.dumps(summary)), ("model.safetensors", "trained")):
            (run / name).write_text(text)

    monkeypatch.setattr(study, "arm_cfg", lambda *a: None)
    monkeypatch.setattr(study, "_train_epochs", train)

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(study, "evaluate_weights", killed)
    with pytest.raises(KeyboardInterrupt):
        study.do_arm(s, "lora", 3, 0.1, study.Budget(1))
    partial = study.partial_dir(s, s.runs / "lora_s3")
    assert (partial / "model.safetensors").read_text() == "trained"
    assert json.loads((partial / "summary.json").read_text()) == summary
    # the next session (a fresh clone: no runs/) evaluates those weights without training again
    shutil.rmtree(s.runs / "lora_s3")
    monkeypatch.setattr(study, "evaluate_weights", lambda _s, path, *a, **k: {"weights": path.read_text()})
    study.do_arm(s, "lora", 3, 0.1, study.Budget(1))
    assert json.loads((s.results / "lora_s3.json").read_text())["test"] == {"weights": "trained"}
    assert not partial.exists()


@pytest.mark.parametrize("name", ["cifar10_preact_resnet18", "cifar10_wrn34_10", "cifar100_preact_resnet18", "cifar100_wrn34_10"])
def test_paper_scale_presets_configure_every_arm(name, study, tmp_path):
    """--scale NAME points the same study at full CIFAR on a GPU: its own folders, 50-epoch arms, the model's k."""
    assert set(study.PAPER_SCALE) == {"cifar10_preact_resnet18", "cifar10_wrn34_10", "cifar100_preact_resnet18", "cifar100_wrn34_10"}
    s = study.StudySettings.paper(name, tmp_path / "data")
    dataset, model = name.split("_", 1)
    assert s.runs.name == f"study_{name}" and s.doc.name == f"results_{name}.md" and s.study.parts[-2:] == ("paper", name)
    pre = study.pretrain_cfg(s)
    assert (pre.model.name, pre.data.dataset, pre.pretrain.epochs, pre.attack.steps) == (model, dataset, 50, 10)
    assert pre.data.download and pre.data.root == str(tmp_path / "data")
    for arm in study.ARMS:
        cfg = study.arm_cfg(s, arm, 1, 0.1 if arm in study.CLAT_ARMS else None)
        assert cfg.finetune.epochs == 50 and cfg.pretrain.epochs == 0 and cfg.clat.reselect_every == 10 and cfg.seed == 1
        assert cfg.init.endswith(f"{study.ARMS[arm][0]}_branch.safetensors") and cfg.data.dataset == dataset
    extra = sum(len(set(seeds) - set(s.seeds)) for arm, seeds in s.extra_seeds.items() if arm in s.arms)
    assert len(study.plan(s)) == 5 + len(s.seeds) * len(study.ARMS) + extra and not any(done for _, done in study.plan(s))
    s = dataclasses.replace(s, doc=tmp_path / "results.md", img=tmp_path / "img", study=tmp_path / "study")  # render outside the repo
    importlib.import_module("study_report").render(s)
    text = s.doc.read_text()
    assert ("full CIFAR-100" if dataset == "cifar100" else "full CIFAR-10") in text and "subset" not in text
    assert f"--scale {name}" in text
    # a preset is a study of its own: the CPU study's settings are untouched
    cpu = study.StudySettings.cpu()
    assert cpu == study.StudySettings() and cpu.f_epochs == 20 and cpu.arm_settings["clat.reselect_every"] == 4
    assert cpu.text["title"] == "the CIFAR-10 subset" and cpu.runs == REPO / "runs" / "study"


def test_smoke_settings_shrink_the_study_they_are_given(study, tmp_path):
    """--smoke DIR alone is the CPU study at toy size; with --scale it is that preset at toy size."""
    def args(scale=None, smoke=None):
        return argparse.Namespace(scale=scale, data_root=str(tmp_path / "data"), smoke=smoke, variant=None)

    assert study.settings_of(args()) == study.StudySettings.cpu()
    s = study.settings_of(args(smoke=str(tmp_path)))
    assert s.doc == tmp_path / "results.md" and s.results == tmp_path / "study" / "results" and s.pilot == study.StudySettings.cpu().pilot
    assert s.extra[0] == f"data.root={study.StudySettings.cpu().data_root}" and "model.name=tiny_cnn" in s.extra
    assert s.arm_settings["finetune.epochs"] == 2 and s.arm_settings["clat.reselect_every"] == 4
    p = study.settings_of(args("cifar100_wrn34_10", str(tmp_path)))
    assert p.dataset == "cifar100" and p.pilot is None and p.arm_settings["clat.reselect_every"] == 10 and p.f_epochs == 2
    assert p.extra[0] == f"data.root={(tmp_path / 'data').resolve()}" and p.runs == tmp_path / "runs"


def test_report_names_machines_by_kind_not_by_cpu_thread_count(study):
    """A CPU run resumed at another thread count is one machine ("CPU"); records from before the fix read "1 thread"."""
    report = importlib.import_module("study_report")
    assert report.devices(["CPU (2 threads)", "CPU (1 thread)"]) == "CPU"
    assert report.devices(["NVIDIA H100 80GB HBM3", "CPU (2 threads)"]) == "H100 + CPU"
    assert report.train_device({"train_devices": ["CPU (1 threads)"]}) == "CPU (1 thread)"  # records written before the fix
    cpu1, cpu2, h100 = (["CPU (1 threads)"], ["CPU (2 threads)"], ["NVIDIA H100 80GB HBM3"])
    res = {"a": {0: {"train_devices": cpu2}, 1: {"train_devices": cpu2}},
           "b": {0: {"train_devices": cpu1}, 1: {"train_devices": h100}}}
    assert "seeds 0, 1 on CPU (2 threads); seed 0 on CPU (1 thread); seed 1 on NVIDIA H100" in report.devices_by_seed(res)
    # the cost line groups evaluations by machine: old and new records of one 1-thread CPU are one group
    evals = {"a": {s: {"test": {"eval_devices": d, "eval_time_s": 60.0 * (s + 1)}} for s, d in enumerate([cpu1, ["CPU (1 thread)"]])}}
    text = "\n".join(report.reproduce_section(study.StudySettings.cpu(), report.Finished([], None, None, None, evals, {})))
    assert "2 min per run on CPU (1 thread) (2 runs)" in text and "threads) (1 run" not in text
    # a run trained on the CPU and resumed on a GPU is timed under both machines, not the first one alone
    run = {"test": {"clean_acc": 0.4, "pgd20x5_acc": 0.2, "pgd20x5_acc_aa_images": 0.2, "aa_acc": 0.2},
           "trainable_params": 10, "total_params": 100, "train_time_s": 120.0, "train_devices": cpu2 + h100}
    assert "2.0 min (CPU + H100 ×1)" in report.arm_row("pgd_at_cont", [run])


def test_time_a_worker_was_stopped_is_measured_and_left_out_of_the_reported_times(study, tmp_path, monkeypatch):
    """A worker stopped (SIGSTOP) while CI had the cores: its thread wakes late, the gap is recorded beside the epoch and
    the report counts the epoch's wall time less it; an item without the record counts its whole wall time."""
    meter = study.PauseMeter()
    for now in (0.0, 1.0, 2.0, 3.0 + study.PauseMeter.GAP + 5, 4.0 + study.PauseMeter.GAP + 5):
        meter.observe(now)
    assert meter.stopped == pytest.approx(study.PauseMeter.GAP + 5)  # the late wake-up, less the second it sleeps
    monkeypatch.setattr(study, "PAUSES", meter)
    run = tmp_path / "run"
    run.mkdir()
    mark = study.pause_mark()
    meter.observe(100.0)  # stopped again during this "epoch"
    meter.observe(101.0)
    study.write_json(run / study.PAUSED_FILE, {"8": study.paused_since(mark)})
    assert study.train_paused_s(run) == pytest.approx(100.0 - (4.0 + study.PauseMeter.GAP + 5) - 1.0, abs=0.1)
    report = importlib.import_module("study_report")
    x = {"arm": "pgd_at_cont", "seed": 2, "train_time_s": 1000.0, "train_paused_s": 400.0, "train_devices": ["CPU (1 thread)"],
         "test": {"eval_time_s": 900.0, "eval_paused_s": 300.0, "eval_devices": ["CPU (1 thread)"]}}
    assert report.train_time(x) == 600.0 and report.eval_time(x["test"]) == 600.0
    assert report.train_time({"train_time_s": 5.0}) == 5.0 and report.eval_time({"eval_time_s": 7.0}) == 7.0
    no_trades = dataclasses.replace(study.StudySettings.cpu(), arms=("pgd_at_cont", "clat_paper_auto"), pilot=None)
    line = report.compute_total(no_trades, {"pgd_at_cont": {2: x}}, {}, None)[0]
    assert "training the arms 10 min on CPU" in line and "evaluating them and the branch checkpoints 10 min on CPU" in line
    assert "less the time a worker was stopped" in line and "seed 2" in line
    assert "Not counted: the λ sweep's other runs." in line  # no TRADES arm, no pilot run on this page
    with_both = dataclasses.replace(no_trades, arms=("pgd_at_cont", "trades_clat"), pilot=study.StudySettings.cpu().pilot)
    assert with_both.pilot is not None
    line = report.compute_total(with_both, {"pgd_at_cont": {2: x}}, {}, None)[0]
    assert "Not counted: the TRADES pretraining to P, the λ sweep's other runs and the first attempt." in line


def test_the_screening_saving_is_the_time_standard_autoattack_spends_after_apgd_t(study, tmp_path):
    """Standard AutoAttack chunks timed stage by stage: FAB-T and Square's share is what the screening saves; a chunk whose
    worker was stopped, or timed before stages were, does not count."""
    verdict = importlib.import_module("study_verdict")
    s = dataclasses.replace(study.StudySettings.cpu(), study=tmp_path / "study")
    by = {"apgd-ce": 100.0, "apgd-t": 200.0, "fab-t": 50.0, "square": 40.0}
    chunks = {"a_s0/aa_00000": {"version": "standard", "time_s": 400.0, "time_s_by_attack": by},
              "a_s0/aa_00250": {"version": "standard", "time_s": 400.0, "time_s_by_attack": by},
              "a_s1/aa_00000": {"version": "standard", "time_s": 4000.0, "time_s_by_attack": by, "paused_s": 3600.0},
              "a_s2/aa_00000": {"version": "standard", "time_s": 500.0}}
    for name, c in chunks.items():
        study.write_json(s.study / "eval" / f"{name}.json", c)
    assert verdict.later_stage_time(s) == {"chunks": 2, "total_s": 800.0, "later_s": 180.0}


def test_validation_and_test_agreement_claims_intervals_only_over_two_seeds_or_more(study):
    """One seed has no interval over seeds (t_interval gives none, the verdict's JSON holds null): the agreement column
    compares signs only and says so, and the table shows the estimate with its seed count."""
    from clat.base.stats import t_interval

    verdict = importlib.import_module("study_verdict")
    report = importlib.import_module("study_report")
    one_v, one_t = t_interval([0.01]).to_dict(), t_interval([0.02]).to_dict()
    assert one_v["ci"] is None and one_v["p"] is None and json.loads(json.dumps(one_v)) == one_v
    assert verdict._agreement(0.01, one_v["ci"], 0.02, one_t["ci"]) == "same sign (1 seed: no interval)"
    assert verdict._agreement(-0.01, one_v["ci"], 0.02, one_t["ci"]) == "opposite sign (1 seed: no interval)"
    assert report._ci_txt(one_v) == "+1.0 (1 seed)"
    assert verdict._agreement(0.01, (0.005, 0.02), 0.02, (0.01, 0.03)) == "same sign, both intervals exclude 0"
    assert verdict._agreement(-0.01, (-0.02, -0.005), 0.02, (0.01, 0.03)) == "opposite sign (both intervals exclude 0: they disagree)"


@pytest.mark.slow
def test_record_arms_keep_records_and_weights_and_the_verdict_uses_them(study, tmp_path, shared_cifar, monkeypatch):
    """Issue 34: the arms of the primary comparisons keep per-image records and fp16 weights; a first-run result without
    records is set aside (with its reason) and redone; study/verdict.json holds the seeds × images interval and Holm's p."""
    import torch
    from safetensors.torch import load_file

    from clat.eval.records import load_record

    settings_of = study.settings_of
    monkeypatch.setattr(study, "settings_of", lambda args: dataclasses.replace(settings_of(args), arms=("pgd_at_cont", "clat_paper_auto"),
                                                                               extra_seeds={}))
    assert study.main(["--smoke", str(tmp_path)]) == 0
    st = tmp_path / "study"
    for item in ("pgd_at_cont_s0", "pgd_at_cont_s1", "clat_paper_auto_s0", "clat_paper_auto_s1"):
        r = json.loads((st / "results" / f"{item}.json").read_text())
        assert r["records"] and Path(r["weights"]) == st / "weights" / f"{item}.safetensors"  # (relative to the repo in the real study)
        rec = load_record(st / "eval" / item / "pgd.records.npz")
        assert rec.n == 40 and {"clean", "pgd"} <= set(rec.outcomes) and rec.meta["item"] == item
        assert abs(rec["pgd"].mean() - r["test"]["pgd20x5_acc"]) < 1e-9
        w = load_file(str(st / "weights" / f"{item}.safetensors"))
        assert all(v.dtype == torch.float16 for v in w.values() if v.is_floating_point())
    v = json.loads((st / "verdict.json").read_text())
    prim = {(c["a"], c["b"]): c for c in v["comparisons"] if c["family"] == "primary"}
    c = prim[("clat_paper_auto", "pgd_at_cont")]
    assert c["metrics"]["aa"]["seeds_images"] is not None and 0 <= c["p_holm"] <= 1
    # one seed's records not there yet (it waits for its re-run): the interval over the recorded seeds, named, not used for p
    held = [(f, f.read_bytes()) for f in (st / "eval" / "pgd_at_cont_s1").glob("*.records.npz")]
    for f, _ in held:
        f.unlink()
    assert study.main(["--smoke", str(tmp_path), "--report"]) == 0
    c = {(c["a"], c["b"]): c for c in json.loads((st / "verdict.json").read_text())["comparisons"]}[("clat_paper_auto", "pgd_at_cont")]
    aa = c["metrics"]["aa"]
    assert aa["seeds_images"] is None and aa["seeds_images_partial"]["seeds"] == [0] and aa["seeds_images_partial"]["n_seeds"] == 1
    assert "(seeds 0 of 2)" in (tmp_path / "results.md").read_text()
    for f, data in held:
        f.write_bytes(data)
    # a first-run result (no records) is set aside with its reason and redone with records
    f = st / "results" / "pgd_at_cont_s1.json"
    old = json.loads(f.read_text())
    f.write_text(json.dumps({k: v for k, v in old.items() if k not in ("records", "weights")}))
    assert study.main(["--smoke", str(tmp_path)]) == 0
    assert json.loads(f.read_text())["records"]
    aside = json.loads((st / "superseded" / "pgd_at_cont_s1.json").read_text())
    assert aside["superseded_because"] == study.RECORDS_WHY and (st / "superseded" / "eval" / "pgd_at_cont_s1").is_dir()


@pytest.mark.parametrize("name", ["vgg11_w16", "resnet18_w16_last"])
def test_study_variants_run_the_primary_arms_on_their_own_folders(name, study, tmp_path):
    """--variant NAME (issue 34): the CPU study's recipe on a second network or from the last pretraining epoch, the arms of
    the primary comparisons only, each with records and standard AutoAttack, in folders of its own."""
    s = study.StudySettings.variant(name)
    assert s.study.parts[-2:] == ("variants", name) and s.doc.name == f"results_{name}.md" and s.runs.name == f"study_{name}"
    assert set(s.arms) == set(sys.modules["study_settings"].VARIANT_ARMS) == set(s.record_arms) and not s.screen_arms and not s.extra_seeds
    assert {a for a, b in s.primary} | {b for a, b in s.primary} - {"branch"} <= set(s.arms)
    assert study.pretrain_cfg(s).model.name == ("vgg11_w16" if name == "vgg11_w16" else "resnet18_w16")
    names = [n for n, _ in study.plan(s)]
    assert "trades_pretrain (to P)" not in names and "eval trades branch" not in names
    assert len(names) == 3 + len(s.seeds) * len(s.arms)
    rows = [{"epoch": e, "val": {"pgd_acc": v}} for e, v in [(1, 0.1), (2, 0.3), (3, 0.2)]]
    assert study.branch_row(s, rows)["epoch"] == (2 if name == "vgg11_w16" else 3)
    for arm in s.arms:
        assert study.arm_cfg(s, arm, 0, 0.1 if arm in study.CLAT_ARMS else None).model.name == study.pretrain_cfg(s).model.name
    s = dataclasses.replace(s, doc=tmp_path / "results.md", img=tmp_path / "img", study=tmp_path / "study")
    report = importlib.import_module("study_report")
    report.render(s)
    page = (tmp_path / "results.md").read_text()
    assert BRANCH_WORDS[name] in page and f"`python scripts/study.py --variant {name}` continues it" in page
    # the design names the variant's arms only, and the page offers no GPU worker or paper preset of the CPU study
    assert "TRADES" not in page and "RiFT" not in page and "study_gpu.sh" not in page and "--scale" not in page
    # the CPU study's report shows each variant's primary comparisons beside its own, and keeps them in study/verdict.json
    v: dict = {}
    rows = report.variants_rows(dataclasses.replace(study.StudySettings.cpu(), variants=(name,)), v)
    assert list(v["variants"]) == [name] and any(f"`--variant {name}`" in r for r in rows)
    assert not report.variants_rows(s, {})  # a variant has no variants


BRANCH_WORDS = {"vgg11_w16": "highest validation PGD-10 accuracy", "resnet18_w16_last": "the last pretraining epoch"}
