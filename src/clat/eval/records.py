"""Per-image evaluation records: which image each attack fooled, kept so that any later question can be asked of them.

An :class:`EvalRecord` holds, for a set of images (their ``indices`` in the split they come from), one boolean
per image and *outcome*: ``clean`` (classified correctly), ``pgd/run0`` ... (correct under each PGD restart),
``pgd`` (correct under every restart: the worst case), ``apgd-ce`` (APGD-CE alone), ``aa/<stage>`` (still robust
after each AutoAttack stage, cumulative: ``aa/apgd-ce``, ``aa/apgd-t``, ``aa/fab-t``, ``aa/square``) and ``aa``
(AutoAttack's final verdict, recomputed from its adversarial examples). ``meta`` says what was evaluated and how
(data, split, evaluation settings, model), so that two records are compared only on the same images under the
same attack.

Records are written as compressed ``.npz`` files of bit-packed arrays (about 250 bytes per outcome per 2,000
images) beside the JSON of the evaluation they belong to (``eval.json`` -> ``eval.records.npz``), and read without
pickle. :func:`paired_difference` compares two records image by image (accuracy difference, its 95% interval and
McNemar's exact test).

Example::

    a, b = load_record("runs/clat/eval.records.npz"), load_record("runs/pgd_at/eval.records.npz")
    d = paired_difference(a, b, "pgd")
    print(d.line())   # "PGD: 21.3% vs 19.8% on 1,000 images: +1.5 points [+0.4, +2.6], McNemar p = 0.008 (41 vs 26 discordant)"
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from clat.base.errors import ConfigError
from clat.base.files import atomic_write

FORMAT = 1  # the file layout below; a reader refuses a newer one
SUFFIX = ".records.npz"


def record_path(json_path: str | Path) -> Path:
    """Where the records of the evaluation ``json_path`` go: ``eval.json`` -> ``eval.records.npz``."""
    p = Path(json_path)
    return p.with_name(p.name.removesuffix(".json") + SUFFIX)


def _bools(v, n: int, name: str) -> np.ndarray:
    a = np.asarray(v.cpu() if hasattr(v, "cpu") else v)
    if a.shape != (n,):
        raise ConfigError(f"outcome {name!r} has shape {a.shape}, expected ({n},): one value per image")
    return a.astype(bool)


@dataclass(frozen=True)
class EvalRecord:
    """Per-image outcomes of one evaluation. ``indices``: the images' positions in their split (int64);
    ``outcomes``: name -> bool per image (True = correct, i.e. not fooled); ``meta``: JSON-able facts (data, split,
    ``protocol``, ``model``, ...)."""

    indices: np.ndarray
    outcomes: Mapping[str, np.ndarray]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        idx = np.asarray(self.indices, dtype=np.int64).reshape(-1)
        if len(np.unique(idx)) != len(idx):
            raise ConfigError("an evaluation record lists an image index twice")
        object.__setattr__(self, "indices", idx)
        object.__setattr__(self, "outcomes", {k: _bools(v, len(idx), k) for k, v in self.outcomes.items()})

    @property
    def n(self) -> int:
        return len(self.indices)

    def acc(self, outcome: str) -> float:
        return float(self[outcome].mean()) if self.n else float("nan")

    def __getitem__(self, outcome: str) -> np.ndarray:
        if outcome not in self.outcomes:
            raise ConfigError(f"the record has no outcome {outcome!r}; it has: {', '.join(self.outcomes)}")
        return self.outcomes[outcome]

    def select(self, indices: Sequence[int]) -> EvalRecord:
        """The record restricted to ``indices`` (in that order); every index must be in it."""
        pos = {int(i): j for j, i in enumerate(self.indices)}
        missing = [int(i) for i in indices if int(i) not in pos]
        if missing:
            raise ConfigError(f"{len(missing)} requested images are not in the record (e.g. index {missing[0]})")
        sel = np.array([pos[int(i)] for i in indices], dtype=np.int64)
        return EvalRecord(self.indices[sel], {k: v[sel] for k, v in self.outcomes.items()}, dict(self.meta))

    @staticmethod
    def concat(parts: Sequence[EvalRecord], meta: dict | None = None) -> EvalRecord:
        """Records of disjoint image sets (e.g. the chunks of one evaluation) as one; they must have the same outcomes."""
        if not parts:
            raise ConfigError("nothing to concatenate: no records given")
        names = list(parts[0].outcomes)
        for p in parts[1:]:
            if list(p.outcomes) != names:
                raise ConfigError(f"records with different outcomes cannot be joined ({names} vs {list(p.outcomes)})")
        return EvalRecord(np.concatenate([p.indices for p in parts]),
                          {k: np.concatenate([p.outcomes[k] for p in parts]) for k in names},
                          dict(parts[0].meta) if meta is None else meta)

    def summary(self) -> dict[str, float]:
        """Accuracy per outcome (what the evaluation's JSON reports), for a cross-check."""
        return {k: self.acc(k) for k in self.outcomes}


def save_record(path: str | Path, rec: EvalRecord) -> Path:
    """Write ``rec`` to ``path`` (``*.records.npz``) atomically: bit-packed outcomes, compressed."""


    idx = rec.indices
    contiguous = rec.n > 0 and bool((np.diff(idx) == 1).all())
    arrays: dict[str, np.ndarray] = {"format": np.array([FORMAT], dtype=np.int64), "n": np.array([rec.n], dtype=np.int64),
                                     "meta": np.frombuffer(json.dumps(rec.meta, sort_keys=True).encode(), dtype=np.uint8)}
    if contiguous:  # the common case (the first n images of a split): two numbers instead of n
        arrays["index_range"] = np.array([idx[0], idx[-1] + 1], dtype=np.int64)
    else:
        arrays["indices"] = idx.astype(np.int32 if rec.n == 0 or idx.max() < 2**31 else np.int64)
    names = list(rec.outcomes)
    arrays["names"] = np.frombuffer(json.dumps(names).encode(), dtype=np.uint8)
    # one array for all outcomes (a row each, 8 images a byte): every array of an npz costs ~100 bytes of headers
    arrays["bits"] = np.packbits(np.stack([rec.outcomes[k] for k in names]) if names else np.zeros((0, rec.n), bool), axis=1)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    path = Path(path)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return path


def load_record(path: str | Path) -> EvalRecord:
    """Read a record written by :func:`save_record` (no pickle); a one-line error for anything else."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            fmt = int(z["format"][0])
            if fmt > FORMAT:
                raise ConfigError(f"{path} was written by a newer clat (record format {fmt}); upgrade clat to read it")
            n = int(z["n"][0])
            idx = np.arange(*z["index_range"]) if "index_range" in z.files else z["indices"].astype(np.int64)
            names = json.loads(bytes(z["names"]).decode())
            bits = np.unpackbits(z["bits"], axis=1, count=n).astype(bool)
            outcomes = {k: bits[j] for j, k in enumerate(names)}
            meta = json.loads(bytes(z["meta"]).decode())
    except ConfigError:
        raise
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such record file (records are written beside an evaluation's JSON as *{SUFFIX})") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not a clat evaluation record ({type(e).__name__}: {str(e)[:100]}); re-run the evaluation") from None
    if len(idx) != n:
        raise ConfigError(f"{path} is damaged: {len(idx)} indices for {n} images; re-run the evaluation")
    return EvalRecord(idx, outcomes, meta)


# -- comparing two records -------------------------------------------------------------------------
def _mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar test: of the ``b + c`` discordant images, is the split b:c unlikely under 50:50?"""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class PairedDifference:
    """``a − b`` on the same images: accuracies, their difference with a 95% interval (normal approximation on the
    per-image differences, which are -1, 0 or +1), and McNemar's exact p-value on the discordant images."""

    outcome: str
    n: int
    acc_a: float
    acc_b: float
    diff: float
    ci: tuple[float, float]
    p: float
    only_a: int  # images correct in a but fooled in b
    only_b: int

    def line(self) -> str:
        return (f"{self.outcome}: {100 * self.acc_a:.1f}% vs {100 * self.acc_b:.1f}% on {self.n:,} images: "
                f"{100 * self.diff:+.1f} points [{100 * self.ci[0]:+.1f}, {100 * self.ci[1]:+.1f}], McNemar p = {self.p:.3g} "
                f"({self.only_a} vs {self.only_b} discordant)")


def _settings_of(rec: EvalRecord) -> dict:
    """What must agree for two records to be compared: the data, the split and the attack settings."""
    m = rec.meta
    proto = dict(m.get("protocol") or {})
    proto.pop("batch_size", None)
    return {"data": m.get("data"), "split": m.get("split"), "protocol": proto}


def paired_difference(a: EvalRecord, b: EvalRecord, outcome: str = "pgd", outcome_b: str | None = None, *,
                      check_settings: bool = True) -> PairedDifference:
    """Compare ``a``'s ``outcome`` with ``b``'s (``outcome_b``, the same by default) on the images both hold.

    Refuses records of different data, split or evaluation settings unless ``check_settings=False``: a difference
    between two attacks is not a difference between two models."""
    if check_settings and _settings_of(a) != _settings_of(b):
        raise ConfigError("the two records were made with different data, split or evaluation settings; compare records of the "
                          "same evaluation (or pass check_settings=False to compare them anyway)")
    common = np.intersect1d(a.indices, b.indices)
    if len(common) == 0:
        raise ConfigError("the two records share no image; evaluate both models on the same images")
    ra, rb = a.select(common)[outcome], b.select(common)[outcome_b or outcome]
    d = ra.astype(np.int8) - rb.astype(np.int8)
    n = len(d)
    mean = float(d.mean())
    se = float(d.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    only_a, only_b = int((d > 0).sum()), int((d < 0).sum())
    return PairedDifference(outcome if outcome_b in (None, outcome) else f"{outcome} vs {outcome_b}", n, float(ra.mean()),
                            float(rb.mean()), mean, (mean - 1.96 * se, mean + 1.96 * se), _mcnemar_p(only_a, only_b), only_a, only_b)


__all__ = ["EvalRecord", "PairedDifference", "load_record", "paired_difference", "record_path", "save_record"]
