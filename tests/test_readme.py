"""The README's Python example runs as written; every config in configs/ is valid."""

import re
from pathlib import Path

import pytest

from clat.config import load_config
from clat.loop import train

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "runs" / "api-example" / "model.safetensors").is_file()


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_config_is_valid(path):
    from clat.methods import list_methods
    from clat.models import model_info

    cfg = load_config(path)
    assert cfg.pretrain.epochs + cfg.finetune.epochs > 0
    model_info(cfg.model.name)  # a registered model
    assert {cfg.pretrain.method, cfg.finetune.method} <= set(list_methods())


CPU_CONFIGS = [p for p in CONFIGS if p.parent.name == "cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("path", CPU_CONFIGS, ids=[p.name for p in CPU_CONFIGS])
def test_cpu_config_runs_one_epoch_each_stage(path, tmp_path, shared_cifar):
    over = ["pretrain.epochs=1", "finetune.epochs=1", "data.train_size=1200", "data.val_size=200", "eval.n_examples=100",
            "eval.steps=2", "progress=false", f"data.root={shared_cifar}"]
    cfg = load_config(path, over)
    s = train(cfg, tmp_path / "run")
    assert s["final_val"]["n"] == 100
    if cfg.finetune.method in ("clat", "rift"):
        assert s["selection_history"]
