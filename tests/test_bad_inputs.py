"""A corpus of bad inputs run through the CLI: each ends with a one- or two-line
`clat: error: ...` naming the problem, exit code 2, and no earlier result overwritten."""

import pickle
from pathlib import Path

import numpy as np
import torch

from clat.runs.checkpoint import save_weights
from clat.cli.main import main
from clat.models import create_model

Q = ["-q"]
TINY = ["model.name=tiny_cnn", "data.dataset=bundled", "data.train_size=300", "data.val_size=100", "attack.steps=1",
        "eval.n_examples=20", "eval.steps=1", "pretrain.epochs=1", "finetune.epochs=0", "data.batch_size=100"]


def cifar10(root: Path, n: int = 4, *, drop: str | None = None, bad: dict | None = None) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        if name == drop:
            continue
        obj = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [int(v) for v in rng.integers(0, 10, n)]}
        if bad and name in bad:
            obj = bad[name](obj)
        with open(d / name, "wb") as f:
            pickle.dump(obj, f)
    return root


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def build_cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(name, argv, substring the error must contain)."""
    def w(name: str, text: str) -> str:
        (tmp / name).write_text(text)
        return str(tmp / name)

    tiny_ckpt = tmp / "tiny.safetensors"
    save_weights(tiny_ckpt, create_model("tiny_cnn"), {"model": "tiny_cnn", "num_classes": 10, "normalize": True})
    c100 = tmp / "tiny100.safetensors"
    save_weights(c100, create_model("tiny_cnn", 100), {"model": "tiny_cnn", "num_classes": 100, "normalize": True})
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "trunc.safetensors").write_bytes(tiny_ckpt.read_bytes()[:300])
    (tmp / "garbage.pt").write_bytes(b"this is not a checkpoint at all")
    torch.save({"conv.weight": torch.zeros(1)}, tmp / "plain.pt")
    with open(tmp / "evil.pt", "wb") as f:
        pickle.dump({"w": Evil(tmp / "PWNED")}, f)
    (tmp / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01binary")
    good = cifar10(tmp / "good")
    half = cifar10(tmp / "half", drop="data_batch_3")
    shape = cifar10(tmp / "shape", bad={"data_batch_2": lambda o: {**o, "data": o["data"][:, :100]}})
    labels = cifar10(tmp / "labels", bad={"data_batch_1": lambda o: {**o, "labels": [99] * len(o["labels"])}})
    nlab = cifar10(tmp / "nlab", bad={"test_batch": lambda o: {**o, "labels": o["labels"][:-1]}})
    (cifar10(tmp / "emptyf") / "cifar-10-batches-py" / "data_batch_4").write_bytes(b"")
    nv = ["data.verify=false"]
    torch.save({"conv.weight": torch.zeros(1), "where": Path("/data")}, tmp / "global.pt")  # a refused global, not code
    (tmp / "notes.json").write_text('{"my": "notes"}')
    from clat.runs.folder import RunDir

    fake_run, fake_demo = tmp / "a_run", tmp / "a_demo"  # what a training run's and a demo's manifests say, without training
    fake_run.mkdir()
    (fake_run / "config.yaml").write_text("seed: 0\n")
    RunDir(fake_run).record("config.yaml", made_by="train")
    fake_demo.mkdir()
    (fake_demo / "results.json").write_text("{}")
    RunDir(fake_demo).record("results.json", made_by="demo")
    (tmp / "mine").mkdir()
    (tmp / "mine" / "report.md").write_text("my report")
    cases = [
        # configuration files and overrides
        ("yaml syntax", ["train", w("bad.yaml", "model: {name: resnet18\n")], "not valid YAML"),
        ("yaml list", ["train", w("list.yaml", "- 1\n- 2\n")], "must be a mapping"),
        ("yaml binary", ["train", str(tmp / "binary.yaml")], "not"),
        ("unknown top key", ["train", w("k.yaml", "modle: {name: x}\n")], "unknown config key 'modle'"),
        ("unknown nested key", ["train", w("k2.yaml", "clat: {kk: 1}\n")], "unknown config key 'clat.kk'"),
        ("wrong type int", ["train", "data.batch_size=abc"], "data.batch_size must be an integer"),
        ("wrong type bool", ["train", "data.verify=maybe"], "data.verify must be true or false"),
        ("wrong type float", ["train", "attack.eps=big"], "attack.eps must be a number"),
        ("wrong choice", ["train", "data.dataset=imagenet"], "unknown dataset 'imagenet'; known datasets: bundled, cifar10"),
        ("section as value", ["train", "clat=3"], "clat must be a mapping"),
        ("eps negative", ["train", "attack.eps=-0.1"], "attack.eps must be > 0"),
        ("eps zero", ["train", "attack.eps=0"], "attack.eps must be > 0"),
        ("alpha zero", ["train", "attack.alpha=0"], "attack.alpha must be > 0"),
        ("steps zero", ["train", "attack.steps=0"], "attack.steps must be >= 1"),
        ("k zero", ["train", "clat.k=0"], "clat.k must be >= 1"),
        ("k too large", ["train", *TINY, "finetune.epochs=1", "clat.k=9"], "clat.k=9"),
        ("lambda negative", ["train", "clat.lam=-1"], "clat.lam must be >= 0"),
        ("lambda infinite", ["train", "clat.lam=inf"], "clat.lam must be a finite number"),
        ("lr infinite", ["train", "pretrain.lr=inf"], "pretrain.lr must be a finite number"),
        ("eps infinite", ["train", "attack.eps=inf"], "attack.eps must be a finite number"),
        ("eps beyond the pixel range", ["train", "attack.eps=2"], "covers the whole [0, 1] pixel range"),
        ("resume changes the method", ["train", "--resume", str(tmp / "norun"), "finetune.method=trades"], "holds no run"),
        ("batch size zero", ["train", "data.batch_size=0"], "data.batch_size must be >= 1"),
        ("eval batch zero", ["train", "data.eval_batch_size=0"], "data.eval_batch_size must be >= 1"),
        ("val size negative", ["train", "data.val_size=-5"], "data.val_size must be >= 0"),
        ("train below val", ["train", "data.train_size=10", "data.val_size=100"], "must exceed data.val_size"),
        ("epochs negative", ["train", "pretrain.epochs=-1"], "pretrain.epochs must be >= 0"),
        ("no epochs", ["train", "pretrain.epochs=0", "finetune.epochs=0"], "nothing to train"),
        ("lr zero", ["train", "finetune.lr=0"], "finetune.lr must be > 0"),
        ("momentum one", ["train", "pretrain.momentum=1"], "momentum must be in [0, 1)"),
        ("trades beta", ["train", "trades.beta=-1"], "trades.beta must be >= 0"),
        ("unknown model", ["train", *TINY, "model.name=vgg99"], "unknown model 'vgg99'; did you mean vgg19? known models"),
        ("unknown method", ["train", *TINY, "finetune.method=fgsm9", "finetune.epochs=1"], "unknown method 'fgsm9'; known methods"),
        ("override no equals", ["train", *TINY, "clat.k"], "not of the form key=value"),
        ("override bad key", ["train", "clat..k=1"], "is not a dotted key"),
        ("override bad yaml", ["train", "clat.layers=[1"], "not valid YAML"),
        *([("cuda unavailable", ["train", *TINY, "device=cuda"], "CUDA is not available"),
           ("eval cuda unavailable", ["eval", str(tiny_ckpt), "--device", "cuda"], "CUDA is not available")]
          if not torch.cuda.is_available() else
          [("cuda index out of range", ["train", *TINY, "device=cuda:99"], "CUDA device(s) are visible")]),
        ("bad device", ["train", *TINY, "device=tpu"], "device must be"),
        ("config missing", ["train", str(tmp / "nope.yaml")], "does not exist"),
        ("no config", ["train"], "needs a config file"),
        ("pin unknown layer", ["train", *TINY, "finetune.epochs=1", "clat.layers=[conv99]"], "no layer named 'conv99'"),
        ("pin layer out of range", ["train", *TINY, "finetune.epochs=1", "clat.layers=[40]"], "out of range"),
        # data
        ("data folder missing", ["train", *TINY, "data.dataset=cifar10", f"data.root={tmp / 'nowhere'}"], "download"),
        ("half-written data", ["train", *TINY, *nv, "data.dataset=cifar10", f"data.root={half}"], "data_batch_3"),
        ("wrong shape", ["train", *TINY, *nv, "data.dataset=cifar10", f"data.root={shape}"], "data_batch_2"),
        ("labels out of range", ["train", *TINY, *nv, "data.dataset=cifar10", f"data.root={labels}"], "data_batch_1"),
        ("label count mismatch", ["train", *TINY, *nv, "data.dataset=cifar10", f"data.root={nlab}"], "test_batch"),
        ("empty data file", ["train", *TINY, *nv, "data.dataset=cifar10", f"data.root={tmp / 'emptyf'}"], "data_batch_4"),
        ("unofficial checksums", ["train", *TINY, "data.dataset=cifar10", f"data.root={good}"], "verify"),
        ("cifar100 missing", ["train", *TINY, *nv, "data.dataset=cifar100", f"data.root={good}"], "CIFAR-100"),
        ("data too small for val", ["train", *TINY, *nv, "data.dataset=cifar10", f"data.root={good}", "data.train_size=null"], "val_size"),
        # checkpoints
        ("ckpt other arch", ["eval", str(tiny_ckpt), "--model", "resnet18", "--n-examples", "4"], "does not fit this model"),
        ("ckpt other classes", ["eval", str(c100), "--num-classes", "10", "--n-examples", "4"], "does not fit this model"),
        ("ckpt empty", ["eval", str(tmp / "empty.pt"), "--model", "tiny_cnn"], "is empty"),
        ("ckpt truncated", ["eval", str(tmp / "trunc.safetensors")], "safetensors"),
        ("ckpt garbage", ["eval", str(tmp / "garbage.pt"), "--model", "tiny_cnn"], "could not read checkpoint"),
        ("ckpt malicious", ["eval", str(tmp / "evil.pt"), "--model", "tiny_cnn"], "refused to load"),
        ("ckpt missing", ["eval", str(tmp / "nothing.safetensors")], "does not exist"),
        ("ckpt without model name", ["eval", str(tmp / "plain.pt")], "--model"),
        ("ckpt refused global", ["eval", str(tmp / "global.pt"), "--model", "tiny_cnn"], "holds the global pathlib."),
        ("init other arch", ["train", *TINY, f"init={tiny_ckpt}", "model.name=small_cnn"], "does not fit this model"),
        ("init malicious", ["train", *TINY, f"init={tmp / 'evil.pt'}"], "refused to load"),
        # command line arguments
        ("eval n-examples zero", ["eval", str(tiny_ckpt), "--n-examples", "0"], "--n-examples must be >= 1"),
        ("eval restarts zero", ["eval", str(tiny_ckpt), "--restarts", "0", "--n-examples", "4"], "restarts must be >= 1"),
        ("eval eps not a number", ["eval", str(tiny_ckpt), "--eps", "lots"], "--eps"),
        ("eval steps zero", ["eval", str(tiny_ckpt), "--steps", "0", "--n-examples", "4"], "must be >= 1"),
        ("eval eps beyond the image range", ["eval", str(tiny_ckpt), "--eps", "5", "--n-examples", "4"], "covers the whole [0, 1] image "
                                                                                                         "range"),
        ("criticality k zero", ["criticality", "--model", "tiny_cnn", "--k", "0"], "--k must be >= 1"),
        ("report transfer missing", ["report", str(tmp), "--transfer", str(tmp / "missing.json")], "could not read the transfer JSON"),
        ("unknown command", ["fly"], "invalid choice"),
        ("criticality batch zero", ["criticality", "--model", "tiny_cnn", "--batch-size", "0"], "--batch-size must be >= 1"),
        ("criticality k too large", ["criticality", "--model", "tiny_cnn", "--k", "9", "--batch-size", "4", "--steps", "1"], "k=9"),
        ("criticality nothing", ["criticality"], "give a checkpoint"),
        ("resume nothing", ["train", "--resume", str(tmp / "norun")], "holds no run"),
        ("resume with config", ["train", "x.yaml", "--resume", str(tmp / "norun")], "drop the config"),
        ("report not a run", ["report", str(tmp)], "metrics.jsonl"),
        # issue 37: each names its file and one fix, before any work
        ("eval eps-sweep negative", ["eval", str(tiny_ckpt), "--eps-sweep=-0.1,8/255", "--n-examples", "4"],
         "--eps-sweep: needs one or more finite radii >= 0, got '-0.1,8/255'"),
        ("eval eps-sweep nan", ["eval", str(tiny_ckpt), "--eps-sweep=0,nan"], "--eps-sweep: needs one or more finite radii"),
        ("eval eps-sweep empty", ["eval", str(tiny_ckpt), "--eps-sweep="], "--eps-sweep: needs one or more finite radii"),
        ("eval out not an evaluation", ["eval", str(tiny_ckpt), "--n-examples", "4", "--out", str(tmp / "notes.json"), "--force"],
         "is not an evaluation that clat wrote"),
        ("demo into a training run", ["demo", "--fast", "--force", "--out", str(fake_run)],
         "holds an unfinished training run (made by `clat train`)"),
        ("train into a demo", ["train", *TINY, "--force", "--run-dir", str(fake_demo)],
         "holds a demo (made by `clat demo`), not a training run"),
        ("demo over files of your own", ["demo", "--fast", "--force", "--out", str(tmp / "mine")], "clat did not write (files of your own"),
    ]
    return cases


def test_bad_input_corpus(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = build_cases(tmp_path)
    assert len(cases) >= 40
    failures = []
    for name, argv, needle in cases:
        rc = main([*Q, *argv])
        err = capsys.readouterr().err
        lines = [l for l in err.strip().splitlines() if not l.startswith("clat: warning:")]
        ok = rc == 2 and lines and lines[0].startswith("clat: error:") and needle in err and len(lines) <= 2 and "Traceback" not in err
        if not ok:
            failures.append(f"{name}: rc={rc} err={err!r}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "PWNED").exists()  # the malicious pickle never ran


def test_finished_run_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*Q, "train", *TINY, "--run-dir", str(run)]) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main([*Q, "train", *TINY, "seed=3", "--run-dir", str(run)]) == 2
    assert "--force" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_full_disk_stops_cleanly_and_keeps_earlier_checkpoints(tmp_path, capsys, monkeypatch):
    import os

    import clat.base.files as ck

    run = tmp_path / "run"
    real = os.fsync
    calls = [0]

    def failing_fsync(fd):
        calls[0] += 1
        if calls[0] > 4:  # config + first epoch's files succeed, then the disk is "full"
            raise OSError(28, "No space left on device")
        return real(fd)

    monkeypatch.setattr(ck.os, "fsync", failing_fsync)
    rc = main([*Q, "train", *TINY, "pretrain.epochs=2", "--run-dir", str(run)])
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in err and "Traceback" not in err
    assert not list(run.rglob("*.tmp"))  # no half-written files left behind
    monkeypatch.setattr(ck.os, "fsync", real)
    assert main([*Q, "train", "--resume", str(run)]) == 0


def test_nan_loss_stops_with_clear_message(tmp_path, capsys):
    rc = main([*Q, "train", *TINY, "pretrain.method=standard", "pretrain.lr=1e30", "pretrain.epochs=2", "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "no checkpoint was written yet: start again with a lower learning rate, pretrain.lr=0.1, and --force" in err
