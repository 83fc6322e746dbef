"""Kill a real `clat train` process with SIGKILL at many moments, resume, and compare
the final weights bit for bit with an uninterrupted run."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from clat.runs.checkpoint import read_state_dict

OVERRIDES = ["model.name=tiny_cnn", "data.dataset=bundled", "data.train_size=600", "data.val_size=100", "data.test_size=50",
             "data.batch_size=100", "attack.steps=1", "clat.criticality.steps=1", "clat.criticality.batch_size=20",
             "eval.n_examples=50", "eval.steps=1", "pretrain.epochs=3", "finetune.epochs=4", "clat.reselect_every=2",
             "finetune.lr=0.02", "keep_checkpoints=2", "deterministic=true"]  # bit-identical on GPUs too

# Fault injection lives here, not in the library: the child patches a function to SIGKILL itself.
CHILD = textwrap.dedent(
    """
    import importlib, os, signal, sys
    C = importlib.import_module("clat.runs.folder")  # Checkpoints.save looks save_state up here
    M = importlib.import_module("clat.methods.clat")
    mode, n = sys.argv[1], int(sys.argv[2])
    calls = [0]
    def die_on(fn):
        def wrapper(*a, **k):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **k)
        return wrapper
    if mode == "checkpoint":  # die after the weights are written, before state.pt / meta.json
        C.save_state = die_on(C.save_state)
    elif mode == "reselect":  # die inside a re-selection
        M.compute_criticality = die_on(M.compute_criticality)
    from clat.cli.main import main
    sys.exit(main(sys.argv[3:]))
    """
)


def _run(args, mode="none", n=0, kill_after=None, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    p = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(n), "-q", *args], env=env, cwd=cwd,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        out, err = p.communicate()
    return p.returncode, err.decode()


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_matches_uninterrupted(tmp_path):
    ref = tmp_path / "ref"
    t0 = time.time()
    rc, err = _run(["train", *OVERRIDES, "--run-dir", str(ref)])
    assert rc == 0, err
    duration = time.time() - t0
    expected = read_state_dict(ref / "model.safetensors")

    run = tmp_path / "killed"
    rng = random.Random(0)
    plan = [("checkpoint", 2), ("time", None), ("reselect", 1), ("time", None), ("checkpoint", 1), ("time", None), ("time", None)]
    kills, started, finished = 0, False, False
    for mode, n in plan:
        args = ["train", "--resume", str(run)] if started else ["train", *OVERRIDES, "--run-dir", str(run)]
        if mode == "time":  # a random moment within roughly the next third of the run
            rc, err = _run(args, kill_after=rng.uniform(1.0, max(1.5, duration / 3)))
        else:
            rc, err = _run(args, mode, n)
        started = True
        if rc == 0:
            finished = True
            break
        assert rc == -signal.SIGKILL, err
        kills += 1
    while not finished:  # finish the run
        rc, err = _run(["train", "--resume", str(run)])
        finished = rc == 0
        assert finished, err
    assert kills >= 4
    got = read_state_dict(run / "model.safetensors")
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    ref_rows = (ref / "metrics.jsonl").read_text().splitlines()
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == len(ref_rows) == 7
    for f in ("best/model.safetensors", "best/best.json"):  # the best epoch's weights too, byte for byte
        assert (run / f).read_bytes() == (ref / f).read_bytes(), f
    assert _csv(run / "metrics.csv") == _csv(ref / "metrics.csv")  # rewritten from metrics.jsonl: no row lost or repeated


def _csv(path):
    import csv

    rows = list(csv.reader(path.open()))
    keep = [i for i, h in enumerate(rows[0]) if h not in ("time_s", "epoch_time_s")]  # the clock differs, nothing else
    return [[r[i] for i in keep] for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("method", __import__("clat.methods", fromlist=["METHODS"]).METHODS)
def test_sigkill_at_the_stage_boundary_then_resume_matches_for_every_method(method, tmp_path):
    """Every method of the registry as the fine-tuning stage: SIGKILL while the first fine-tuning epoch's
    checkpoint is being written (its weights on disk, its state not), so the resume starts from the last
    pretraining checkpoint and sets the method up afresh; the final weights equal an uninterrupted run's."""
    if method == "lora":
        pytest.importorskip("peft")
    over = [*OVERRIDES, "pretrain.epochs=1", "finetune.epochs=2", "clat.reselect_every=1", f"finetune.method={method}",
            "rift.batch_size=20", "rift.steps=1", "rift.alphas=[0.0,0.5,1.0]", "data.train_size=300", "eval.n_examples=30"]
    rc, err = _run(["train", *over, "--run-dir", str(tmp_path / "ref")])
    assert rc == 0, err
    run = tmp_path / "killed"
    rc, err = _run(["train", *over, "--run-dir", str(run)], "checkpoint", 2)
    assert rc == -signal.SIGKILL, err
    rc, err = _run(["train", "--resume", str(run)])
    assert rc == 0, err
    want, got = read_state_dict(tmp_path / "ref" / "model.safetensors"), read_state_dict(run / "model.safetensors")
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
