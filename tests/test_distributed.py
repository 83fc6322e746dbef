"""Data-parallel training (clat.distributed): N gloo processes on the CPU take the same
steps as one process with the same global batch, across a CLAT re-selection."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from clat.runs.checkpoint import read_state_dict
from clat.config.load import load_config
from clat.base.errors import ConfigError
from clat.data.loader import Splits
from clat.training.loop import train

PER_RANK_BATCH = 16
OVER = ["model.name=tiny_cnn", "attack.steps=2", "clat.criticality.steps=2", "clat.criticality.batch_size=16",
        "eval.n_examples=16", "eval.steps=2", "progress=false", "data.dataset=bundled", "data.augment=true",
        "pretrain.epochs=1", "pretrain.lr=0.05", "finetune.epochs=3", "finetune.lr=0.05", "clat.reselect_every=2",
        "clat.selection=random", "clat.k=2", "seed=3", "device=cpu"]  # CPU processes (gloo) also where a GPU is visible


class NoBNNet(nn.Module):
    """No BatchNorm: with BatchNorm each rank normalizes with its own half batch (as under DDP),
    so only a BN-free model can match the single process exactly."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
        )

    def forward(self, x):
        return self.net(x)


def splits(n=112, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 3, 32, 32, generator=g) * 255).to(torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return Splits(x[16:], y[16:], x[:16], y[:16], x[:16], y[:16], 10, "synthetic")


def _run(run_dir, batch_size):
    torch.manual_seed(0)
    model = NoBNNet()
    return train(load_config(None, OVER + [f"data.batch_size={batch_size}"]), run_dir, model=model, data=splits())


def _worker(rank, world, init_file, run_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _run(run_dir, PER_RANK_BATCH)
        # both ranks done with gloo before either tears the group down (once in CI a rank was aborted,
        # "terminate called without an active exception", when the other exited mid-teardown)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _rows(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_processes_match_one_process_at_the_same_global_batch(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), tmp_path / "ddp"), nprocs=2, join=True)
    _run(tmp_path / "single", 2 * PER_RANK_BATCH)

    a, b = read_state_dict(tmp_path / "single" / "model.safetensors"), read_state_dict(tmp_path / "ddp" / "model.safetensors")
    start = NoBNNet().state_dict()
    for k in a:
        assert not torch.equal(a[k], start[k]) or "net.0" in k  # training moved the weights
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)

    single, ddp = _rows(tmp_path / "single"), _rows(tmp_path / "ddp")
    sel_s = [r["selection"]["selected"] for r in single if "selection" in r]
    sel_d = [r["selection"]["selected"] for r in ddp if "selection" in r]
    assert sel_s == sel_d and len(sel_d) == 2 and sel_d[0] != sel_d[1]  # a re-selection that changed the trainable set
    assert all(r["world_size"] == 2 for r in ddp)
    for rs, rd in zip(single, ddp):
        assert rd["train"]["loss"] == pytest.approx(rs["train"]["loss"], rel=1e-4)  # averaged over ranks
        assert rd["val"] == rs["val"]  # held-out counts summed over the ranks' shards
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert len(list((tmp_path / "ddp" / "checkpoints").iterdir())) == 2  # written once, by rank 0


def test_torchrun_launches_clat_train_on_two_cpu_processes(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "clat", "-q", "train",
           *OVER, "data.batch_size=16", "data.train_size=200", "data.val_size=40", "--run-dir", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and all(r["world_size"] == 2 for r in rows)
    assert out.stdout.count("done:") == 1  # one rank reports


def test_sync_bn_needs_gpus(tmp_path, monkeypatch):
    from clat.base import distributed

    monkeypatch.setattr(distributed, "info", lambda: distributed.DistInfo(0, 2, 0))
    with pytest.raises(ConfigError, match="SyncBatchNorm"):
        distributed.check_batch_norm(NoBNNet(), torch.device("cpu"), sync_bn=True)


def test_gradient_sync_buckets_keep_order_and_dtypes():
    from clat.base.distributed import _buckets

    ts = [torch.zeros(10), torch.zeros(10), torch.zeros(3, dtype=torch.float64), torch.zeros(100)]
    got = list(_buckets(ts, limit=80))
    assert [[t.numel() for t in b] for b in got] == [[10, 10], [3], [100]]


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    """torchrun --nproc_per_node 2 on a 1-GPU machine (seen on an H100 box): rank 1 has no cuda:1."""
    from clat.base import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: pytest.fail("set_device must not be reached"))
    with pytest.raises(ConfigError, match=r"LOCAL_RANK 1 but only 1 CUDA device.*--nproc_per_node 1.*device=cpu"):
        distributed.setup("auto")


def test_cuda_index_beyond_the_visible_gpus_is_a_clear_error(monkeypatch):
    from clat.base.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"device=cuda:2 requested but only 2 CUDA device\(s\)"):
        resolve_device("cuda:2")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
