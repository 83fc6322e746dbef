"""docs/own_loop.md's code blocks, run as they are written: CLAT in a plain PyTorch loop and in PyTorch Lightning."""

import ast
import copy
import re
from pathlib import Path

import pytest
import torch

import clat
from clat.layers.discovery import layer_parameter_names

DOC = Path(__file__).resolve().parents[1] / "docs" / "own_loop.md"


def blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


def test_the_doc_has_a_plain_loop_of_at_most_40_lines_and_a_lightning_one():
    plain, lightning = blocks()
    assert "import lightning" not in plain and len(plain.strip().splitlines()) <= 40
    assert "import lightning as L" in lightning
    for code in (plain, lightning):  # the doc uses only names that `import clat` exports
        tree = ast.parse(code)
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("clat")]
        assert [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names if a.name.startswith("clat")] == ["clat"]
        used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "clat"}
        assert used and used <= set(clat.__all__), used - set(clat.__all__)


def _run(code, monkeypatch, capsys):
    """Run a block; return the model it trained, its initial state and the method."""
    made = []
    real = clat.create_model

    def recording(*a, **k):
        m = real(*a, **k)
        made.append((m, copy.deepcopy(m.state_dict())))
        return m

    monkeypatch.setattr(clat, "create_model", recording)
    torch.manual_seed(0)
    ns: dict = {"__name__": "own_loop_doc"}
    exec(compile(code, str(DOC), "exec"), ns)
    out = capsys.readouterr().out
    (model, initial), = made
    method = ns["method"] if "method" in ns else ns["module"].method
    return model, initial, method, out


def _only_the_selected_layers_trained(model, initial, method, out):
    assert "epoch 1: training [" in out and re.search(r"^0\.\d+|^[01]\.0", out.splitlines()[-1])
    chosen = set(layer_parameter_names(model, method.selected))
    bns = {f"{l.bn_name}." for l in method.selected if l.bn_name}
    state = model.state_dict()
    changed = {k for k, v in state.items() if not torch.equal(v, initial[k])}
    params = {n for n, _ in model.named_parameters()}
    assert changed & params == chosen  # the critical layers' parameters, and nothing else
    frozen_buffers = {k for k in changed - params if not any(k.startswith(b) for b in bns)}
    assert not frozen_buffers, f"BatchNorm statistics of frozen layers moved: {sorted(frozen_buffers)[:3]}"


def test_the_plain_loop_trains_only_the_critical_layers(monkeypatch, capsys):
    _only_the_selected_layers_trained(*_run(blocks()[0], monkeypatch, capsys))


def test_the_lightning_module_trains_only_the_critical_layers(monkeypatch, capsys):
    pytest.importorskip("lightning")
    _only_the_selected_layers_trained(*_run(blocks()[1], monkeypatch, capsys))
