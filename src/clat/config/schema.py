"""Configuration: dataclasses, YAML files and ``a.b=value`` overrides.

A run's config is a tree of small dataclasses (nanoGPT's idea, typed). YAML
files hold only what differs from the defaults; ``key=value`` overrides on the
command line go last. Unknown keys, wrong types and out-of-range values fail
with a message that names the key and the fix. Numbers may be written as
fractions (``eps: 8/255``). The resolved config is saved with every run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from clat.attacks.threat import DEFAULT_THREAT, ThreatModel


@dataclass
class ModelConfig:
    name: str = "resnet18"  # see `clat models`
    num_classes: int | None = None  # None: from the data set
    normalize: bool = True  # normalization inside the model (inputs are [0, 1] pixels)
    # also merge a GroupNorm/LayerNorm/InstanceNorm that directly follows a conv/linear into its layer (BatchNorm always is)
    merge_norms: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of a model factory (model.kwargs.depth=10; YAML: a mapping)


@dataclass
class DataConfig:
    dataset: str = "cifar10"  # cifar10, cifar100, bundled (a subset in the package), folder, npz (docs/data.md): `clat list datasets`
    # folder holding cifar-10-batches-py / cifar-100-python; folder: root/{train,test}/<class>/<image>; npz: the .npz file
    root: str = "data"
    download: bool = False  # fetch the official archive (checksum verified) if missing
    verify: bool = True  # check official MD5s; false accepts a local copy that differs, with a warning
    train_size: int | None = None  # use only the first N training images (CPU studies)
    test_size: int | None = None  # use only the first N test images
    val_size: int = 1000  # held out from the training images for per-epoch metrics and choices
    split_seed: int | None = 0  # seed of the train/validation split, independent of `seed` (null: follow `seed`, as clat 0.1 did; warns)
    batch_size: int = 128  # training images per step (per rank under torchrun)
    eval_batch_size: int = 256  # images per batch of the held-out evaluation (results do not depend on it)
    augment: Literal["crop_flip", "flip", "none"] | bool = True  # crop_flip (=true): 4-pixel-padded random crop + flip; flip; none (=false)
    image_size: int | None = None  # folder: resize each image (shorter side to N, central NxN crop); null: as stored (one size)
    stream: bool = False  # folder: read the images from disk every epoch (worker processes) instead of holding them in memory
    workers: int = 2  # processes reading streamed images (data.stream, torch Datasets); 0: the training process (results do not change)
    fingerprint: str | None = None  # written by clat.train(data=...): sizes, shapes, classes and a sha256 of the data; checked on resume


@dataclass
class AttackConfig:
    """The training threat model (and the default evaluation one)."""

    eps: float = DEFAULT_THREAT.eps  # radius of the perturbation ball (8/255 under linf; images are in [0, 1])
    alpha: float = DEFAULT_THREAT.alpha  # step size
    steps: int = DEFAULT_THREAT.steps  # PGD steps of the training attack
    norm: Literal["linf", "l2"] = DEFAULT_THREAT.norm  # the norm of the threat model

    def threat(self) -> ThreatModel:
        return ThreatModel(self.norm, self.eps, self.alpha, self.steps)


@dataclass
class StageConfig:
    """One training phase: a method for some epochs with its own optimizer and schedule."""

    method: str = "pgd_at"  # see `clat methods`
    epochs: int = 0  # 0: the stage is skipped
    lr: float = 0.1  # learning rate at the start of the stage (after the warmup)
    momentum: float = 0.9  # SGD momentum (optimizer=sgd)
    weight_decay: float = 5e-4  # weight decay of the trained parameters: L2 for sgd, decoupled for adamw (where 0.05 is usual)
    nesterov: bool = False  # Nesterov momentum (optimizer=sgd)
    # per-step cosine decay over the stage; piecewise: x0.1 at 50% and 75% (Rice et al. 2020)
    schedule: Literal["cosine", "constant", "piecewise"] = "cosine"
    optimizer: Literal["sgd", "adamw"] = "sgd"  # sgd (momentum, nesterov) or adamw (betas, eps); torch.optim's
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW's running-average coefficients (optimizer=adamw)
    eps: float = 1e-8  # AdamW's denominator term (optimizer=adamw)
    warmup_epochs: int = 0  # linear warmup over the stage's first N epochs, per step from lr/(steps+1) to lr; `schedule` runs over the rest
    ema_decay: float | None = None  # EMA of weights and buffers, per step (e.g. 0.999): evaluated, kept as best/last; null: off
    label_smoothing: float = 0.0  # of the training loss's cross-entropy terms (attacks use plain labels)
    grad_clip: float | None = None  # clip the gradient's total L2 norm to this before each step; null: off


@dataclass
class EvalConfig:
    """Per-epoch metrics on the held-out split."""

    n_examples: int = 1000  # held-out images evaluated each epoch (<= val_size)
    steps: int = 10  # PGD steps of the per-epoch robust accuracy (the threat model is `attack`)
    restarts: int = 1  # PGD restarts (an example counts as robust only if it survives all)
    every: int = 1  # evaluate every N epochs (and always at the last)


@dataclass
class EarlyStopConfig:
    """Stop the run when the held-out PGD accuracy (``eval``) stops improving; off by default (docs/logging.md)."""

    patience: int | None = None  # evaluations without an improvement before the run stops; null: never stop early
    min_delta: float = 0.0  # an improvement must exceed this (an accuracy, 0.005 = half a point)


@dataclass
class LogConfig:
    """Where the per-epoch metrics go besides metrics.jsonl (docs/logging.md)."""

    console: bool = True  # one line per epoch on the `clat` logger (to stderr where the program configured no logging)
    csv: bool = True  # metrics.csv in the run folder, rewritten from metrics.jsonl after each epoch
    tensorboard: bool = False  # scalars in RUN/tensorboard (pip install "clat-at[tensorboard]")
    wandb: bool = False  # a Weights & Biases run under RUN/wandb (pip install "clat-at[wandb]"; WANDB_MODE=offline for no network)
    wandb_project: str = "clat"  # W&B project
    wandb_entity: str | None = None  # W&B team or user; null: your default entity
    loggers: list[str] = field(default_factory=list)  # more loggers, after those above: `clat list loggers` or package.module:factory


# Each method's own section of the config (``clat:``, ``trades:``, ...), registered by the method's file
# (:func:`clat.methods.registry.register_method`): name -> dataclass. A section reads and writes like a field.
# The built-in methods register theirs when clat.methods is imported, which `import clat` (and so any
# `import clat.<module>`) does first: a config never lacks them.
_SECTIONS: dict[str, type] = {}


def register_section(name: str, cls: type) -> None:
    """``cls`` (a dataclass, with an optional ``check(self, cfg)`` raising ConfigError) becomes ``cfg.<name>``."""
    if name in {f.name for f in dataclasses.fields(Config)}:
        raise ValueError(f"config section {name!r} would hide the config key of the same name")
    if _SECTIONS.get(name, cls) is not cls:
        raise ValueError(f"config section {name!r} is registered already (by {_SECTIONS[name].__module__})")
    _SECTIONS[name] = cls


@dataclass(eq=False)
class Config:
    """A run: the fields below, and one section per registered method (``cfg.clat``, ``cfg.trades``, ...)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    pretrain: StageConfig = field(default_factory=lambda: StageConfig(method="pgd_at", epochs=50))
    finetune: StageConfig = field(default_factory=lambda: StageConfig(method="clat", epochs=50))
    eval: EvalConfig = field(default_factory=EvalConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    log: LogConfig = field(default_factory=LogConfig)
    init: str | None = None  # checkpoint to start from (ours, a state_dict file)
    init_reset_head: bool = False  # init's classifier (last nn.Linear with num_classes outputs) starts fresh: another number of classes
    seed: int = 0  # initialization, shuffling, augmentation and attack starts
    device: str = "auto"  # auto: cuda if available, else cpu (under torchrun: cuda:LOCAL_RANK)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast for every forward pass (attacks included); fp16 adds a GradScaler
    # NHWC model and inputs; auto: on a CPU (measured faster) and on a GPU with bf16/fp16, else off
    channels_last: bool | Literal["auto"] = "auto"
    # bit-identical GPU runs and resumes (deterministic cuDNN/cuBLAS kernels; speed cost not measured); CPU runs are anyway
    deterministic: bool = False
    # torch.compile the model (opt-in; true = mode default; reduce-overhead: CUDA graphs on a GPU; CLAT's early-stopping feature passes run
    # partly eager)
    compile: bool | Literal["default", "reduce-overhead", "max-autotune"] = False
    fused_optimizer: bool | Literal["auto"] = "auto"  # the optimizer step as one fused kernel; auto: on a GPU, not on a CPU
    sync_bn: bool = False  # SyncBatchNorm across ranks (GPU data-parallel runs only)
    keep_checkpoints: int = 2  # epoch checkpoints kept in the run folder
    progress: bool = True  # progress bars

    def __post_init__(self) -> None:
        self.__dict__["sections"] = {name: cls() for name, cls in _SECTIONS.items()}

    def add_new_sections(self) -> None:
        """Give this config the sections registered since it was made (a user's method, imported by its name)."""
        for name, cls in _SECTIONS.items():
            if name not in self.sections:
                self.sections[name] = cls()

    def __getattr__(self, name: str) -> Any:  # only when normal lookup fails: a method's section
        if (sections := self.__dict__.get("sections")) is not None and name in sections:
            return sections[name]
        raise AttributeError(f"config has no key {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            sections[name] = value
        else:
            object.__setattr__(self, name, value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and to_dict(self) == to_dict(other)


def to_dict(cfg: Any) -> dict:
    """The config tree as plain data; a run config's method sections sit beside its fields, before ``eval``."""
    d = dataclasses.asdict(cfg)
    if not isinstance(cfg, Config):
        return d
    keys = list(d)
    at = keys.index("eval")
    sections = {name: dataclasses.asdict(section) for name, section in cfg.sections.items()}
    return {**{k: d[k] for k in keys[:at]}, **sections, **{k: d[k] for k in keys[at:]}}
