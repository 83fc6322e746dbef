"""Tests of clat.data: official-format reading, safety, download, bundled data,
splits, augmentation and the loader. CPU only, no network."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shlex
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clat.data import loader as data
from clat.data.loader import (
    NUM_CLASSES,
    ChecksumWarning,
    Loader,
    augment,
    load_bundled,
    load_cifar,
    train_val_split,
)
from clat.base.errors import DataError

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = REPO / ".." / "shared" / "data" / "cifar-10-batches-py"

# Tiny folders are read with verify=False on purpose; the warning is tested once.
pytestmark = pytest.mark.filterwarnings("ignore::clat.data.loader.ChecksumWarning")

C10_TRAIN = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")


# --------------------------------------------------------------------------- #
# Helpers: tiny folders in the official format
# --------------------------------------------------------------------------- #


def _batch(n: int, num_classes: int, label_key: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "batch_label": "tiny",
        "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, num_classes, size=n)],
    }


def _dump(path: Path, obj: object, protocol: int = 2) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def make_cifar10(root: Path, n: int = 4) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, f in enumerate(C10_TRAIN):
        _dump(folder / f, _batch(n, 10, "labels", i))
    _dump(folder / "test_batch", _batch(n + 1, 10, "labels", 99))
    _dump(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return folder


def make_cifar100(root: Path, n: int = 6) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    _dump(folder / "train", _batch(n, 100, "fine_labels", 1) | {"coarse_labels": [0] * n}, 4)
    _dump(
        folder / "test", _batch(n - 1, 100, "fine_labels", 2) | {"coarse_labels": [0] * (n - 1)}, 4
    )
    _dump(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]}, 4)
    return folder


def load_quiet(*args, **kwargs):
    with pytest.warns(ChecksumWarning):
        return load_cifar(*args, verify=False, **kwargs)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- #
# Official files
# --------------------------------------------------------------------------- #


def test_load_tiny_cifar10_matches_files(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    x, y = load_quiet("cifar10", tmp_path, True)
    assert x.dtype == torch.uint8 and x.shape == (20, 3, 32, 32)
    assert y.dtype == torch.int64 and y.shape == (20,)
    first = pickle.loads((folder / "data_batch_1").read_bytes(), encoding="latin1")
    # 1024 red, then green, then blue values, row-major.
    img = first["data"][1]
    assert torch.equal(x[1, 0], torch.from_numpy(img[:1024].reshape(32, 32)))
    assert torch.equal(x[1, 2, 5, 7], torch.tensor(img[2048 + 5 * 32 + 7]))
    assert y[:4].tolist() == first["labels"]
    last = pickle.loads((folder / "data_batch_5").read_bytes(), encoding="latin1")
    assert y[16:].tolist() == last["labels"]

    xt, yt = load_quiet("cifar10", tmp_path, False)
    assert xt.shape == (5, 3, 32, 32) and yt.shape == (5,)


def test_root_may_be_the_batches_folder(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    x1, y1 = load_quiet("cifar10", tmp_path, False)
    x2, y2 = load_quiet("cifar10", folder, False)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_load_tiny_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    folder = make_cifar100(tmp_path)
    x, y = load_quiet("cifar100", tmp_path, True)
    assert x.shape == (6, 3, 32, 32) and y.dtype == torch.int64
    ref = pickle.loads((folder / "train").read_bytes(), encoding="latin1")
    assert y.tolist() == ref["fine_labels"]
    xt, yt = load_quiet("cifar100", folder, False)
    assert xt.shape == (5, 3, 32, 32) and int(yt.max()) < NUM_CLASSES["cifar100"]


@pytest.mark.parametrize("name,maker", [("cifar10", make_cifar10), ("cifar100", make_cifar100)])
def test_verify_rejects_unofficial_files(tmp_path: Path, name: str, maker) -> None:
    maker(tmp_path)
    with pytest.raises(DataError, match=r"not the official.*verify=False"):
        load_cifar(name, tmp_path, True)


def test_verify_false_warns_once(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_cifar("cifar10", tmp_path, True, verify=False)
    assert [w.category for w in caught] == [ChecksumWarning]
    assert "checksum" in str(caught[0].message)


def test_verify_accepts_official_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_cifar10(tmp_path)
    table = {f: md5(folder / f) for f in (*C10_TRAIN, "test_batch")}
    monkeypatch.setitem(data.FILE_MD5, "cifar10", table)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, _ = load_cifar("cifar10", tmp_path, True)
    assert x.shape[0] == 20


def test_missing_folder_explains_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="download"):
        load_cifar("cifar10", tmp_path / "nowhere", True)


def test_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar10"):
        load_cifar("mnist", tmp_path, True)  # type: ignore[arg-type]


def test_missing_file(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar("cifar10", tmp_path, True, verify=False)


BAD_ENTRIES = {
    "wrong shape": (lambda e: e.update(data=e["data"][:, :3000]), "shape"),
    "wrong dtype": (lambda e: e.update(data=e["data"].astype(np.float32)), "uint8"),
    "1-d data": (lambda e: e.update(data=e["data"].reshape(-1)), "shape"),
    "label out of range": (lambda e: e["labels"].__setitem__(0, 10), r"outside \[0, 10\)"),
    "negative label": (lambda e: e["labels"].__setitem__(0, -1), "outside"),
    "lengths differ": (lambda e: e.update(labels=e["labels"][:-1]), "4 images but 3 labels"),
    "float labels": (lambda e: e.update(labels=[0.5] * 4), "integers"),
    "no labels": (lambda e: e.pop("labels"), "'labels'"),
    "no images": (lambda e: e.update(data=e["data"][:0], labels=[]), "no images"),
}


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_malformed_file(tmp_path: Path, case: str) -> None:
    folder = make_cifar10(tmp_path)
    entry = pickle.loads((folder / "data_batch_2").read_bytes(), encoding="latin1")
    change, message = BAD_ENTRIES[case]
    change(entry)
    _dump(folder / "data_batch_2", entry, protocol=4)
    with pytest.raises(DataError, match=message) as err:
        load_cifar("cifar10", tmp_path, True, verify=False)
    assert "data_batch_2" in str(err.value)


@pytest.mark.parametrize(
    "content,message",
    [(b"", "empty"), (b"\x80\x02}q\x00(X", "not a readable"), (b"not a pickle", "not a readable")],
)
def test_empty_or_garbage_file(tmp_path: Path, content: bytes, message: str) -> None:
    folder = make_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_cifar("cifar10", tmp_path, False, verify=False)


def test_not_a_dict(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    _dump(folder / "test_batch", [1, 2, 3])
    with pytest.raises(DataError, match="not the dict"):
        load_cifar("cifar10", tmp_path, False, verify=False)


class _Payload:
    """Pickles to a call of ``func(*args)``: what a malicious file does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("where", ["top level", "inside data"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_is_refused_and_does_not_run(
    tmp_path: Path, where: str, protocol: int
) -> None:
    folder = make_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    payload = _Payload(os.system, f"touch {shlex.quote(str(marker))}")
    entry = _batch(4, 10, "labels", 0)
    obj = payload if where == "top level" else entry | {"data": payload}
    _dump(folder / "test_batch", obj, protocol)
    with pytest.raises(DataError, match=r"refused") as err:
        load_cifar("cifar10", tmp_path, False, verify=False)
    assert "system" in str(err.value) and "test_batch" in str(err.value)
    assert not marker.exists()


def test_other_globals_refused(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    _dump(folder / "test_batch", _Payload(eval, "1+1"))
    with pytest.raises(DataError, match=r"builtin\w*\.eval"):
        load_cifar("cifar10", tmp_path, False, verify=False)


def test_numpy_pickle_protocols_all_load(tmp_path: Path) -> None:
    """Subsets re-saved with any protocol (5 uses numpy's _frombuffer) still load."""
    folder = make_cifar10(tmp_path)
    entry = _batch(3, 10, "labels", 5)
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        _dump(folder / "test_batch", entry, protocol)
        x, y = load_quiet("cifar10", tmp_path, False)
        assert torch.equal(x.reshape(3, -1), torch.from_numpy(entry["data"]))
        assert y.tolist() == entry["labels"]


def test_bytes_keys_accepted(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    entry = _batch(2, 10, "labels", 3)
    _dump(folder / "test_batch", {b"data": entry["data"], b"labels": entry["labels"]}, 4)
    _, y = load_quiet("cifar10", tmp_path, False)
    assert y.tolist() == entry["labels"]


# --------------------------------------------------------------------------- #
# Download
# --------------------------------------------------------------------------- #


def _tarball(src_root: Path, out: Path, extra: tuple[str, bytes] | None = None) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        tar.add(src_root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        if extra is not None:
            info = tarfile.TarInfo(extra[0])
            info.size = len(extra[1])
            tar.addfile(info, io.BytesIO(extra[1]))
    return out


def test_download_from_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cifar10(tmp_path / "src")
    tgz = _tarball(tmp_path / "src", tmp_path / "cifar-10-python.tar.gz")
    monkeypatch.setitem(data.URLS, "cifar10", tgz.as_uri())
    monkeypatch.setitem(data.TARBALL_MD5, "cifar10", md5(tgz))
    dest = tmp_path / "dl" / "nested"
    x, y = load_quiet("cifar10", dest, True, download=True)
    x_ref, y_ref = load_quiet("cifar10", tmp_path / "src", True)
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert (dest / "cifar-10-batches-py" / "test_batch").is_file()
    assert (dest / "cifar-10-python.tar.gz").is_file()
    leftovers = sorted(p.name for p in dest.iterdir())
    assert leftovers == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    # A second call finds the folder and does not download again.
    monkeypatch.setitem(data.URLS, "cifar10", (tmp_path / "gone.tar.gz").as_uri())
    load_quiet("cifar10", dest, False, download=True)


def test_download_wrong_md5_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cifar10(tmp_path / "src")
    tgz = _tarball(tmp_path / "src", tmp_path / "cifar-10-python.tar.gz")
    monkeypatch.setitem(data.URLS, "cifar10", tgz.as_uri())
    monkeypatch.setitem(data.TARBALL_MD5, "cifar10", "0" * 32)
    dest = tmp_path / "dl"
    with pytest.raises(DataError, match="MD5"):
        load_cifar("cifar10", dest, True, download=True, verify=False)
    assert list(dest.iterdir()) == []


def test_download_unreachable_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(data.URLS, "cifar10", (tmp_path / "missing.tar.gz").as_uri())
    with pytest.raises(DataError, match="Could not download"):
        load_cifar("cifar10", tmp_path / "dl", True, download=True, verify=False)
    assert list((tmp_path / "dl").iterdir()) == []


UNSAFE_MEMBERS = ["../evil", "/tmp/clat-test-evil-abs", "cifar-10-batches-py/../../evil"]


@pytest.mark.parametrize("member", UNSAFE_MEMBERS)
def test_download_refuses_path_traversal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, member: str
) -> None:
    make_cifar10(tmp_path / "src")
    tgz = _tarball(tmp_path / "src", tmp_path / "bad.tar.gz", extra=(member, b"gotcha"))
    monkeypatch.setitem(data.URLS, "cifar10", tgz.as_uri())
    monkeypatch.setitem(data.TARBALL_MD5, "cifar10", md5(tgz))
    dest = tmp_path / "a" / "b"
    with pytest.raises(DataError, match="unsafe member"):
        load_cifar("cifar10", dest, True, download=True, verify=False)
    assert not (tmp_path / "a" / "evil").exists() and not (tmp_path / "evil").exists()
    assert not Path("/tmp/clat-test-evil-abs").exists()
    assert not (dest / "cifar-10-batches-py").exists()


def test_download_refuses_symlink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cifar10(tmp_path / "src")
    tgz = tmp_path / "link.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        info = tarfile.TarInfo("cifar-10-batches-py/passwd")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    monkeypatch.setitem(data.URLS, "cifar10", tgz.as_uri())
    monkeypatch.setitem(data.TARBALL_MD5, "cifar10", md5(tgz))
    with pytest.raises(DataError, match="unsafe member"):
        load_cifar("cifar10", tmp_path / "dl", True, download=True, verify=False)


# --------------------------------------------------------------------------- #
# The project's real CIFAR-10 subset (JPEG-recovered) and the bundled asset
# --------------------------------------------------------------------------- #

needs_shared = pytest.mark.skipif(
    not SHARED_CIFAR10.is_dir(),
    reason=f"the JPEG-recovered CIFAR-10 subset is not at {SHARED_CIFAR10}",
)


@needs_shared
def test_shared_subset_loads_without_verification() -> None:
    x, y = load_quiet("cifar10", SHARED_CIFAR10.parent, True)
    assert x.shape == (10_000, 3, 32, 32) and x.dtype == torch.uint8
    assert y.shape == (10_000,) and set(y.tolist()) == set(range(10))
    xt, yt = load_quiet("cifar10", SHARED_CIFAR10, False)
    assert xt.shape == (2_000, 3, 32, 32) and set(yt.tolist()) == set(range(10))


@needs_shared
def test_shared_subset_fails_verification() -> None:
    with pytest.raises(DataError, match="verify"):
        load_cifar("cifar10", SHARED_CIFAR10.parent, False)


def test_load_bundled() -> None:
    x_tr, y_tr, x_te, y_te = load_bundled()
    assert x_tr.shape == (3000, 3, 32, 32) and x_te.shape == (1000, 3, 32, 32)
    assert x_tr.dtype == x_te.dtype == torch.uint8
    assert y_tr.shape == (3000,) and y_te.shape == (1000,)
    assert y_tr.dtype == y_te.dtype == torch.int64
    for y in (y_tr, y_te):
        assert set(y.tolist()) == set(range(10))
        assert int(torch.bincount(y, minlength=10).min()) >= 0.08 * len(y)
    assert 0.3 < x_tr.float().mean().item() / 255 < 0.6


@needs_shared
def test_bundled_is_the_head_of_the_shared_subset() -> None:
    x_tr, y_tr, x_te, y_te = load_bundled()
    x, y = load_quiet("cifar10", SHARED_CIFAR10, True)
    assert torch.equal(x_tr, x[:3000]) and torch.equal(y_tr, y[:3000])
    xt, yt = load_quiet("cifar10", SHARED_CIFAR10, False)
    assert torch.equal(x_te, xt[:1000]) and torch.equal(y_te, yt[:1000])


# --------------------------------------------------------------------------- #
# train_val_split
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("n,val", [(10, 0), (10, 3), (100, 99), (1, 0)])
def test_train_val_split_partitions(n: int, val: int) -> None:
    tr, va = train_val_split(n, val, seed=0)
    assert tr.dtype == va.dtype == torch.int64
    assert len(va) == val and len(tr) == n - val
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(n))


def test_train_val_split_is_seeded() -> None:
    a = train_val_split(1000, 100, seed=1)
    b = train_val_split(1000, 100, seed=1)
    c = train_val_split(1000, 100, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("n,val", [(10, 10), (10, -1), (0, 0), (5, 11)])
def test_train_val_split_bad_size(n: int, val: int) -> None:
    with pytest.raises(DataError, match="Validation size"):
        train_val_split(n, val, seed=0)


# --------------------------------------------------------------------------- #
# augment
# --------------------------------------------------------------------------- #


def _reference_candidates(img: torch.Tensor, pad: int) -> list[torch.Tensor]:
    """Slow reference: every crop of the padded image and its mirror."""
    _, h, w = img.shape
    padded = F.pad(img, (pad, pad, pad, pad))
    out = []
    for oy in range(2 * pad + 1):
        for ox in range(2 * pad + 1):
            crop = padded[:, oy : oy + h, ox : ox + w]
            out += [crop, crop.flip(-1)]
    return out


def test_augment_is_crop_of_padded_or_its_flip() -> None:
    x = torch.rand(24, 3, 8, 10)
    gen = torch.Generator().manual_seed(0)
    y = augment(x, gen, pad=3)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    flipped = 0
    for i in range(len(x)):
        cands = _reference_candidates(x[i], 3)
        matches = [k for k, c in enumerate(cands) if torch.equal(c, y[i])]
        assert matches, f"sample {i} is not a crop/flip of its padded input"
        flipped += matches[0] % 2
    assert 0 < flipped < len(x)  # both flipped and plain samples occur
    assert not torch.equal(y, x)


def test_augment_identity_without_pad_and_flip() -> None:
    x = torch.rand(5, 3, 32, 32)
    assert torch.equal(augment(x, torch.Generator().manual_seed(3), pad=0, flip=False), x)
    assert torch.equal(augment(x, pad=0, flip=False), x)


def test_augment_flip_only() -> None:
    x = torch.rand(64, 1, 4, 4)
    y = augment(x, torch.Generator().manual_seed(1), pad=0)
    same = (y == x).flatten(1).all(1)
    mirrored = (y == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 0 < int(mirrored.sum()) < 64


def test_augment_deterministic_and_keeps_dtype() -> None:
    x = torch.rand(16, 3, 32, 32, dtype=torch.float64)
    a = augment(x, torch.Generator().manual_seed(7))
    b = augment(x, torch.Generator().manual_seed(7))
    c = augment(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float64
    u8 = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert augment(u8, torch.Generator().manual_seed(0)).dtype == torch.uint8


def test_augment_rejects_bad_input() -> None:
    with pytest.raises(DataError, match="batch"):
        augment(torch.rand(3, 32, 32))
    with pytest.raises(DataError, match="pad"):
        augment(torch.rand(1, 3, 32, 32), pad=-1)


# --------------------------------------------------------------------------- #
# Loader
# --------------------------------------------------------------------------- #


def _toy(n: int = 23) -> tuple[torch.Tensor, torch.Tensor]:
    # Image i is filled with the value i, so batches tell which examples they hold.
    x = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 32, 32).clone()
    return x, torch.arange(n) % 10


def _ids(x: torch.Tensor) -> list[int]:
    return (x[:, 0, 0, 0] * 255).round().long().tolist()


def test_loader_covers_every_example_once() -> None:
    x, y = _toy()
    loader = Loader(x, y, 5, shuffle=True, seed=1)
    assert len(loader) == 5 and loader.num_examples == 23
    seen: list[int] = []
    sizes = []
    for xb, yb in loader:
        assert xb.dtype == torch.float32 and yb.dtype == torch.int64
        assert float(xb.min()) >= 0.0 and float(xb.max()) <= 1.0
        ids = _ids(xb)
        assert yb.tolist() == [i % 10 for i in ids]
        seen += ids
        sizes.append(len(yb))
    assert sorted(seen) == list(range(23)) and seen != list(range(23))
    assert sizes == [5, 5, 5, 5, 3]


def test_loader_epochs_are_reproducible() -> None:
    x, y = _toy()
    loader = Loader(x, y, 4, shuffle=True, seed=3)

    def order(epoch: int) -> list[int]:
        loader.set_epoch(epoch)
        return [i for xb, _ in loader for i in _ids(xb)]

    e0, e1 = order(0), order(1)
    assert e0 == order(0) and e1 == order(1) and e0 != e1
    # A fresh loader (as after a resume) gives the same epoch.
    fresh = Loader(x, y, 4, shuffle=True, seed=3)
    fresh.set_epoch(1)
    assert [i for xb, _ in fresh for i in _ids(xb)] == e1
    # Another seed, another order.
    other = Loader(x, y, 4, shuffle=True, seed=4)
    assert [i for xb, _ in other for i in _ids(xb)] != e0


def test_loader_no_shuffle_and_drop_last() -> None:
    x, y = _toy()
    loader = Loader(x, y, 5, drop_last=True)
    assert len(loader) == 4
    batches = [_ids(xb) for xb, _ in loader]
    assert batches == [list(range(i, i + 5)) for i in range(0, 20, 5)]


def test_loader_values_are_pixels_over_255() -> None:
    x_tr, y_tr, _, _ = load_bundled()
    loader = Loader(x_tr[:10], y_tr[:10], 10)
    xb, yb = next(iter(loader))
    assert torch.equal(xb, x_tr[:10].float() / 255) and torch.equal(yb, y_tr[:10])


def test_loader_augment_reproducible_per_epoch() -> None:
    x = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    y = torch.zeros(12, dtype=torch.long)
    loader = Loader(x, y, 6, augment=True, seed=0)
    a = [xb for xb, _ in loader]
    b = [xb for xb, _ in loader]
    loader.set_epoch(1)
    c = [xb for xb, _ in loader]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=True))
    assert not torch.equal(a[0], x[:6].float() / 255)
    assert float(a[0].min()) >= 0 and float(a[0].max()) <= 1


@pytest.mark.parametrize("aug", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_loader_two_ranks_reassemble_one_rank(aug: bool, drop_last: bool) -> None:
    x = torch.randint(0, 256, (23, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(23)
    kw = dict(shuffle=True, augment=aug, drop_last=drop_last, seed=5)
    single = Loader(x, y, 8, **kw)
    ranks = [Loader(x, y, 4, rank=r, world_size=2, **kw) for r in range(2)]
    for lo in (single, *ranks):
        lo.set_epoch(2)
    assert len(ranks[0]) == len(ranks[1]) == len(single) == (2 if drop_last else 3)
    for (xs, ys), (x0, y0), (x1, y1) in zip(single, *ranks, strict=True):
        assert torch.equal(torch.cat([x0, x1]), xs)
        assert torch.equal(torch.cat([y0, y1]), ys)


def test_loader_rejects_bad_input() -> None:
    x, y = _toy(4)
    with pytest.raises(DataError, match="Batch size"):
        Loader(x, y, 0)
    with pytest.raises(DataError, match="no images"):
        Loader(x[:0], y[:0], 2)
    with pytest.raises(DataError, match="labels"):
        Loader(x, y[:3], 2)
    with pytest.raises(DataError, match="Rank"):
        Loader(x, y, 2, rank=2, world_size=2)
    with pytest.raises(DataError, match=r"\[N, C, H, W\]"):
        Loader(x[0], y, 2)
