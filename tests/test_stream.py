"""Streamed data (clat.stream, docs/data.md): torch Datasets and DataLoaders, image folders read every epoch, resized,
and the record a run keeps of data given from Python. CPU only, tiny."""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, WeightedRandomSampler

import clat
from clat.runs.checkpoint import read_state_dict
from clat.cli.main import main
from clat.config.load import config_from_dict, load_config
from clat.data.loader import Loader, Splits
from clat.data.prepare import prepare_data
from clat.base.errors import ClatError, ConfigError, DataError
from clat.data.stream import DatasetSplits, FolderDataset, StreamLoader, as_splits, collate

try:
    from PIL import Image
except ImportError:  # Pillow is optional (the `images` extra): only the image-folder tests need it
    Image = None
needs_pillow = pytest.mark.skipif(Image is None, reason='Pillow is not installed (pip install "clat-at[images]")')


def tensors(n: int = 60, k: int = 3, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 255).to(torch.uint8), torch.arange(n) % k


class Items(Dataset):
    """``(image, label)`` items of tensors; ``noise``: a random transform drawing from torch's, Python's and numpy's
    global generators (as torchvision's transforms and user code do)."""

    def __init__(self, x, y, noise: bool = False, kind: str = "tensor"):
        self.x, self.y, self.noise, self.kind = x, y, noise, kind

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        if self.noise:
            x = (x.float() / 255 * 0.5 + 0.4 * torch.rand(()) + 0.05 * random.random() + 0.05 * np.random.rand()).clamp(0, 1)
        if self.kind == "numpy":
            x = x.permute(1, 2, 0).numpy()
        elif self.kind == "pil":
            x = Image.fromarray(x.permute(1, 2, 0).numpy())
        return x, int(self.y[i])


def batches(loader, epochs=(0, 1)):
    out = []
    for e in epochs:
        loader.set_epoch(e)
        out += [(x.clone(), y.clone()) for x, y in loader]
    return out


# --------------------------------------------------------------------------- #
# The loader: the in-memory batches, whatever the workers and ranks
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("augment", [True, "crop_flip", "flip", "none", False])
@pytest.mark.parametrize("workers", [0, 2])
def test_stream_loader_gives_the_in_memory_loaders_batches(augment, workers):
    x, y = tensors()
    splits = DatasetSplits(Items(x, y), val_size=0, num_classes=3, workers=workers)
    kw = dict(shuffle=True, augment=augment, drop_last=False, seed=5)
    got, want = batches(StreamLoader(splits, 16, **kw)), batches(Loader(x, y, 16, **kw))
    assert len(got) == len(want) == 8
    for (a, b), (c, d) in zip(got, want):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_augment_modes_do_what_their_names_say():
    x, y = tensors(n=16)
    plain = batches(Loader(x, y, 16, augment="none"), (0,))[0][0]
    flip = batches(Loader(x, y, 16, augment="flip"), (0,))[0][0]
    crop = batches(Loader(x, y, 16, augment="crop_flip"), (0,))[0][0]
    assert all(torch.equal(f, p) or torch.equal(f, p.flip(2)) for f, p in zip(flip, plain))
    assert not torch.equal(flip, plain) and not torch.equal(crop, flip)
    assert torch.equal(crop, batches(Loader(x, y, 16, augment=True), (0,))[0][0])  # true is crop_flip
    with pytest.raises(DataError, match="augment must be one of"):
        Loader(x, y, 16, augment="cifar")


@pytest.mark.parametrize("augment", [True, False])
def test_stream_loader_two_ranks_reassemble_one_rank(augment):
    x, y = tensors(n=64)
    splits = DatasetSplits(Items(x, y), val_size=0, num_classes=3, workers=0)
    kw = dict(shuffle=True, augment=augment, drop_last=True, seed=1)
    one = batches(StreamLoader(splits, 16, **kw))
    parts = [batches(StreamLoader(splits, 8, rank=r, world_size=2, **kw)) for r in (0, 1)]
    assert len(one) == len(parts[0]) == len(parts[1]) == 8
    for (xa, ya), (x0, y0), (x1, y1) in zip(one, *parts):
        assert torch.equal(xa, torch.cat([x0, x1])) and torch.equal(ya, torch.cat([y0, y1]))


def test_random_transforms_are_seeded_per_item_whatever_the_workers():
    x, y = tensors(n=40)
    ds = Items(x, y, noise=True)
    runs = {w: batches(StreamLoader(DatasetSplits(ds, val_size=0, num_classes=3, workers=w), 8, shuffle=True, seed=2)) for w in (0, 2)}
    for (a, _), (b, _) in zip(runs[0], runs[2]):
        assert torch.equal(a, b)
    state = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    again = batches(StreamLoader(DatasetSplits(ds, val_size=0, num_classes=3, workers=0), 8, shuffle=True, seed=2))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(again, runs[0]))
    assert torch.equal(torch.get_rng_state(), state[0]) and random.getstate() == state[1]  # the run's own generators untouched
    assert np.array_equal(np.random.get_state()[1], state[2])
    assert not torch.equal(runs[0][0][0], runs[0][5][0][: len(runs[0][0][0])])  # the noise differs from item to item


@pytest.mark.parametrize("kind", ["tensor", "numpy", "pil"])
def test_items_may_be_tensors_numpy_arrays_or_pil_images(kind):
    if kind == "pil" and Image is None:
        pytest.skip("Pillow is not installed")
    x, y = tensors(n=10)
    xb, yb = collate([Items(x, y, kind=kind)[i] for i in range(10)])
    assert torch.equal(xb, x) and torch.equal(yb, y)


def test_validation_split_and_sampler_match_the_in_memory_splits():
    x, y = tensors(n=50)
    mem = Splits.from_tensors(x, y, x[:5], y[:5], val_size=10, split_seed=4)
    st = DatasetSplits(Items(x, y), TensorDataset(x[:5], y[:5]), val_size=10, split_seed=4, num_classes=3, workers=0)
    assert st.n_train == mem.n_train == 40
    for part in ("val", "test", "train"):
        assert torch.equal(getattr(st, f"x_{part}"), getattr(mem, f"x_{part}"))
        assert torch.equal(getattr(st, f"y_{part}"), getattr(mem, f"y_{part}"))
    assert torch.equal(st.probe(2), mem.probe(2))
    gen = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    for a, b in zip(st.sampler(gen)(7), mem.sampler(gen)(7)):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- #
# What data= takes, and what it refuses (one line each)
# --------------------------------------------------------------------------- #


class Endless(IterableDataset):
    def __iter__(self):
        yield torch.zeros(3, 8, 8), 0


def _bad(kind):
    x, y = tensors(n=20)
    normalized = Items(((x.float() / 255) - 0.5) / 0.25, y)
    return {
        "iterable": (Endless(), "IterableDataset"),
        "no classes": (Items(x, y), "cannot tell how many classes"),
        "normalized": (normalized, "drop a Normalize transform"),
        "label": (Items(x, y + 5), "outside 0..2"),
        "float label": (TensorDataset(x, y.float()), "labels are integer class indices"),
        "not pairs": (TensorDataset(x), "items must be (image, label) pairs, got a tuple of 1"),
        "sizes": (Items(list(x[:10]) + list(torch.zeros(10, 3, 6, 6, dtype=torch.uint8)), y), "the same size"),
        "sampler": (DataLoader(Items(x, y), batch_size=8, sampler=WeightedRandomSampler([1.0] * 20, 20)), "clat draws the order itself"),
        "batch size": (DataLoader(Items(x, y), batch_size=4, shuffle=True), "give both the same batch size"),
        "no batches": (DataLoader(Items(x, y), batch_size=None), "clat draws the order itself"),
        "array": (x.numpy(), "clat.Splits.from_numpy"),
        "val size": (Items(x[:3], y[:3]), "data.val_size=3 leaves no training items"),
    }[kind]


@pytest.mark.parametrize("kind", ["iterable", "no classes", "normalized", "label", "float label", "not pairs", "sizes", "sampler",
                                  "batch size", "no batches", "array", "val size"])
def test_bad_data_is_a_one_line_error_before_the_run_folder_is_touched(kind, tmp_path):
    data, message = _bad(kind)
    over = TRAIN_FAST + ([] if kind == "no classes" else ["model.num_classes=3"])
    with pytest.raises(ClatError, match=re.escape(message)) as err:
        clat.train(load_config(None, over), tmp_path / "r", data=data)
    assert "\n" not in str(err.value)
    if kind != "sizes":  # found in the validation images, read before the run starts; another size may show only while training
        assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- #
# Training on Datasets and DataLoaders
# --------------------------------------------------------------------------- #

TRAIN_FAST = ["model.name=tiny_cnn", "pretrain.epochs=1", "finetune.epochs=1", "data.val_size=3", "data.batch_size=8",
              "attack.steps=1", "clat.criticality.steps=1", "clat.criticality.batch_size=6", "eval.n_examples=3", "eval.steps=1",
              "progress=false", "log.console=false", "data.workers=0"]


def _weights(run):
    return read_state_dict(Path(run) / "model.safetensors")


def test_a_dataset_and_a_dataloader_train_exactly_as_the_same_tensors_in_memory(tmp_path):
    x, y = tensors(n=40)
    over = TRAIN_FAST + ["model.num_classes=3", "data.val_size=6"]
    runs = {"splits": Splits.from_tensors(x, y, x[:4], y[:4], val_size=6), "dataset": Items(x, y),
            "loader": DataLoader(Items(x, y), batch_size=8, shuffle=True, num_workers=2)}
    for name, data in runs.items():
        torch.manual_seed(0)
        clat.train(load_config(None, over), tmp_path / name, data=data)
    want = _weights(tmp_path / "splits")
    for name in ("dataset", "loader"):
        got = _weights(tmp_path / name)
        assert all(torch.equal(got[k], want[k]) for k in want), name
    cfg = clat.runs.folder.RunDir(tmp_path / "loader").read_config()
    assert cfg.data.workers == 2 and cfg.data.dataset == "python"
    assert "Items: 34 train + 6 val items 3x8x8 uint8, 3 classes" in cfg.data.fingerprint


def test_a_run_on_python_data_records_it_and_commands_ask_for_the_data(tmp_path, capsys):
    x, y = tensors(n=40)
    run = tmp_path / "r"
    splits = Splits.from_tensors(x, y, x[:6], y[:6], val_size=3, name="mine")
    clat.train(load_config(None, TRAIN_FAST), run, data=splits)
    cfg = clat.runs.folder.RunDir(run).read_config()
    assert cfg.data.dataset == "python"
    assert cfg.data.fingerprint.startswith("mine (tensors): 37 train + 3 val + 6 test images 3x8x8 uint8, 3 classes, sha256 ")
    assert cfg.data.fingerprint == clat.data.stream.fingerprint(splits)
    for argv in (["eval", str(run), "--steps", "1"], ["criticality", str(run), "--steps", "1"], ["stability", str(run)]):
        assert main(["-q", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "trained on data given from Python (mine (tensors): 37 train" in err, err
        assert "--dataset npz --root FILE.npz" in err
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=x.numpy(), y_train=y.numpy(), x_test=x[:6].numpy(), y_test=y[:6].numpy())
    assert main(["-q", "eval", str(run), "--steps", "1", "--dataset", "npz", "--root", str(npz), "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 6


def test_resuming_python_data_needs_the_same_data(tmp_path):
    x, y = tensors(n=40)
    splits = Splits.from_tensors(x, y, x[:6], y[:6], val_size=3)
    over = TRAIN_FAST + ["finetune.epochs=2"]
    torch.manual_seed(0)
    clat.train(load_config(None, over), tmp_path / "whole", data=splits)
    torch.manual_seed(0)
    assert clat.train(load_config(None, over), tmp_path / "r", data=splits, until_epoch=1)["finished"] is False
    with pytest.raises(ConfigError, match=r"trained on data given from Python .*clat.train\(None, run_dir, resume=True, data="):
        clat.train(None, tmp_path / "r", resume=True)
    assert main(["-q", "train", "--resume", str(tmp_path / "r")]) == 2
    other = Splits.from_tensors(x.flip(0), y.flip(0), x[:6], y[:6], val_size=3)
    with pytest.raises(DataError, match="not the data this run was trained on") as err:
        clat.train(None, tmp_path / "r", resume=True, data=other)
    assert "\n" not in str(err.value)
    clat.train(None, tmp_path / "r", resume=True, data=splits)
    want, got = _weights(tmp_path / "whole"), _weights(tmp_path / "r")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_config_checks_of_the_new_data_keys():
    cases = [(["data.dataset=npz", "data.image_size=32"], "data.image_size resizes the images of an image folder"),
             (["data.dataset=bundled", "data.stream=true"], "data.stream=true streams an image folder"),
             (["data.workers=-1"], "data.workers must be >= 0"),
             (["data.image_size=0", "data.dataset=folder"], "data.image_size must be >= 1"),
             (["data.fingerprint=abc"], "data.fingerprint is written by clat.train"),
             (["data.augment=cifar"], "data.augment must be one of crop_flip, flip, none")]
    for over, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(None, over)
    assert load_config(None, ["data.augment=flip"]).data.augment == "flip"
    assert load_config(None, ["data.augment=false"]).data.augment is False
    old = config_from_dict({"data": {"dataset": "cifar10", "augment": True}})  # a config.yaml of clat 0.2: no new keys
    assert (old.data.stream, old.data.image_size, old.data.fingerprint, old.data.workers) == (False, None, None, 2)


def test_data_dataset_python_cannot_be_read_from_the_command_line(tmp_path, capsys):
    assert main(["-q", "train", "--run-dir", str(tmp_path / "r"), *TRAIN_FAST, "data.dataset=python"]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.dataset=python" in err and "\n" not in err and not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- #
# Image folders: resized, streamed
# --------------------------------------------------------------------------- #


def write_folder(root: Path, sizes=((8, 8),), classes=("cat", "dog", "emu"), per_class=(6, 2)) -> Path:
    """``root/{train,test}/<class>/i.png``, random pixels; image i of a class has size ``sizes[i % len(sizes)]``."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class):
        for name in classes:
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = sizes[i % len(sizes)]
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


@needs_pillow
def test_resize_scales_the_shorter_side_and_crops_the_center(tmp_path):
    from clat.data.readers import read_image, resize_image

    wide = np.random.default_rng(1).integers(0, 256, (8, 16, 3), dtype=np.uint8)  # 16 wide, 8 high
    Image.fromarray(wide).save(tmp_path / "w.png")
    assert np.array_equal(read_image(tmp_path / "w.png", Image, 8), wide[:, 4:12])  # already 8 high: the central 8 columns
    assert read_image(tmp_path / "w.png", Image, 4).shape == (4, 4, 3)
    im = Image.fromarray(wide[:, :8])
    assert resize_image(im, 8, Image) is im  # the right size already: untouched


@needs_pillow
@pytest.mark.parametrize("image_size", [None, 6])
def test_a_streamed_image_folder_trains_exactly_as_the_folder_in_memory(tmp_path, image_size):
    sizes = ((8, 8),) if image_size is None else ((8, 8), (10, 7), (12, 16))
    root = write_folder(tmp_path / "imgs", sizes=sizes)
    base = ["--run-dir", None, *TRAIN_FAST, "data.dataset=folder", f"data.root={root}", "data.augment=flip"]
    base += [] if image_size is None else [f"data.image_size={image_size}"]
    for name, extra in (("mem", []), ("stream", ["data.stream=true", "data.workers=1"])):
        argv = ["-q", "train", *base, *extra]
        argv[argv.index(None)] = str(tmp_path / name)
        torch.manual_seed(0)
        assert main(argv) == 0
    want, got = _weights(tmp_path / "mem"), _weights(tmp_path / "stream")
    assert all(torch.equal(got[k], want[k]) for k in want)
    cfg = load_config(None, ["data.dataset=folder", f"data.root={root}", "data.stream=true", "data.val_size=3"]
                      + ([] if image_size is None else [f"data.image_size={image_size}"]))
    splits = prepare_data(cfg)
    side = image_size or 8
    assert isinstance(splits, DatasetSplits) and splits.x_test.shape == (6, 3, side, side) and splits.class_names == ["cat", "dog", "emu"]


@needs_pillow
def test_a_streamed_folder_of_mixed_sizes_without_image_size_names_the_file(tmp_path, capsys):
    root = write_folder(tmp_path / "imgs", sizes=((8, 8), (9, 8)))
    assert main(["-q", "train", "--run-dir", str(tmp_path / "r"), *TRAIN_FAST, "data.dataset=folder", f"data.root={root}",
                 "data.stream=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train/cat/5.png is 9x8 pixels but" in err and "data.image_size" in err and "\n" not in err, err
    with pytest.raises(DataError, match="all images must have the same size"):
        Splits.from_folder(root, val_size=2)
    assert Splits.from_folder(root, val_size=2, image_size=8).x_train.shape[1:] == (3, 8, 8)


@needs_pillow
def test_folder_dataset_items_are_those_of_the_in_memory_folder(tmp_path):
    from clat.data.readers import load_image_folder

    root = write_folder(tmp_path / "imgs", sizes=((8, 8), (10, 7)))
    x, y, names = load_image_folder(root, "train", image_size=5)
    ds = FolderDataset(root, "train", image_size=5, limit=7)
    assert len(ds) == 7 and ds.classes == names and ds.targets == y[:7].tolist()
    assert all(torch.equal(ds[i][0], x[i]) for i in range(7))


# --------------------------------------------------------------------------- #
# Several ranks
# --------------------------------------------------------------------------- #


def _rank(rank, world, init_file, run_dir):
    import torch.distributed as dist

    from tests.test_distributed import NoBNNet

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _ddp_run(run_dir, 8, NoBNNet)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _ddp_run(run_dir, batch_size, net):
    x, y = tensors(n=56, k=10, size=16)
    torch.manual_seed(0)
    over = TRAIN_FAST + ["model.num_classes=10", "data.val_size=8", "eval.n_examples=8", f"data.batch_size={batch_size}", "device=cpu"]
    return clat.train(load_config(None, over), run_dir, model=net(), data=Items(x, y, noise=True))


def test_two_gloo_processes_stream_the_batches_of_one_process(tmp_path):
    import torch.multiprocessing as mp

    from tests.test_distributed import NoBNNet

    mp.spawn(_rank, args=(2, str(tmp_path / "init"), tmp_path / "ddp"), nprocs=2, join=True)
    _ddp_run(tmp_path / "single", 16, NoBNNet)
    a, b = _weights(tmp_path / "single"), _weights(tmp_path / "ddp")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_as_splits_keeps_splits_and_defaults_workers():
    x, y = tensors(n=20)
    cfg = load_config(None, ["data.val_size=4", "model.num_classes=3", "data.workers=3"])
    s = Splits.from_tensors(x, y, x, y, val_size=4)
    assert as_splits(s, cfg) is s
    ds = DatasetSplits(Items(x, y), val_size=4, num_classes=3)
    got = as_splits(ds, cfg)
    assert got.workers == 3 and ds.workers is None and got.train is ds.train
    assert as_splits(Items(x, y), cfg).n_train == 16
    assert sys.modules["clat"].DatasetSplits is DatasetSplits


def test_the_docs_streaming_example_runs_as_written(tmp_path, monkeypatch, capsys):
    text = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "clat.DatasetSplits(" in b)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "docs/data.md", "exec"), {"__name__": "docs_data_stream"})
    out = capsys.readouterr().out
    assert "my images (MyImages): 100 train + 20 val items 3x32x32 float32, 4 classes, sha256 " in out
    assert read_state_dict(tmp_path / "runs" / "streamed" / "model.safetensors")["classifier.weight"].shape[0] == 4
