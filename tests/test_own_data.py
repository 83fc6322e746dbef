"""Your own data (docs/data.md): Splits.from_tensors / from_numpy / from_folder, image folders, .npz files,
data.dataset=folder / npz from the config and the CLI, and the one-line error of each bad input. CPU only, tiny."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import clat
from clat.runs.checkpoint import read_state_dict
from clat.cli.main import main
from clat.config.load import load_config
from clat.data.loader import Splits, load_image_folder, load_npz
from clat.data.prepare import prepare_data
from clat.base.errors import ClatError, ConfigError, DataError

try:
    from PIL import Image
except ImportError:  # Pillow is optional (the `images` extra): only the image-folder tests need it
    Image = None
needs_pillow = pytest.mark.skipif(Image is None, reason='Pillow is not installed (pip install "clat-at[images]")')

CLASSES = ("cat", "dog", "emu")


def arrays(n: int = 30, k: int = 3, seed: int = 0, layout: str = "nhwc", dtype=np.uint8):
    """``n`` random 8x8 RGB images with labels cycling through ``k`` classes."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    if layout == "nchw":
        x = x.transpose(0, 3, 1, 2).copy()
    if dtype != np.uint8:
        x = x.astype(dtype) / 255
    return x, np.arange(n) % k


def write_folder(root: Path, per_class: dict[str, int] | None = None, size=(8, 8), classes=CLASSES) -> Path:
    """``root/train/<class>/i.png`` (6 each, or ``per_class``) and ``root/test/<class>/i.png`` (2 each); each image
    filled with its class index * 60, so labels can be checked from the pixels."""
    for split, n in (("train", 6), ("test", 2)):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range((per_class or {}).get(name, n) if split == "train" else n):
                Image.fromarray(np.full((size[1], size[0], 3), c * 60, np.uint8)).save(d / f"{i}.png")
    return root


def write_npz(path: Path, **arrs) -> Path:
    x, y = arrays()
    full = {"x_train": x, "y_train": y, "x_test": x[:6], "y_test": y[:6]} | arrs
    np.savez(path, **{k: v for k, v in full.items() if v is not None})
    return path


# --------------------------------------------------------------------------- #
# Python API
# --------------------------------------------------------------------------- #


def test_from_tensors_carves_the_validation_split_as_prepare_data_does():
    x, y = arrays(layout="nchw")
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    s = clat.Splits.from_tensors(xt, yt, xt[:6], yt[:6], val_size=5, split_seed=3)
    tr, va = clat.data.loader.train_val_split(30, 5, 3)
    assert torch.equal(s.x_train, xt[tr]) and torch.equal(s.x_val, xt[va]) and torch.equal(s.y_val, yt[va])
    assert (s.num_classes, s.name, s.class_names) == (3, "custom", None)
    s = Splits.from_tensors(xt, yt[:, None], xt[:6], yt[:6], val_size=0, num_classes=3, class_names=["a", "b", "c"])
    assert len(s.x_val) == 0 and s.y_train.dtype == torch.int64 and s.class_names == ["a", "b", "c"]


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_from_numpy_reads_both_layouts_and_dtypes(layout, dtype):
    x, y = arrays(layout=layout, dtype=dtype)
    s = Splits.from_numpy(x, y, x[:6], y[:6], val_size=5)
    x8, _ = arrays()  # the same images, uint8 channels-last
    ref = Splits.from_numpy(x8, y, x8[:6], y[:6], val_size=5)
    assert s.x_train.shape == (25, 3, 8, 8) and s.x_test.shape == (6, 3, 8, 8)
    assert s.x_train.dtype == (torch.uint8 if dtype == np.uint8 else torch.float32)
    assert torch.allclose(clat.data.loader.to_unit_float(s.x_train), clat.data.loader.to_unit_float(ref.x_train))


def test_from_numpy_grayscale_and_the_explicit_layout():
    x = np.random.default_rng(0).integers(0, 256, (12, 8, 8), dtype=np.uint8)  # [N, H, W]
    y = np.arange(12) % 2
    assert Splits.from_numpy(x, y, x, y, val_size=2).x_train.shape == (10, 1, 8, 8)
    x3 = np.zeros((12, 3, 5, 3), np.uint8)  # ambiguous: the rule cannot tell
    with pytest.raises(DataError, match="channels_last=True"):
        Splits.from_numpy(x3, y, x3, y, val_size=2)
    assert Splits.from_numpy(x3, y, x3, y, val_size=2, channels_last=True).x_train.shape == (10, 3, 3, 5)
    assert Splits.from_numpy(x3, y, x3, y, val_size=2, channels_last=False).x_train.shape == (10, 3, 5, 3)


def _bad_cases():
    x, y = arrays()
    xf = x.astype(np.float32)
    return {
        "float above 1": ((xf, y, xf[:6], y[:6]), {}, "divide them by 255"),
        "int images": ((x.astype(np.int64), y, x[:6], y[:6]), {}, "uint8 .0-255. or float"),
        "no channel axis": ((np.zeros((30, 8, 8, 8), np.uint8), y, x[:6], y[:6]), {}, "ambiguous"),
        "one image": ((x[0], y, x[:6], y[:6]), {}, r"looks like one image"),
        "flat images": ((x.reshape(30, -1), y, x[:6], y[:6]), {}, r"\[N, H, W, C\]"),
        "length mismatch": ((x, y[:-1], x[:6], y[:6]), {}, "x_train has 30 images but y_train has 29 labels"),
        "float labels": ((x, y.astype(np.float32), x[:6], y[:6]), {}, "integer class indices, got float32"),
        "one-hot labels": ((x, np.eye(3)[y].astype(np.int64), x[:6], y[:6]), {}, "argmax"),
        "negative label": ((x, y - 1, x[:6], y[:6]), {}, "negative label -1"),
        "label above num_classes": ((x, y, x[:6], y[:6]), {"num_classes": 2}, "label 2 but num_classes=2"),
        "test label above num_classes": ((x, y, x[:6], y[:6] + 3), {"num_classes": 3}, "y_test holds the label 5"),
        "empty class": ((x, y, x[:6], y[:6]), {"num_classes": 4}, r"no training image has class 3 of 0\.\.3"),
        "1-based labels": ((x, y + 1, x[:6], y[:6] + 1), {}, "no training image has class 0"),
        "one class": ((x, 0 * y, x[:6], 0 * y[:6]), {}, "at least 2 classes"),
        "sizes differ": ((x, y, x[:6, :4], y[:6]), {}, "x_test images are 3x4x8"),
        "empty test": ((x, y, x[:0], y[:0]), {}, "x_test holds no images"),
        "val too large": ((x, y, x[:6], y[:6]), {"val_size": 30}, "smaller validation size"),
        "class names": ((x, y, x[:6], y[:6]), {"class_names": ["a"]}, "1 class_names for 3 classes"),
        "not arrays": (([[0]], y, x[:6], y[:6]), {}, "numpy array"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_from_numpy_refuses_bad_data_in_one_line(case):
    args, kwargs, message = _bad_cases()[case]
    with pytest.raises(DataError, match=message) as err:
        Splits.from_numpy(*args, **{"val_size": 3, **kwargs})
    assert "\n" not in str(err.value)


def test_from_tensors_refuses_channels_last_and_bad_labels():
    x, y = torch.zeros(10, 8, 8, 3, dtype=torch.uint8), torch.arange(10) % 2
    with pytest.raises(DataError, match="looks channels-last"):
        Splits.from_tensors(x, y, x, y, val_size=2)
    x = x.permute(0, 3, 1, 2)
    with pytest.raises(DataError, match="got torch.float32"):
        Splits.from_tensors(x, y.float(), x, y, val_size=2)
    with pytest.raises(DataError, match="must be a tensor"):
        Splits.from_tensors(x.numpy(), y, x, y, val_size=2)
    assert Splits.from_tensors(x, y, x, y, val_size=2).num_classes == 2


# --------------------------------------------------------------------------- #
# Image folders
# --------------------------------------------------------------------------- #


@needs_pillow
def test_image_folder_reads_classes_in_sorted_order_interleaved(tmp_path):
    root = write_folder(tmp_path / "imgs")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")  # skipped
    x, y, names = load_image_folder(root, "train")
    assert names == ["cat", "dog", "emu"] and x.shape == (18, 3, 8, 8) and x.dtype == torch.uint8
    assert y.tolist() == [0, 1, 2] * 6  # one image of each class in turn: a train_size cut keeps every class
    assert torch.equal(x[:, 0, 0, 0].long(), y * 60)  # the pixels say which folder an image came from
    s = Splits.from_folder(root, val_size=3)
    assert s.class_names == names and s.num_classes == 3 and s.x_test.shape == (6, 3, 8, 8) and "imgs" in s.name


@needs_pillow
def test_image_folder_converts_grayscale_and_other_modes_to_rgb(tmp_path):
    root = write_folder(tmp_path / "imgs")
    Image.fromarray(np.full((8, 8), 60, np.uint8), "L").save(root / "train" / "dog" / "gray.png")
    Image.fromarray(np.full((8, 8, 4), 120, np.uint8), "RGBA").save(root / "train" / "emu" / "alpha.png")
    Image.fromarray(np.full((8, 8, 3), 0, np.uint8)).save(root / "train" / "cat" / "photo.JPG")
    x, y, _ = load_image_folder(root, "train")
    assert x.shape == (21, 3, 8, 8) and torch.equal(x[:, :, 0, 0].float().std(1), torch.zeros(21))


def _folder_cases(tmp: Path) -> dict[str, tuple[Path, str]]:
    cases = {"missing root": (tmp / "nowhere", "does not exist or is not a folder")}
    r = tmp / "no_test"
    write_folder(r)
    import shutil

    shutil.rmtree(r / "test")
    cases["no test folder"] = (r, "has no test/ folder")
    r = tmp / "no_classes"
    (r / "train").mkdir(parents=True)
    cases["no class folders"] = (r, "has no class folders")
    r = write_folder(tmp / "empty_class")
    (r / "train" / "fox").mkdir()
    cases["empty class folder"] = (r, r"fox holds no images")
    r = write_folder(tmp / "class_mismatch")
    shutil.rmtree(r / "test" / "emu")
    cases["test classes differ"] = (r, r"missing: \['emu'\]")
    r = write_folder(tmp / "size")
    Image.fromarray(np.zeros((9, 10, 3), np.uint8)).save(r / "train" / "dog" / "big.png")
    cases["train sizes differ"] = (r, r"big.png is 10x9 pixels but .*0.png is 8x8.*resize them first")
    r = write_folder(tmp / "test_size")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(r / "test" / "dog" / "small.png")
    cases["test size differs"] = (r, r"small.png is 4x4 pixels but the training images are 8x8")
    r = write_folder(tmp / "broken")
    (r / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    cases["unreadable file"] = (r, r"cannot read image .*broken.png")
    return cases


@needs_pillow
def test_bad_image_folders_fail_in_one_line_naming_the_path(tmp_path):
    for name, (root, message) in _folder_cases(tmp_path).items():
        with pytest.raises(DataError, match=message) as err:
            Splits.from_folder(root, val_size=1)
        assert "\n" not in str(err.value), name


def test_missing_pillow_names_the_extra(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` now raises ImportError
    with pytest.raises(DataError, match=r'pip install "clat-at\[images\]"'):
        load_image_folder(root, "train")


# --------------------------------------------------------------------------- #
# .npz files
# --------------------------------------------------------------------------- #


def test_npz_round_trip(tmp_path):
    x, y = arrays()
    p = write_npz(tmp_path / "d.npz", y_train=y[:, None])  # [N, 1] labels, as Keras gives them
    parts = load_npz(p)
    s = Splits.from_numpy(*parts, val_size=4)
    assert s.x_train.shape == (26, 3, 8, 8) and s.num_classes == 3 and np.array_equal(parts[0], x)


def test_bad_npz_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_npz(tmp_path / "none.npz")
    with pytest.raises(DataError, match=r"lacks the array\(s\) \['y_test'\] \(it has \['x_test', 'x_train', 'y_train'\]\)"):
        load_npz(write_npz(tmp_path / "m.npz", y_test=None))
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(DataError, match="single array"):
        load_npz(tmp_path / "one.npy")
    np.savez(tmp_path / "obj.npz", x_train=np.array([{"a": 1}], dtype=object), y_train=[0], x_test=[0], y_test=[0])
    with pytest.raises(DataError, match="cannot read .*obj.npz"):  # pickled objects are never loaded
        load_npz(tmp_path / "obj.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 junk")
    with pytest.raises(DataError, match="cannot read .*junk.npz"):
        load_npz(tmp_path / "junk.npz")


# --------------------------------------------------------------------------- #
# data.dataset=folder / npz
# --------------------------------------------------------------------------- #


@needs_pillow
def test_prepare_data_reads_folder_and_npz_with_the_size_keys(tmp_path):
    root = write_folder(tmp_path / "imgs")
    s = prepare_data(load_config(None, ["data.dataset=folder", f"data.root={root}", "data.train_size=12", "data.test_size=3",
                                        "data.val_size=3", "data.split_seed=1"]))
    assert (len(s.x_train), len(s.x_val), len(s.x_test), s.num_classes, s.class_names) == (9, 3, 3, 3, list(CLASSES))
    assert s.y_test.tolist() == [0, 1, 2]
    gray = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
    p = write_npz(tmp_path / "g.npz", x_train=gray, y_train=np.arange(20) % 4, x_test=gray[:4], y_test=np.arange(4))
    s = prepare_data(load_config(None, ["data.dataset=npz", f"data.root={p}", "data.val_size=4"]))
    assert s.x_train.shape == (16, 3, 8, 8) and s.num_classes == 4  # 1 channel repeated to RGB for the model zoo
    s = prepare_data(load_config(None, ["data.dataset=npz", f"data.root={p}", "data.val_size=4", "data.test_size=1"]))
    assert s.num_classes == 4  # from all the labels, before the cut
    with pytest.raises(DataError, match="no training image has class 4"):
        prepare_data(load_config(None, ["data.dataset=npz", f"data.root={p}", "data.val_size=4", "model.num_classes=5"]))


def test_config_errors_for_own_data(tmp_path):
    with pytest.raises(ConfigError, match="nothing to download"):
        load_config(None, ["data.dataset=folder", "data.download=true"])
    with pytest.raises(ConfigError, match="unknown dataset .imagefolder.; did you mean folder"):
        load_config(None, ["data.dataset=imagefolder"])
    cfg = load_config(None, ["data.dataset=npz", f"data.root={tmp_path}"])
    cfg.data.download = True  # set by the CLI's --download, past the config's validation
    with pytest.raises(ConfigError, match="nothing to download"):
        prepare_data(cfg)


TRAIN_FAST = ["model.name=tiny_cnn", "pretrain.epochs=1", "finetune.epochs=1", "data.val_size=3", "data.batch_size=8",
              "attack.steps=1", "clat.criticality.steps=1", "clat.criticality.batch_size=6", "eval.n_examples=3", "eval.steps=1",
              "progress=false"]


@needs_pillow
def test_train_and_eval_on_an_image_folder_through_the_cli(tmp_path, capsys):
    root = write_folder(tmp_path / "imgs")
    run = tmp_path / "run"
    assert main(["-q", "train", "--run-dir", str(run), "data.dataset=folder", f"data.root={root}", *TRAIN_FAST]) == 0
    meta = json.loads((run / "summary.json").read_text())
    assert "imgs" in json.dumps(meta)
    assert read_state_dict(run / "model.safetensors")["classifier.weight"].shape[0] == 3  # a 3-class model
    out = tmp_path / "e.json"
    assert main(["-q", "eval", str(run), "--steps", "1", "--out", str(out)]) == 0  # the run's own data set
    res = json.loads(out.read_text())
    assert res["n"] == 6 and "image folder" in res["data"]
    assert main(["-q", "criticality", "--model", "tiny_cnn", "--num-classes", "3", "--dataset", "folder", "--root", str(root),
                 "--batch-size", "6", "--steps", "1", "--out", str(tmp_path / "crit")]) == 0
    capsys.readouterr()
    assert main(["-q", "eval", str(run), "--dataset", "npz", "--root", str(root)]) == 2
    assert "not a file" in capsys.readouterr().err


def test_python_train_on_own_tensors(tmp_path):
    x, y = arrays(n=24, k=4)
    splits = Splits.from_numpy(x, y, x[:8], y[:8], val_size=4, name="four classes")
    summary = clat.train(load_config(None, TRAIN_FAST + ["finetune.epochs=0"]), tmp_path / "r", data=splits)
    assert summary["final_val"]["n"] == 3
    with pytest.raises(ClatError, match="model.num_classes=10 but the data set has 4 classes"):
        clat.train(load_config(None, TRAIN_FAST + ["model.num_classes=10"]), tmp_path / "r2", data=splits)


@needs_pillow
def test_bad_own_data_through_the_cli_is_a_one_line_error(tmp_path, capsys):
    root = write_folder(tmp_path / "imgs")
    (root / "train" / "fox").mkdir()
    cases = [([f"data.root={root}", "data.dataset=folder"], "fox holds no images"),
             ([f"data.root={tmp_path / 'none.npz'}", "data.dataset=npz"], "does not exist or is not a file"),
             ([f"data.root={root}", "data.dataset=folder", "data.download=true"], "nothing to download")]
    for i, (argv, message) in enumerate(cases):
        assert main(["-q", "train", "--run-dir", str(tmp_path / f"r{i}"), *TRAIN_FAST, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("clat: error:") and message in err and "\n" not in err, err
        assert not (tmp_path / f"r{i}").exists()


def test_docs_data_python_example_runs(tmp_path, monkeypatch, capsys):
    text = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "docs/data.md has no python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "docs/data.md", "exec"), {"__name__": "docs_data"})
    assert (tmp_path / "runs" / "my-data" / "model.safetensors").is_file()
    assert "4 (100, 3, 32, 32)" in capsys.readouterr().out
    assert read_state_dict(tmp_path / "runs" / "my-data" / "model.safetensors")["classifier.weight"].shape[0] == 4
