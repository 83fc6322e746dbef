"""Kill a run that streams its data (a torch Dataset with a random transform read by worker processes, and an image
folder with data.stream=true) with SIGKILL in the middle of an epoch, twice, resume it, and compare the final weights
bit for bit with an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from clat.runs.checkpoint import read_state_dict

OVERRIDES = ["model.name=tiny_cnn", "pretrain.epochs=1", "finetune.epochs=2", "data.val_size=8", "data.batch_size=8",
             "attack.steps=1", "clat.criticality.steps=1", "clat.criticality.batch_size=6", "eval.n_examples=8", "eval.steps=1",
             "clat.reselect_every=1", "progress=false", "log.console=false", "data.workers=2", "deterministic=true"]

# The child kills itself after its n-th streamed training batch (fault injection lives here, not in the library).
CHILD = textwrap.dedent(
    """
    import os, random, signal, sys
    import numpy as np, torch
    import clat, clat.data.stream
    from clat.cli.main import main

    mode, kill_at, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if kill_at:
        plain, seen = clat.data.stream.StreamLoader.__iter__, [0]

        def counted(self):
            for batch in plain(self):
                seen[0] += 1
                if seen[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield batch

        clat.data.stream.StreamLoader.__iter__ = counted

    class Noisy(torch.utils.data.Dataset):
        '''A random transform drawing from torch's, Python's and numpy's global generators, as user code does.'''

        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.x, self.y = torch.rand(48, 3, 8, 8, generator=g), torch.arange(48) % 3

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            x = self.x[i] * 0.5 + 0.3 * torch.rand(()) + 0.1 * random.random() + 0.1 * float(np.random.rand())
            return x.clamp(0, 1), int(self.y[i])

    if mode == "dataset":
        if args[0] == "--resume":
            clat.train(None, args[1], resume=True, data=Noisy())
        else:
            clat.train(clat.load_config(None, args[1:]), args[0], data=Noisy())
    else:
        sys.exit(main(["-q", "train", *args]))
    """
)


def _run(mode: str, kill_at: int, *args: str) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    p = subprocess.run([sys.executable, "-c", CHILD, mode, str(kill_at), *args], env=env, capture_output=True, timeout=600)
    return p.returncode, p.stderr.decode()


def _folder(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("test", 2)):
        for c in ("a", "b", "c"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):  # mixed sizes, resized by data.image_size
                Image.fromarray(rng.integers(0, 256, (8 + i % 3, 9, 3), dtype=np.uint8)).save(root / split / c / f"{i:02d}.png")
    return ["data.dataset=folder", f"data.root={root}", "data.image_size=8", "data.stream=true", "data.augment=crop_flip"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dataset", "folder"])
def test_sigkill_mid_epoch_on_streamed_data_then_resume_matches_uninterrupted(mode, tmp_path):
    """40 training items in batches of 8: 5 batches an epoch, 3 epochs. Killed at the 2nd batch of epoch 2, resumed
    from epoch 1's checkpoint, killed again at the 2nd batch of epoch 3, resumed from epoch 2's: the workers' items,
    their random transforms and clat's augmentation are drawn again exactly."""
    if mode == "folder":
        pytest.importorskip("PIL")
    over = OVERRIDES + (_folder(tmp_path / "imgs") if mode == "folder" else ["model.num_classes=3"])
    start = (lambda run: [str(run), *over]) if mode == "dataset" else (lambda run: ["--run-dir", str(run), *over])
    rc, err = _run(mode, 0, *start(tmp_path / "ref"))
    assert rc == 0, err
    run = tmp_path / "killed"
    rc, err = _run(mode, 7, *start(run))
    assert rc == -signal.SIGKILL, err
    rc, err = _run(mode, 7, "--resume", str(run))  # resumes at epoch 2 (batch 6): dies at its 7th batch, epoch 3's 2nd
    assert rc == -signal.SIGKILL, err
    rc, err = _run(mode, 0, "--resume", str(run))
    assert rc == 0, err
    want, got = read_state_dict(tmp_path / "ref" / "model.safetensors"), read_state_dict(run / "model.safetensors")
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    assert (run / "metrics.jsonl").read_text().count("\n") == 3
