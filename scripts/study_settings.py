"""The settings of the study of docs/results.md, and what scripts/study.py and scripts/study_report.py both read.

One ``StudySettings`` describes one study: ``StudySettings.cpu()`` the committed CPU study (the defaults),
``StudySettings.paper(name, data_root)`` a paper-scale preset on a GPU, ``StudySettings.smoke(root)`` the
whole pipeline at toy size. The study's functions take it as their first argument; nothing here changes after
import. The scripts' imports form a tree: scripts/study.py imports this module and scripts/study_report.py;
study_report imports this module, never study.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO.parent / "shared" / "data"  # the CPU study's CIFAR-10 subset

# Settings the arms below were run with, named so that each arm stays one variant whatever the defaults become:
# the criticality of clat 0.1 (denominator = the post-activation input; the paper's Eq. 6 is `upstream`), and
# TRADES crafting its attack with batch statistics (clat 0.1; the reference code uses eval mode).
INPUT_DENOMINATOR = "clat.criticality.denominator=input"
PAPER_DENOMINATOR = "clat.criticality.denominator=upstream"
TRADES_TRAIN_MODE = "trades.attack_mode=train"
# arm name -> (branch checkpoint, finetune method, extra overrides, label)
ARMS: dict[str, tuple[str, str, list[str], str]] = {
    "pgd_at_cont": ("pgd_at", "pgd_at", [], "PGD-AT continued (full model)"),
    "clat": ("pgd_at", "clat", [INPUT_DENOMINATOR], "CLAT (k=1, dynamic; clat 0.1's criticality)"),
    "clat_random": ("pgd_at", "clat", [INPUT_DENOMINATOR, "clat.selection=random"], "CLAT, random layers"),
    "clat_nondynamic": ("pgd_at", "clat", [INPUT_DENOMINATOR, "clat.dynamic=false"], "CLAT, non-dynamic"),
    "clat_ce_adv": ("pgd_at", "clat", [INPUT_DENOMINATOR, "clat.ce_on=adv"], "CLAT, CE on x+δ*"),
    "rift": ("pgd_at", "rift", [], "RiFT"),
    "lora": ("pgd_at", "lora", [], "LoRA (rank 8, every conv)"),
    "trades_cont": ("trades", "trades", [TRADES_TRAIN_MODE], "TRADES continued (full model)"),
    "trades_clat": ("trades", "clat", [INPUT_DENOMINATOR, TRADES_TRAIN_MODE], "TRADES + CLAT"),
    # The paper's own criticality (Eq. 6 along the dataflow, clat 0.2's default) and a fair random control: with automatic λ
    # the feature term has the same weight whatever layers are chosen (docs/criticality.md measures which layers help).
    "clat_paper": ("pgd_at", "clat", [PAPER_DENOMINATOR], "CLAT, the paper's Eq. 6 (k=1, dynamic)"),
    "clat_paper_auto": ("pgd_at", "clat", [PAPER_DENOMINATOR, "clat.lam_mode=auto"], "CLAT, Eq. 6, automatic λ"),
    "clat_random_auto": ("pgd_at", "clat", [PAPER_DENOMINATOR, "clat.selection=random", "clat.lam_mode=auto"], "CLAT, random layers, "
                                                                                                               "automatic λ"),
    # depth predicted the layer oracle on this network better than Eq. 6 (ρ +0.62 [+0.27, +0.81] vs -0.07; docs/criticality.md)
    "clat_deepest_auto": ("pgd_at", "clat", [PAPER_DENOMINATOR, "clat.selection=deepest", "clat.lam_mode=auto"], "CLAT, deepest layer, "
                                                                                                                 "automatic λ"),
    # Is it "automatic" or just "a larger λ"? A fixed λ equal to the mean automatic λ at Eq. 6's selections (issue 34).
    "clat_paper_lam21": ("pgd_at", "clat", [PAPER_DENOMINATOR, "clat.lam=0.21"], "CLAT, Eq. 6, fixed λ = 0.21"),
    "clat_random_lam21": ("pgd_at", "clat", [PAPER_DENOMINATOR, "clat.selection=random", "clat.lam=0.21"], "CLAT, random layers, fixed λ "
                                                                                                           "= 0.21"),
}
CLAT_ARMS = {a for a, v in ARMS.items() if v[1] == "clat"}
# λ = 0.21 above: the mean of the automatic λ that clat_paper_auto set at its 20 selections (4 seeds x 5; 0.211, range 0.12-0.35).
MATCHED_LAM = 0.21

# Per-image records (scripts/study.py keeps them beside each evaluation's JSON, with the arm's final weights in fp16): every
# arm added since issue 34 has them, and these arms of the first run were re-trained to get them (the first run kept neither).
RERUN_FOR_RECORDS = ("pgd_at_cont", "clat_paper_auto", "clat_random_auto", "clat_paper", "clat_random")
NEW_ARMS = ("clat_paper_lam21", "clat_random_lam21")
RECORD_ARMS = frozenset((*RERUN_FOR_RECORDS, *NEW_ARMS))
# Screening arms are scored with standard AutoAttack's first two stages (APGD-CE, APGD-T): in the first run's 220 AutoAttack
# chunks FAB-T and Square never fooled an image that APGD-CE and APGD-T had not (docs/results.md shows this per image).
# The arms of the primary comparisons keep standard AutoAttack.
SCREEN_ARMS = frozenset(NEW_ARMS)
SCREEN_STAGES = ("apgd-ce", "apgd-t")
# Extra seeds of some arms: random layers' spread comes from the layers drawn (4 seeds gave 20.7-24.2% AutoAttack), and its
# comparison with Eq. 6 is paired by seed.
EXTRA_SEEDS: dict[str, tuple[int, ...]] = {"clat_random_auto": (4, 5, 6, 7), "clat_paper_auto": (4, 5, 6, 7)}
# The primary comparisons, declared before their re-runs (issue 34): Holm's adjustment is over this family; every other
# comparison in docs/results.md is exploratory. "branch" is the checkpoint the arms start from (early stopping).
PRIMARY = (("clat_paper_auto", "pgd_at_cont"), ("clat_paper_auto", "branch"), ("clat_paper_auto", "clat_random_auto"),
           ("clat_paper", "clat_random"))
# The order of the work: the primary comparisons' arms first (a finished pair of arms is already a comparison), then the λ
# arms, then the extra seeds; the arms of the first run that need no re-run are done already.
PRIORITY = (("pgd_at_cont", "clat_paper_auto"), ("clat_random_auto",), ("clat_paper", "clat_random"), NEW_ARMS)

# The same study at paper scale, for a GPU: full CIFAR-10/100 (downloaded, MD5-verified), 50 epochs of PGD-AT (PGD-10),
# then every arm 50 epochs. python scripts/study.py --scale cifar10_preact_resnet18 --data-root /data --hours 24
# preset -> (dataset, model as the report names it, k)
PAPER_SCALE = {
    "cifar10_preact_resnet18": ("cifar10", "PreAct ResNet-18 (`preact_resnet18`, 11.2M parameters)", 1),
    "cifar10_wrn34_10": ("cifar10", "WideResNet-34-10 (`wrn34_10`, 46.2M parameters)", 2),
    "cifar100_preact_resnet18": ("cifar100", "PreAct ResNet-18 (`preact_resnet18`, 11.2M parameters)", 1),
    "cifar100_wrn34_10": ("cifar100", "WideResNet-34-10 (`wrn34_10`, 46.2M parameters)", 2),
}

# Variants of the CPU study (issue 34): its recipe, λ sweep and evaluation, with the arms of the primary comparisons only, on a
# second network (VGG-11 at 1/4 width: a plain chain, where the layer oracle found Eq. 6 pointing the right way) or from the
# last pretraining epoch (the paper fine-tunes after robust overfitting has set in; the CPU study starts at the best epoch).
# variant -> (pretraining config, branch rule, title, model text, plot title)
VARIANT_ARMS = RERUN_FOR_RECORDS
VARIANTS = {
    "vgg11_w16": ("vgg11_w16_pretrain.yaml", "best", "the CIFAR-10 subset with VGG-11 at 1/4 width",
                  "CIFAR VGG-11 at 1/4 width (`vgg11_w16`, 0.68M parameters, a chain of 8 convolutions and 3 linear layers), the "
                  "CPU study's PGD-AT recipe otherwise (`configs/study/vgg11_w16_pretrain.yaml`).",
                  "PGD-AT on the CIFAR-10 subset, VGG-11 at 1/4 width"),
    "resnet18_w16_last": ("pgd_at_pretrain.yaml", "last", "the CIFAR-10 subset, starting after robust overfitting",
                          "the CPU study's ResNet-18 at 1/4 width and PGD-AT recipe (`configs/study/pgd_at_pretrain.yaml`); the arms "
                          "start from its last (80th) epoch instead of its best validation epoch.",
                          "PGD-AT on the CIFAR-10 subset, ResNet-18 at 1/4 width"),
}
BRANCH_TEXT = {"best": "the pretraining epoch with the highest validation PGD-10 accuracy",
               "last": "the last pretraining epoch, after robust overfitting has set in (as in the paper)"}

# Files written before the study recorded devices (2026-11-27) all came from the CPU study on 2 cores.
LEGACY_DEVICE = "CPU (2 threads)"
DEVICE_FILE = "study_device.json"  # in a run directory: the devices that trained it (kept with it in study/partial/)

# A measurement kept beside the CPU study: (run name, config, title, what it taught). Its run is the last work item.
CPU_PILOT = (
    "pilot_9k_pretrain", REPO / "configs" / "study" / "pilot_9k_pretrain.yaml", "First attempt: all 9,000 training images, 30 epochs",
    "With all 9,000 training images this model underfits: accuracy on its own (weaker, PGD-5) training attack stays within a "
    "few points of validation PGD-10 accuracy, and validation robustness stays on its plateau after the last decay instead of "
    "falling. An underfit baseline would make the comparison "
    "meaningless, so the study trains on fewer images for longer (below).")
# What docs/results.md says about the CPU study's setting (the paper-scale presets have their own).
CPU_TEXT = {
    "title": "the CIFAR-10 subset",
    "data": "the project's CIFAR-10 subset (JPEG-recovered, not distributed with clat; 10,000 training and 2,000 test images). The study "
            "uses "
            "its first 3,000 training images: 2,000 to train on and 1,000 held out (fixed split, `data.split_seed=0`) that "
            "decide every choice below (with all 9,000 the model underfits: see the first attempt below); the 2,000 test "
            "images are used only for the final evaluation.",
    "model": "CIFAR ResNet-18 at 1/4 width (`resnet18_w16`, 0.70M parameters, 21 layers), PGD-AT (ε = 8/255, PGD-5 with step "
             "2/255 in training), SGD momentum 0.9, weight decay 5e-4, batch 128, lr 0.1 divided by 10 at 50% and 75% of 80 epochs "
             "(Rice et al.'s piecewise schedule), channels-last (`configs/study/pgd_at_pretrain.yaml`).",
    "plot_title": "PGD-AT on the CIFAR-10 subset, ResNet-18 at 1/4 width",
    "train_attack": "PGD-5",
    "k": "k = 1, the paper's default for ResNet-18; dynamic re-selection every 4 epochs, i.e. 5 selections as in the paper's "
         "50 epochs with re-selection every 10",
    "machine": "2 CPU cores",
    "command": ".venv/bin/python scripts/study.py",
    "sessions": "The whole study needs several sessions of 2 hours.",
    "gpu_workers": True,  # scripts/study_gpu.sh trains a seed's arms of this study on one GPU
}
# The smoke check's config overrides: everything at toy size.
TOY_OVERRIDES = ("model.name=tiny_cnn", "data.train_size=260", "data.val_size=40", "pretrain.epochs=3", "eval.n_examples=40",
                 "eval.steps=2", "attack.steps=1", "data.batch_size=64", "clat.criticality.batch_size=20", "clat.criticality.steps=1",
                 "rift.batch_size=20", "rift.steps=1", "rift.alphas=[0.0,1.0]", "keep_checkpoints=3", "channels_last=false")


@dataclass(frozen=True)
class StudySettings:
    """Everything that makes one study: where it keeps its pieces, its sizes and what its report says.
    The defaults are the committed CPU study; build one with ``cpu()``, ``paper()`` or ``smoke()``."""

    runs: Path = REPO / "runs" / "study"  # training runs (not committed)
    study: Path = REPO / "study"  # every finished piece (committed): results/, checkpoints/, eval/, partial/
    doc: Path = REPO / "docs" / "results.md"
    img: Path = REPO / "docs" / "img"
    img_prefix: str = "study_"  # the plots' file names in img/
    pretrain_cfg: Path = REPO / "configs" / "study" / "pgd_at_pretrain.yaml"
    seeds: tuple[int, ...] = (0, 1, 2, 3)  # 0-2 trained on the 2-core CPU; 3 on one H100 (scripts/study_gpu.sh), evaluated on both
    arms: tuple[str, ...] = tuple(ARMS)  # the arms of ARMS this study runs and reports
    f_epochs: int = 20  # epochs of every arm after the branch point
    reselect_every: int = 4  # epochs between CLAT's layer selections
    lambdas: tuple[float, ...] = (0.01, 0.1, 1.0)  # swept on the validation split (seed 0) before the CLAT arms
    n_test_pgd: int = 2000  # every test image of the subset
    n_test_aa: int = 1000
    aa_chunk: int = 250
    aa_version: str = "standard"  # AutoAttack of the test evaluation (clat.eval.autoattack.autoattack's version)
    pgd: dict = field(default_factory=lambda: {"steps": 20, "restarts": 5})
    pilot: tuple[str, Path, str, str] | None = CPU_PILOT
    data_root: Path = DATA_ROOT
    dataset: str = "cifar10"
    download: bool = False
    verify: bool = False  # the subset is JPEG-recovered: it cannot match the official MD5s
    overrides: tuple[str, ...] = ()  # config overrides of every run after data.root (the smoke check's tiny settings)
    text: dict = field(default_factory=lambda: dict(CPU_TEXT))  # what the report says about the setting
    record_arms: frozenset = RECORD_ARMS  # arms whose items keep per-image records and fp16 weights (others: the first run's results)
    screen_arms: frozenset = SCREEN_ARMS  # arms scored with AutoAttack's first stages only (SCREEN_STAGES)
    extra_seeds: dict = field(default_factory=lambda: dict(EXTRA_SEEDS))
    priority: tuple = PRIORITY
    primary: tuple = PRIMARY
    record_refs: tuple[str, ...] = ("pgd_at",)  # branch checkpoints re-evaluated with per-image records
    branch: str = "best"  # where the arms start: "best" = the pretraining epoch of best validation PGD-10, "last" = its last epoch
    variants: tuple[str, ...] = tuple(VARIANTS)  # the variants whose primary comparisons this study's report shows beside its own

    @property
    def results(self) -> Path:
        return self.study / "results"

    @property
    def ckpts(self) -> Path:
        return self.study / "checkpoints"

    @property
    def extra(self) -> list[str]:
        """Config overrides added to every run."""
        return [f"data.root={self.data_root}", *self.overrides]

    @property
    def arm_settings(self) -> dict[str, object]:
        """Config overrides of every arm."""
        return {"pretrain.epochs": 0, "finetune.epochs": self.f_epochs, "finetune.lr": 0.01, "finetune.schedule": "cosine",
                "clat.reselect_every": self.reselect_every, "keep_checkpoints": 2}

    @classmethod
    def cpu(cls) -> StudySettings:
        """The committed study: the CIFAR-10 subset in ../shared/data on 2 CPU cores (docs/results.md)."""
        return cls()

    @classmethod
    def paper(cls, name: str, data_root: Path) -> StudySettings:
        """A paper-scale preset (``configs/study/paper/<name>.yaml``): its own runs/, study/ and
        docs/results_<name>.md, F = 50 epochs per arm with re-selection every 10, PGD-20x5 on all 10,000 test images
        and AutoAttack on the first 1,000 (in chunks of 500)."""
        dataset, model_text, k = PAPER_SCALE[name]
        full = "CIFAR-10" if dataset == "cifar10" else "CIFAR-100"
        model = model_text.split(" (")[0]
        text = {
            "title": f"full {full} with {model}",
            "data": f"full {full} (50,000 training and 10,000 test images; downloaded and MD5-verified). 1,000 training images are "
                    "held out (fixed split, `data.split_seed=0`) and decide every choice below; the test images are used only for the "
                    "final evaluation.",
            "model": f"{model_text}, PGD-AT (ε = 8/255, PGD-10 with step 2/255 in training), SGD momentum 0.9, weight decay 5e-4, "
                     f"batch 128, lr 0.1 divided by 10 at 50% and 75% of 50 epochs (`configs/study/paper/{name}.yaml`).",
            "plot_title": f"PGD-AT on {full}, {model}",
            "train_attack": "PGD-10",
            "k": f"k = {k}, the paper's default for this model; dynamic re-selection every 10 epochs (5 selections, as in the paper)",
            "machine": "the GPU",
            "command": f"python scripts/study.py --scale {name} --data-root DATA",
            "sessions": "A paper-scale arm is 50 GPU epochs: give `--hours` the length of the lease; the next call continues.",
        }
        return cls(runs=REPO / "runs" / f"study_{name}", study=REPO / "study" / "paper" / name, doc=REPO / "docs" / f"results_{name}.md",
                   pretrain_cfg=REPO / "configs" / "study" / "paper" / f"{name}.yaml", img_prefix=f"study_{name}_", seeds=(0, 1, 2),
                   f_epochs=50, reselect_every=10, n_test_pgd=10_000, n_test_aa=1000, aa_chunk=500, pilot=None,
                   data_root=data_root, dataset=dataset, download=True, verify=True, text=text, variants=())

    @classmethod
    def variant(cls, name: str) -> StudySettings:
        """A variant of the CPU study (``VARIANTS``): its own runs/, study/variants/<name>/ and docs/results_<name>.md, the
        arms of the primary comparisons only, 4 seeds, every arm with per-image records and standard AutoAttack."""
        cfg, branch, title, model, plot_title = VARIANTS[name]
        text = {**CPU_TEXT, "title": title, "model": model, "plot_title": plot_title, "branch": BRANCH_TEXT[branch], "gpu_workers": False,
                "data": CPU_TEXT["data"].replace(" (with all 9,000 the model underfits: see the first attempt below)", ""),
                "k": "k = 1, as in the CPU study; dynamic re-selection every 4 epochs (5 selections)",
                "command": f".venv/bin/python scripts/study.py --variant {name}"}
        return cls(runs=REPO / "runs" / f"study_{name}", study=REPO / "study" / "variants" / name, doc=REPO / "docs" / f"results_{name}.md",
                   pretrain_cfg=REPO / "configs" / "study" / cfg, img_prefix=f"study_{name}_", arms=VARIANT_ARMS, pilot=None,
                   record_arms=frozenset(VARIANT_ARMS), screen_arms=frozenset(), extra_seeds={},
                   priority=tuple(tuple(a for a in g if a in VARIANT_ARMS) for g in PRIORITY if set(g) & set(VARIANT_ARMS)),
                   branch=branch, text=text, variants=())

    @classmethod
    def smoke(cls, root: Path, base: StudySettings | None = None) -> StudySettings:
        """``base`` (the CPU study by default) with everything at toy size in ``root``: checks the whole pipeline in
        about a minute. Its AutoAttack is APGD-CE alone: standard AutoAttack costs ~20 s per chunk even on 4 images of a
        toy model (Square's 5,000 queries, 9 targets of APGD-T and FAB-T), and tests/test_evaluate.py runs it."""
        return replace(base or cls(), runs=root / "runs", study=root / "study", doc=root / "results.md", img=root / "img", variants=(),
                       seeds=(0, 1), f_epochs=2, lambdas=(0.1, 1.0), n_test_pgd=40, n_test_aa=8, aa_chunk=4, aa_version="apgd-ce",
                       pgd={"steps": 2, "restarts": 2}, overrides=TOY_OVERRIDES, extra_seeds={"clat_random_auto": (2,)})


def read_json(p: Path):
    return json.loads(p.read_text()) if p.is_file() else None


def uses_trades(s: StudySettings) -> bool:
    """Whether any arm of ``s`` starts from the TRADES branch (else the study needs no TRADES pretraining)."""
    return any(ARMS[a][0] == "trades" for a in s.arms)


def branch_row(s: StudySettings, rows: list[dict]) -> dict:
    """The pretraining epoch the arms start from (``s.branch``)."""
    return best_row(rows) if s.branch == "best" else rows[-1]


def best_row(rows: list[dict]) -> dict:
    """The epoch of the highest validation PGD accuracy (the earlier one on ties): the branch point rule."""
    return max(rows, key=lambda r: (r["val"]["pgd_acc"], -r["epoch"]))


def plan(s: StudySettings) -> list[tuple[str, bool]]:
    """The work items of the study, in order, and whether each is done."""
    items = [(s.pilot[0], (s.results / f"{s.pilot[0]}.json").is_file())] if s.pilot else []
    refs = ("pgd_at", "trades") if uses_trades(s) else ("pgd_at",)
    items += [("pgd_at_pretrain", (s.results / "branch.json").is_file()),
              *([("trades_pretrain (to P)", (s.ckpts / "trades_branch.safetensors").is_file())] if uses_trades(s) else []),
              ("lambda sweep", (s.results / "lambda.json").is_file()),
              *((f"eval {ref} branch", reference_done(s, ref)) for ref in refs)]
    items += [(f"{a} seed {seed}", item_done(s, a, seed)) for a, seed in arm_items(s)]
    return items


def has_records(result: dict | None) -> bool:
    return bool(result and result.get("records"))


def reference_done(s: StudySettings, ref: str) -> bool:
    """A branch checkpoint's evaluation is done when written, with per-image records where ``s.record_refs`` asks for them."""
    r = read_json(s.results / f"{ref}_branch_eval.json")
    return r is not None and (ref not in s.record_refs or has_records(r))


def item_done(s: StudySettings, arm: str, seed: int) -> bool:
    """An arm item is done when its result is written, with per-image records where the arm needs them."""
    r = read_json(s.results / f"{arm}_s{seed}.json")
    return r is not None and (arm not in s.record_arms or has_records(r))


def arm_items(s: StudySettings) -> list[tuple[str, int]]:
    """Every (arm, seed) of the study in the order of the work: the arms of ``s.priority`` group by group (seed by seed
    within a group), then the other arms seed by seed, then the extra seeds."""
    items: list[tuple[str, int]] = []
    for group in s.priority:
        items += [(a, seed) for seed in s.seeds for a in group if a in s.arms]
    items += [(a, seed) for seed in s.seeds for a in s.arms if (a, seed) not in items]
    items += [(a, seed) for a, extra in s.extra_seeds.items() if a in s.arms for seed in extra if seed not in s.seeds]
    return items
