"""The package as a user meets it: versions, packaged configs by name, `clat config show`, a model of one's own
given as `package.module:factory` on the command line, and (slow) the built wheel in a fresh environment."""

import json
import shutil
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from torch import nn

import clat
from clat.cli.main import main
from clat.config.schema import Config
from clat.config.load import load_config
from clat.config.help import dotted_keys, list_configs
from clat.config.help import describe

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.dataset=bundled", "data.train_size=120", "data.val_size=40", "data.test_size=40", "attack.steps=1",
        "clat.criticality.steps=1", "clat.criticality.batch_size=10", "data.batch_size=40", "eval.n_examples=20", "eval.steps=1",
        "pretrain.epochs=1", "finetune.epochs=1", "clat.k=1"]


def test_version_is_one_number_everywhere(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"clat {clat.__version__}"
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert meta["dynamic"] == ["version"] and meta["name"] == "clat-at"  # `clat` on PyPI is another project


def test_packaged_configs_are_found_by_name(capsys):
    names = list_configs()
    assert "paper/cifar10/resnet18_pgd_at_clat" in names and "cpu/small_cnn_subset" in names
    assert all(not n.endswith(".yaml") for n in names)
    for spelled in ("cpu/small_cnn_subset", "cpu/small_cnn_subset.yaml", "configs/cpu/small_cnn_subset.yaml"):
        assert load_config(spelled) == load_config(REPO / "configs" / "cpu" / "small_cnn_subset.yaml")
    assert main(["configs", "paper/cifar100"]) == 0
    out = capsys.readouterr().out
    assert "paper/cifar100/resnet18_pgd_at_clat" in out and "paper/cifar10/" not in out
    assert main(["train", "cpu/small_cnn_subst"]) == 2
    assert "does not exist, and no packaged config has that name; did you mean cpu/small_cnn_subset" in capsys.readouterr().err


def test_config_show_lists_every_key_with_type_help_and_default(capsys):
    every = dotted_keys(Config())
    docs = describe(Config())
    assert sorted(d.key for d in docs) == sorted(every)
    assert not [d.key for d in docs if not d.help], "every config key needs a one-line `# comment` beside its field"
    assert main(["config", "show", "cpu/small_cnn_subset", "clat.k=2"]) == 0
    out = capsys.readouterr().out
    for key in every:
        assert f" {key} " in out, key
    line = next(ln for ln in out.splitlines() if " clat.k " in ln)
    assert line.startswith("*") and "int | None" in line and "(default null)" in line
    assert main(["config", "show", "--yaml", "clat.k=2"]) == 0
    assert "k: 2" in capsys.readouterr().out


@pytest.mark.parametrize("override, hint", [("clat.lamda=0.1", "clat.lam"), ("k=2", "clat.k"), ("model.nme=x", "model.name"),
                                             ("pretrain.epoch=3", "pretrain.epochs")])
def test_a_misspelled_key_gets_a_suggestion(override, hint, capsys):
    assert main(["config", "show", override]) == 2
    err = capsys.readouterr().err
    assert f"did you mean {hint}" in err and err.count("\n") == 1


MODULE = '''
import torch
from torch import nn
import clat

def make_net(num_classes=10):
    return nn.Sequential(clat.Normalize([0.5] * 3, [0.25] * 3), nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

def not_a_model():
    return 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``usernets.py`` in the current folder, as a user's own file beside their command line."""
    (tmp_path / "usernets.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    yield tmp_path
    sys.modules.pop("usernets", None)


def test_a_model_of_ones_own_from_the_command_line(user_module, capsys):
    run = user_module / "run"
    assert main(["-q", "train", "model.name=usernets:make_net", *TINY, "--run-dir", str(run), "--until-epoch", "1"]) == 0
    assert "  name: usernets:make_net" in (run / "config.yaml").read_text()
    assert main(["-q", "train", "--resume", str(run)]) == 0  # rebuilt from its name: no model= needed
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"]["model"] == "usernets:make_net" and summary["finished"]
    assert summary["versions"]["clat"] == clat.__version__ and summary["versions"]["torch"] == torch.__version__
    assert (run / "config.yaml").read_text().startswith(f"# written by clat {clat.__version__}")
    capsys.readouterr()
    assert main(["-q", "eval", str(run), "--n-examples", "10", "--steps", "1"]) == 0
    assert json.loads((run / "eval.json").read_text())["model"] == "usernets:make_net"
    assert main(["-q", "criticality", str(run), "--batch-size", "8", "--steps", "1"]) == 0
    assert json.loads((run / "criticality.json").read_text())
    assert main(["-q", "report", str(run)]) == 0


@pytest.mark.parametrize("name, message", [("usernets:nope", "usernets has no 'nope'"), ("nosuchmodule:make", "cannot import nosuchmodule"),
                                           ("usernets:not_a_model", "returned int, not an nn.Module"),
                                           ("usernets:make net", "neither a zoo model nor package.module:factory"),
                                           ("resnet_18", "did you mean resnet18"),
                                           ("usernets:make_nt", "usernets has no 'make_nt'; did you mean usernets:make_net?")])
def test_a_bad_model_name_is_one_line(user_module, name, message, capsys):
    assert main(["-q", "train", f"model.name={name}", *TINY, "--run-dir", str(user_module / "bad")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (user_module / "bad").exists()


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_a_run_of_a_python_model_says_how_to_resume_it(tmp_path):
    cfg = load_config(None, [*TINY, "finetune.epochs=0", "pretrain.epochs=2"])
    clat.train(cfg, tmp_path / "run", model=_Net(), until_epoch=1)
    assert cfg.model.name == "resnet18"  # the caller's config is left as it was
    assert f"name: python:{__name__}._Net" in (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(clat.ConfigError, match=r"handed to clat.train\(model=...\)"):
        clat.train(None, tmp_path / "run", resume=True)
    assert clat.train(None, tmp_path / "run", resume=True, model=_Net())["finished"]


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """The wheel built (not editable) and installed alone into a new virtual environment whose other packages come
    from this one (so torch is not downloaded): (its python, its clat command, the environment, its site-packages,
    the wheel)."""
    tmp = tmp_path_factory.mktemp("wheel")
    dist = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(REPO)],
                   check=True, capture_output=True)
    (wheel,) = dist.glob("clat_at-*.whl")
    env_dir = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)], check=True,
                   capture_output=True)
    deps = Path(torch.__file__).parents[1]  # torch, numpy, ... of this environment; a plain path line does not run its .pth files
    (site / "zz_deps.pth").write_text(f"{deps}\n")
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    return py, env_dir / "bin" / "clat", env, site, wheel


@pytest.mark.slow
def test_the_built_wheel_works_in_a_fresh_environment(wheel_env, tmp_path):
    """Run a packaged paper config by name for one tiny step, from the installed wheel."""
    py, clat_cmd, env, site, wheel = wheel_env
    work = tmp_path / "work"
    work.mkdir()
    where = subprocess.check_output([str(py), "-c", "import clat, sys; print(clat.__file__)"], cwd=work, env=env, text=True)
    assert where.startswith(str(site)), where  # the wheel, not this checkout
    assert subprocess.check_output([str(clat_cmd), "--version"], env=env, text=True).strip() == f"clat {clat.__version__}"
    names = subprocess.check_output([str(clat_cmd), "configs", "paper/cifar10"], env=env, text=True, cwd=work)
    assert "paper/cifar10/resnet18_pgd_at_clat" in names
    tiny = ["model.name=tiny_cnn", *TINY, "device=cpu", "precision=fp32"]
    r = subprocess.run([str(clat_cmd), "-q", "train", "paper/cifar10/resnet18_pgd_at_clat", *tiny, "--run-dir", "run"],
                       cwd=work, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["finished"] and summary["versions"]["git_commit"] is None
    for f in ("LICENSE", "CITATION.cff"):
        assert any(f in n for n in subprocess.check_output([sys.executable, "-m", "zipfile", "-l", str(wheel)], text=True).splitlines()), f
    assert (site / "clat" / "py.typed").is_file()


# Issue 36's "done when", from the installed wheel: a streamed Dataset run, an AdamW + warmup + EMA run, a model.kwargs
# factory run, init_reset_head, and the own-loop page's plain loop (the page's code, as written).
WHEEL_SCENARIOS = r"""
import json, pathlib, re, torch, clat
from torch.utils.data import Dataset
TOY = ["model.name=tiny_cnn", "data.dataset=bundled", "data.train_size=120", "data.val_size=40", "attack.steps=1",
       "eval.n_examples=20", "eval.steps=1", "data.batch_size=40", "clat.criticality.steps=1", "clat.criticality.batch_size=10",
       "progress=false", "log.console=false"]
assert clat.__file__.startswith(SITE), clat.__file__

class Items(Dataset):
    def __init__(self, n, classes=4):
        self.x, self.targets = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(n)), torch.arange(n) % classes
    def __len__(self):
        return len(self.x)
    def __getitem__(self, i):
        return (self.x[i].flip(-1) if torch.rand(()) < 0.5 else self.x[i]), int(self.targets[i])

s = clat.train(clat.load_config(overrides=[*TOY, "pretrain.epochs=1", "finetune.epochs=1", "data.workers=2"]), "streamed",
               data=clat.DatasetSplits(Items(100), Items(40), val_size=20))
assert s["finished"] and clat.load_config("streamed/config.yaml").data.dataset == "python"

s = clat.train(clat.load_config(overrides=[*TOY, "pretrain.epochs=2", "pretrain.optimizer=adamw", "pretrain.lr=0.001",
                                           "pretrain.warmup_epochs=1", "pretrain.ema_decay=0.9", "finetune.epochs=0"]), "recipe")
rows = [json.loads(l) for l in pathlib.Path("recipe/metrics.jsonl").read_text().splitlines()]
rec = clat.load_config("recipe/config.yaml").pretrain
assert s["finished"] and rows[0]["lr"] == 0.001 > rows[1]["lr"], rows  # the warm-up reaches lr, then the schedule decays
assert (rec.optimizer, rec.warmup_epochs, rec.ema_decay) == ("adamw", 1, 0.9)

pathlib.Path("widenet.py").write_text(WIDENET)
s = clat.train(clat.load_config(overrides=[*TOY, "model.name=widenet:make_net", "model.kwargs.width=8", "pretrain.epochs=1",
                                           "finetune.epochs=0"]), "wide")
assert s["finished"] and clat.load_config("wide/config.yaml").model.kwargs == {"width": 8}

torch.save(clat.create_model("tiny_cnn", 7).state_dict(), "seven.pt")
s = clat.train(clat.load_config(overrides=[*TOY, "init=seven.pt", "init_reset_head=true", "pretrain.epochs=1", "finetune.epochs=0"]),
               "reset")
assert s["finished"]

page = pathlib.Path(OWN_LOOP).read_text()
code = re.findall(r"```python\n(.*?)```", page, re.S)[0]
exec(compile(code, "docs/own_loop.md", "exec"), {"__name__": "__main__"})
print("ALL SCENARIOS OK")
"""
WIDENET = """
import clat
from torch import nn

def make_net(num_classes=10, width=16):
    return nn.Sequential(clat.Normalize([0.5] * 3, [0.25] * 3), nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
"""


@pytest.mark.slow
def test_the_wheel_runs_streamed_data_recipes_factories_head_reset_and_the_own_loop_page(wheel_env, tmp_path):
    py, _, env, site, _ = wheel_env
    script = f"SITE = {str(site)!r}\nWIDENET = {WIDENET!r}\nOWN_LOOP = {str(REPO / 'docs' / 'own_loop.md')!r}\n" + WHEEL_SCENARIOS
    (tmp_path / "scenarios.py").write_text(script)
    r = subprocess.run([str(py), "scenarios.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "ALL SCENARIOS OK" in r.stdout, r.stdout[-3000:] + r.stderr[-6000:]


@pytest.mark.slow
def test_sdist_and_wheel_build_and_pass_twine_check(tmp_path):
    """`python -m build` (sdist, then the wheel from the sdist) and `twine check --strict` as `make dist` runs them, offline:
    without build isolation, which would download setuptools. The wheel carries the project URLs and the packaged configs,
    not the study's, and none of its configs names a path only our machines have."""
    import zipfile

    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(REPO)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,), (sdist,) = dist.glob("clat_at-*.whl"), dist.glob("clat_at-*.tar.gz")
    r = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.count("PASSED") == 2, r.stdout + r.stderr
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(f"clat_at-{clat.__version__}.dist-info/METADATA").decode()
        configs = [n for n in z.namelist() if n.startswith("clat/configs/") and n.endswith(".yaml")]
        shipped = [n for n in z.namelist() if n.startswith("clat/") and n.endswith((".yaml", ".md", ".py"))]
        texts = [z.read(n).decode() for n in shipped]
    urls = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]
    for name, url in urls.items():
        assert f"Project-URL: {name}, {url}" in meta
    assert configs and not [n for n in configs if n.startswith("clat/configs/study/")]
    assert any(n.endswith("cpu/bundled_quick.yaml") for n in configs)
    assert any(n == "clat/assets/README.md" for n in shipped)  # every text file the wheel installs names no path of ours
    assert not [n for n, t in zip(shipped, texts) if "shared/data" in t or "../shared" in t]


# -- what a user reads on the command line (issue 36) ----------------------------------------------------------


def _clat(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The installed command with its output going to pipes, as into a log file (not a terminal)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "clat", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_a_log_file_gets_lines_not_progress_bars_and_long_steps_say_what_they_do(tmp_path):
    run = tmp_path / "run"
    r = _clat("train", *TINY, "model.name=tiny_cnn", "finetune.epochs=0", "--run-dir", str(run))
    assert r.returncode == 0, r.stderr
    assert "epoch   1 pgd_at" in r.stderr and "it/s" not in r.stderr and "\r" not in r.stderr  # the epoch line, no tqdm bar
    assert ", 1 epoch." in (run / "report.md").read_text()  # not "1 epochs"
    r = _clat("criticality", str(run), "--batch-size", "8", "--steps", "1")
    assert r.returncode == 0 and "criticality of 5 layers: PGD-1 on 8 training images" in r.stderr, r.stderr
    assert "features.0 + 1 " not in r.stdout
    r = _clat("stability", str(run), "--batch-sizes", "4", "--repeats", "1", "--reference-size", "8", "--k", "1", "--steps", "1")
    assert r.returncode == 0 and "reference ranking on 8 training images" in r.stderr and "it/s" not in r.stderr, r.stderr
    assert "1 PGD-AT epoch in metrics.jsonl" in r.stdout
    r = _clat("-q", "criticality", str(run), "--batch-size", "8", "--steps", "1", "--out", str(tmp_path / "c"))
    assert r.returncode == 0 and r.stderr == "", r.stderr  # -q hides the status lines too
    shutil.copytree(run, tmp_path / "other")
    assert _clat("-q", "eval", str(run), "--n-examples", "8", "--steps", "1").returncode == 0
    r = _clat("-q", "report", str(run), str(tmp_path / "other"), "--names", "A,B")
    table = (tmp_path / "comparison" / "report.md").read_text()
    assert r.returncode == 0 and "| B | not evaluated | — | — |" in table
    assert f"B: not evaluated yet (`clat eval {tmp_path / 'other'}`" in table


def test_a_closed_pipe_ends_quietly():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    r = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m clat config show | head -1"], capture_output=True, text=True,
                       env=env)
    assert r.stdout.startswith("# defaults") and r.stdout.count("\n") == 1
    assert r.stderr == "" and r.returncode == 141  # 128 + SIGPIPE, as `yes | head -1` under pipefail; no "clat: error: Broken pipe"


def test_missing_cifar_names_the_config_key_and_a_misspelled_method_gets_a_suggestion(tmp_path, capsys):
    assert main(["-q", "train", *TINY, "data.dataset=cifar10", f"data.root={tmp_path}", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "data.download=true (clat train, a config), --download (clat eval" in err and err.count("\n") == 1
    assert main(["-q", "train", *TINY, "finetune.method=clta", "--run-dir", str(tmp_path / "r")]) == 2
    assert "unknown method 'clta'; did you mean clat?" in capsys.readouterr().err


def test_the_unassigned_parameters_warning_does_not_repeat_the_program_name():
    from clat.layers.discovery import find_layers, warn_unassigned

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.GroupNorm(2, 4), nn.Flatten(), nn.LazyLinear(10))
    net(torch.rand(1, 3, 8, 8))
    with pytest.warns(UserWarning) as w:
        warn_unassigned(net, find_layers(net, torch.rand(2, 3, 8, 8)), "clat")
    # printed as "clat: warning: method clat: ...", not "clat: warning: clat: ..."
    assert str(w[0].message).startswith("method clat: 8 of ")


def test_a_merged_norm_is_named_in_full_where_its_short_name_is_an_index():
    from clat.analysis.report import layer_label

    assert layer_label("features.0", "features.1") == "features.0 + features.1"
    assert layer_label("layer3.0.conv2", "layer3.0.bn2") == "layer3.0.conv2 + bn2"
    assert layer_label("conv1", "layer1.0.bn1") == "conv1 + layer1.0.bn1" and layer_label("fc", None) == "fc"
