"""One plug-in pattern (issue 35): every kind of extension (model, method, selector, evaluation attack, dataset,
logger) is added from ONE file outside the package, named on the command line as ``module:name``, runs, and is listed
by ``clat list``."""

from __future__ import annotations

import json
import re
import sys
import textwrap

import pytest
import torch

from clat.cli.listing import REGISTRIES
from clat.cli.main import main

USER_FILE = '''
"""A user's extensions of clat, one of each kind, in one file."""
import torch
import torch.nn.functional as F
from torch import nn

import clat
from clat.eval.attacks import AttackResult, EvalAttack
from clat.methods import PGDAT


def make_net(num_classes=10):                      # a model: model.name=myext:make_net
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


class HalfAT(PGDAT):                               # a method: pretrain.method=myext:HalfAT
    """Half-AT: half clean, half adversarial cross-entropy."""
    label, baseline = "Half-AT", True

    def objective(self, model, x, x_adv, y):
        loss, metrics = super().objective(model, x, x_adv, y)
        return 0.5 * loss + 0.5 * F.cross_entropy(model(x), y), metrics


def widest(s):                                     # a selector: clat.selection=myext:widest
    """the layers with the most outputs"""
    return [float(layer.numel) for layer in s.layers]


def noise(cfg):                                    # a data set: data.dataset=myext:noise
    """random images in 10 classes"""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(100) % 10
    return x[:80], y[:80], x[80:], y[80:]


class Flip(EvalAttack):                            # an evaluation attack: clat eval --attack myext:Flip
    """the image mirrored left-right"""
    name = "flip"

    def run(self, model, x, y, threat, ctx):
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        with torch.no_grad():
            ok = (model(x).argmax(1) == y) & (model(x.flip(3)).argmax(1) == y)
        return AttackResult({"n": len(ok), "robust_acc": ok.float().mean().item()}, {"flip": ok}, robust_acc=ok.float().mean().item())


class EpochFile(clat.Callback):                    # a logger: log.loggers=myext:EpochFile
    """one line per epoch in RUN/epochs.txt"""

    def __init__(self, run_dir, cfg):
        self.path = run_dir.path / "epochs.txt"

    def on_epoch_end(self, row):
        with open(self.path, "a") as f:
            f.write(f"{row['epoch']} {row['method']}\\n")
'''

TINY = ["data.val_size=20", "data.batch_size=20", "attack.steps=1", "eval.n_examples=10", "eval.steps=1", "progress=false",
        "clat.criticality.steps=1", "clat.criticality.batch_size=10", "clat.k=1"]


@pytest.fixture
def myext(tmp_path, monkeypatch):
    """``myext.py`` in a folder on sys.path, forgotten (module and registry entries) after the test."""
    (tmp_path / "myext.py").write_text(textwrap.dedent(USER_FILE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for registry in REGISTRIES.values():
        if registry is not None:
            monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    yield tmp_path
    sys.modules.pop("myext", None)


def test_one_of_each_kind_from_one_outside_file(myext, capsys):
    run = myext / "run"
    argv = ["-q", "train", "model.name=myext:make_net", "data.dataset=myext:noise", "pretrain.method=myext:HalfAT", "pretrain.epochs=1",
            "finetune.method=clat", "finetune.epochs=1", "clat.selection=myext:widest", "log.loggers=myext:EpochFile", *TINY,
            "--run-dir", str(run)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    sel = [r["selection"] for r in rows if "selection" in r]
    # the model and the data set: 80 training images of which 20 validate; the method: pretraining by Half-AT
    assert (run / "epochs.txt").read_text().split("\n")[0].split()[0] == "1"  # the logger: a line per epoch
    assert len((run / "epochs.txt").read_text().splitlines()) == 2
    # the selector: the widest eligible layer is the first conv (8x32x32 outputs against 16x16x16)
    assert sel and sel[0]["selected"] == ["0"]
    cfg = (run / "config.yaml").read_text()
    assert "myext:make_net" in cfg and "myext:noise" in cfg and "myext:HalfAT" in cfg and "myext:widest" in cfg
    from clat.methods import label

    assert label("myext:HalfAT") == "Half-AT"

    # the layer oracle scores the same selector
    from clat.attacks.threat import ThreatModel
    from clat.criticality.estimators import compute_estimates
    from clat.layers.discovery import find_layers
    from clat.models import create_model

    model = create_model("myext:make_net")
    x, y = torch.rand(4, 3, 32, 32), torch.arange(4)
    layers = find_layers(model, x[:2])
    est = compute_estimates(model, layers, x, y, ThreatModel(steps=1), names=["depth", "myext:widest"])
    assert est["myext:widest"] == [float(layer.numel) for layer in layers] and est["depth"] == [float(layer.index) for layer in layers]

    # the evaluation attack, beside PGD; its per-image outcomes go into the evaluation's records
    assert main(["-q", "eval", str(run), "--n-examples", "10", "--steps", "1", "--attack", "myext:Flip", "--out",
                 str(myext / "e.json")]) == 0
    ev = json.loads((myext / "e.json").read_text())
    assert ev["flip"]["n"] == 10 and 0 <= ev["flip"]["robust_acc"] <= 1

    capsys.readouterr()
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for kind, name in [("models", "myext:make_net"), ("methods", "myext:HalfAT"), ("selectors", "myext:widest"), ("attacks", "myext:Flip"),
                       ("datasets", "myext:noise"), ("loggers", "myext:EpochFile")]:
        assert main(["list", kind]) == 0
        assert name in capsys.readouterr().out and name in out, (kind, name)


def test_registered_names_are_listed_and_checked(myext, capsys):
    """A file that registers its extensions by name (the decorators) lists them with ``clat list --import``; a config
    check of a registered kind accepts them and stops a misspelled one with one line naming every known one."""
    (myext / "myreg.py").write_text(textwrap.dedent('''
        from clat.criticality.selectors import register_selector

        @register_selector("widest", label="output size")
        def widest(s):
            return [float(layer.numel) for layer in s.layers]
    '''))
    assert main(["list", "selectors", "--import", "myreg"]) == 0
    assert "widest" in capsys.readouterr().out
    from clat.base.errors import ConfigError
    from clat.config.load import load_config

    assert load_config(None, ["clat.selection=widest"]).clat.selection == "widest"
    assert load_config(None, ["clat.selection=depth"]).clat.selection == "depth"  # the oracle's name of deepest
    for override, known in [("clat.selection=widst", "unknown selector 'widst'; did you mean widest? known selectors: critical, random"),
                            ("data.dataset=cifar1O", "unknown dataset 'cifar1O'; did you mean cifar10"),
                            ("finetune.method=myext:Nope", "myext has no 'Nope'")]:
        with pytest.raises(ConfigError, match=re.escape(known)) as e:
            load_config(None, [override])
        assert "\n" not in str(e.value)
    sys.modules.pop("myreg", None)


def test_an_unknown_logger_stops_before_the_run_folder(myext, capsys):
    run = myext / "bad"
    assert main(["-q", "train", "model.name=tiny_cnn", "data.dataset=bundled", "data.train_size=60", "pretrain.epochs=1",
                 "finetune.epochs=0",
                 "log.loggers=[tensorbord]", *TINY, "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "unknown logger 'tensorbord'; did you mean tensorboard?" in err and err.count("\n") == 1
    assert not run.exists()
