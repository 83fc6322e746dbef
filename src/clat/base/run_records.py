"""The records a run writes, typed: one line of ``metrics.jsonl`` (:class:`MetricsRow`), a layer selection inside it
(:class:`SelectionEvent`) and ``summary.json`` (:class:`Summary`), each with the schema version it was written in.

Epochs are numbered one way in every record, in checkpoint folders and in reports: the run's epochs from 1. The row of
epoch 2 has the checkpoint folder numbered 2 (the weights after it, :class:`clat.runs.folder.Checkpoints`), and a
selection made at the start of epoch 2 (the epoch it trains) says ``epoch: 2``; ``epoch_in_stage`` counts the same epoch
within its stage, also from 1.

Schema 1 is every record written before the field existed (clat up to issue 35): it has no ``schema`` key, a selection's
``epoch`` and ``stage_epoch`` count from 0, and checkpoint folders were numbered from 0 (1 after epoch 2).
``from_dict`` reads both and returns today's numbering, so old run folders load, resume and report as new ones.

The records live on the lowest floor because the methods (CLAT, RiFT) make the selection events that training logs and
every later floor reads; they depend on nothing but the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from clat.base.errors import ClatError

SCHEMA = 2  # the version of the records this clat writes (metrics rows, selections, summary.json, checkpoints' meta.json)
LEGACY = 1  # the records written before the ``schema`` field


def schema_of(record: Mapping[str, Any], what: str = "record") -> int:
    """The schema a record was written in (1 when it has none); a newer one than this clat's is a one-line error."""
    s = record.get("schema", LEGACY)
    if not isinstance(s, int) or isinstance(s, bool) or s < LEGACY:
        raise ClatError(f"this {what} has an invalid schema version {s!r}; the file is damaged")
    if s > SCHEMA:
        raise ClatError(f"this {what} was written by a newer clat (record schema {s}; this clat reads up to {SCHEMA}): upgrade clat "
                        "(pip install -U clat-at) to read it")
    return s


def _split(cls: type, data: Mapping[str, Any], skip: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """``data``'s values of ``cls``'s typed fields, and the rest (its ``extra``)."""
    names = {f.name for f in fields(cls)} - {"extra", "schema"}
    known = {k: v for k, v in data.items() if k in names}
    return known, {k: v for k, v in data.items() if k not in names and k not in skip and k != "schema"}


def _without_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


@dataclass
class SelectionEvent:
    """A method's choice of the layers it trains (CLAT's (re)selection, RiFT's layer), made at the start of ``epoch``."""

    epoch: int  # the run's epoch that trains on this selection (from 1): the ``epoch`` of the metrics row that holds it
    epoch_in_stage: int  # the same epoch within its stage (from 1): CLAT re-selects at 1, 1 + reselect_every, ...
    selected: list[str]
    selected_index: list[int]
    trainable_params: int
    criticality: list[float] | None = None  # per layer, every layer of the model (RiFT: its module robust criticality)
    weakness: list[float] | None = None
    denominator: str | None = None
    lam: float | None = None  # CLAT's λ from this selection on
    extra: dict[str, Any] = field(default_factory=dict)  # a method's own fields (RiFT's "measure")
    schema: int = SCHEMA

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SelectionEvent":
        """A selection as ``metrics.jsonl`` or ``summary.json`` holds it, in any schema (schema 1: epochs from 0)."""
        if schema_of(data, "selection") == LEGACY:
            known, extra = _split(cls, data, skip=("stage_epoch",))
            known["epoch"] = int(data["epoch"]) + 1
            known["epoch_in_stage"] = int(data.get("stage_epoch", data["epoch"])) + 1
        else:
            known, extra = _split(cls, data)
        return cls(**known, extra=extra)

    @classmethod
    def of(cls, value: "SelectionEvent | Mapping[str, Any]") -> "SelectionEvent":
        return value if isinstance(value, cls) else cls.from_dict(value)

    def to_dict(self) -> dict[str, Any]:
        out = {"schema": self.schema, "epoch": self.epoch, "epoch_in_stage": self.epoch_in_stage, "selected": list(self.selected),
               "selected_index": list(self.selected_index), "criticality": self.criticality, "weakness": self.weakness,
               "denominator": self.denominator, "trainable_params": self.trainable_params, "lam": self.lam}
        return {**_without_none(out), **self.extra}


@dataclass
class MetricsRow:
    """One epoch of a run: a line of ``metrics.jsonl`` (the callbacks' ``on_epoch_end`` gets it as :meth:`to_dict`)."""

    epoch: int  # the run's epoch, from 1 (its checkpoint: checkpoints/epoch_NNNN with the same number)
    stage: str
    method: str
    lr: float
    train: dict[str, float]  # the epoch's mean training metrics (the method's loss, ...)
    trainable_params: int
    total_params: int
    optimizer_state_bytes: int | None = None
    epoch_time_s: float | None = None  # the training steps alone
    selection: SelectionEvent | None = None  # the layers chosen at the start of this epoch, if any
    extra: dict[str, Any] = field(default_factory=dict)  # the method's other events and log fields ("selected", RiFT's "interpolation")
    val: dict[str, Any] | None = None  # held-out clean and PGD accuracy, when evaluated
    time_s: float | None = None  # the whole epoch, validation included
    world_size: int | None = None  # data-parallel ranks (absent: 1)
    resume_overrides: dict[str, Any] | None = None  # what --resume changed, on the first epoch after it
    schema: int = SCHEMA

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MetricsRow":
        """A row as ``metrics.jsonl`` holds it, in any schema."""
        schema_of(data, "metrics row")
        known, extra = _split(cls, data)
        if known.get("selection") is not None:
            known["selection"] = SelectionEvent.from_dict(known["selection"])
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        head = {"schema": self.schema, "epoch": self.epoch, "stage": self.stage, "method": self.method, "lr": self.lr, "train": self.train,
                "trainable_params": self.trainable_params, "total_params": self.total_params,
                "optimizer_state_bytes": self.optimizer_state_bytes, "epoch_time_s": self.epoch_time_s,
                "selection": self.selection.to_dict() if self.selection is not None else None}
        tail = {"val": self.val, "time_s": self.time_s, "world_size": self.world_size, "resume_overrides": self.resume_overrides}
        return {**_without_none(head), **self.extra, **_without_none(tail)}


@dataclass
class Summary:
    """``summary.json``: what a finished run was and its final numbers (``clat.train`` returns it as :meth:`to_dict`)."""

    run_dir: str
    epochs: int
    data: str | None = None
    model: dict[str, Any] = field(default_factory=dict)  # the run's model metadata (name, classes, normalisation)
    final_val: dict[str, Any] | None = None
    selection_history: list[SelectionEvent] = field(default_factory=list)
    trainable_params_last: int | None = None
    total_params: int | None = None
    layers: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # times, versions, precision, the best epoch and early stop
    finished: bool = True
    schema: int = SCHEMA

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Summary":
        """``summary.json`` in any schema."""
        schema_of(data, "summary.json")
        known, extra = _split(cls, data)
        known["selection_history"] = [SelectionEvent.from_dict(h) for h in known.get("selection_history") or []]
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": self.schema, "run_dir": self.run_dir, "data": self.data, "model": self.model, "epochs": self.epochs,
                "final_val": self.final_val, "selection_history": [h.to_dict() for h in self.selection_history],
                "trainable_params_last": self.trainable_params_last, "total_params": self.total_params, "layers": self.layers,
                **self.extra, "finished": self.finished}


def checkpoint_epoch(meta: Mapping[str, Any]) -> int:
    """The run's epoch (from 1) a checkpoint's ``meta.json`` (or ``state.pt``) was written after; schema 1 counted from 0."""
    return int(meta["epoch"]) + (1 if schema_of(meta, "checkpoint") == LEGACY else 0)


def current_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics row as a dict in today's schema, whatever it was written in (its selection's epochs counted from 1);
    every other key as it is, so a row of any clat stays readable."""
    schema_of(row, "metrics row")
    out = {"schema": SCHEMA, **{k: v for k, v in row.items() if k != "schema"}}
    if isinstance(out.get("selection"), Mapping):
        out["selection"] = SelectionEvent.from_dict(out["selection"]).to_dict()
    return out


def current_summary(summary: Mapping[str, Any]) -> dict[str, Any]:
    """``summary.json`` as a dict in today's schema (its selection history's epochs counted from 1), every other key as it is."""
    schema_of(summary, "summary.json")
    out = {"schema": SCHEMA, **{k: v for k, v in summary.items() if k != "schema"}}
    if isinstance(out.get("selection_history"), list):
        out["selection_history"] = [SelectionEvent.from_dict(h).to_dict() for h in out["selection_history"]]
    return out
