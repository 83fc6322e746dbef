"""Generate configs/paper/: one YAML per row of the paper's Table 1 and per ablation.

The YAML files are committed; this script documents how they were made and
keeps them consistent. Run from the repository root: python scripts/make_configs.py
"""

from __future__ import annotations

from pathlib import Path

import yaml

OUT = Path("configs/paper")
# Table 1: model -> list of (baseline X, fine-tuning method or None); paper defaults k per model live in the registry.
TABLE1 = {
    "densenet121": [("pgd_at", None), ("pgd_at", "clat")],
    "resnet50": [("pgd_at", None), ("pgd_at", "clat")],
    "wrn34_10": [("pgd_at", None), ("pgd_at", "lora"), ("pgd_at", "rift"), ("pgd_at", "clat"), ("trades", None), ("trades", "rift"), ("trades", "clat")],
    "vgg19": [("pgd_at", None), ("pgd_at", "clat")],
    "resnet18": [("pgd_at", "lora")] + [(b, f) for b in ("pgd_at", "trades", "mart", "awp", "score") for f in (None, "rift", "clat")],
    "preact_resnet18": [("fast_at", None), ("fast_at", "clat"), ("fast_at", "clat_fast")],
}
# WRN-70-16 rows of Table 1 start from public robust checkpoints (Peng et al. 2023, Bai et al. 2024): CLAT only.
PUBLIC = {"wrn70_16": ["peng2023", "bai2024"]}
COMMON = {
    "attack": {"eps": "8/255", "alpha": "2/255", "steps": 10},
    "eval": {"n_examples": 1000, "steps": 10, "every": 5},
}


def stage(method: str, epochs: int) -> dict:
    return {"method": method, "epochs": epochs, "lr": 0.1}


def write(path: Path, header: str, cfg: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(cfg, sort_keys=False))


def main() -> None:
    n = 0
    for dataset in ("cifar10", "cifar100"):
        data = {"dataset": dataset, "root": "data", "download": True, "batch_size": 128, "val_size": 1000}
        for model, rows in TABLE1.items():
            for base, ft in rows:
                name = f"{model}_{base}" + (f"_{ft}" if ft else "")
                cfg: dict = {"model": {"name": model}, "data": data, **COMMON}
                if ft is None:  # the baseline alone, with the same 100-epoch budget as "X + fine-tuning"
                    cfg["pretrain"], cfg["finetune"] = stage(base, 100), {"epochs": 0}
                    title = f"{base} (100 epochs)"
                else:
                    method = "clat" if ft.startswith("clat") else ft
                    cfg["pretrain"], cfg["finetune"] = stage(base, 50), stage(method, 50)
                    if ft == "clat_fast":
                        cfg["clat"] = {"inner": "fast"}
                    title = f"{base} 50 epochs + {ft} 50 epochs"
                header = f"# Paper Table 1: {model}, {title}, {dataset}. GPU-sized.\n# clat train configs/paper/{dataset}/{name}.yaml data.root=/path/to/data\n"
                write(OUT / dataset / f"{name}.yaml", header, cfg)
                n += 1
        for model, sources in PUBLIC.items():
            for src in sources:
                cfg = {"model": {"name": model}, "data": data, **COMMON, "init": f"checkpoints/{model}_{src}_{dataset}.safetensors",
                       "pretrain": {"epochs": 0}, "finetune": stage("clat", 50)}
                header = (f"# Paper Table 1: {model}, {src} + CLAT, {dataset}: CLAT from a public robust checkpoint.\n"
                          f"# Convert the published weights to a state dict first and set init= to its path.\n")
                write(OUT / dataset / f"{model}_{src}_clat.yaml", header, cfg)
                n += 1
    # Ablations (Tables 4, 5, 10; Figures 2, 3), on RN18 / CIFAR-10 unless the paper used another model.
    data = {"dataset": "cifar10", "root": "data", "download": True, "batch_size": 128, "val_size": 1000}
    abl = OUT / "ablations"
    for model in ("densenet121", "resnet50", "resnet18"):
        base = {"model": {"name": model}, "data": data, **COMMON, "pretrain": stage("pgd_at", 50), "finetune": stage("clat", 50)}
        write(abl / f"{model}_nondynamic.yaml", "# Table 4: CLAT with the layers selected once (non-dynamic).\n", {**base, "clat": {"dynamic": False}})
        write(abl / f"{model}_random_layers.yaml", "# Tables 5/10: random layers, re-drawn at each re-selection (auto λ keeps the comparison fair).\n",
              {**base, "clat": {"selection": "random", "lam_mode": "auto"}})
        n += 2
    rn18 = {"model": {"name": "resnet18"}, "data": data, **COMMON, "pretrain": stage("pgd_at", 50), "finetune": stage("clat", 50)}
    write(abl / "resnet18_ce_adv.yaml", "# CLAT with the CE term on x + δ* instead of x (SPEC option).\n", {**rn18, "clat": {"ce_on": "adv"}})
    write(abl / "resnet18_sqrt_n.yaml", "# Criticality normalised by 1/sqrt(N_i) instead of 1/N_i (SPEC ablation).\n",
          {**rn18, "clat": {"criticality": {"scaling": "sqrt_n"}}})
    write(abl / "resnet18_previous_denominator.yaml", "# Criticality with the paper's formula read literally: C_i = W_i / W_(i-1) in execution order.\n",
          {**rn18, "clat": {"criticality": {"denominator": "previous"}}})
    n += 3
    data100 = {**data, "dataset": "cifar100"}
    for model in ("densenet121", "resnet50", "resnet18"):
        cfg = {"model": {"name": model}, "data": data100, **COMMON, "pretrain": stage("pgd_at", 50), "finetune": stage("clat", 50),
               "clat": {"selection": "random", "lam_mode": "auto"}}
        write(abl / f"{model}_random_layers_cifar100.yaml", "# Table 10: random layers on CIFAR-100.\n", cfg)
        n += 1
    for k in (1, 2, 3, 4, 5, 8):
        base = {"model": {"name": "resnet18"}, "data": data, **COMMON, "pretrain": stage("pgd_at", 50), "finetune": stage("clat", 50)}
        write(abl / f"resnet18_k{k}.yaml", f"# Figure 3: number of critical layers k = {k} (auto λ).\n", {**base, "clat": {"k": k, "lam_mode": "auto"}})
        n += 1
    for pre in (0, 10, 30, 50, 70, 90):
        cfg = {"model": {"name": "wrn34_10"}, "data": data, **COMMON, "pretrain": stage("pgd_at", pre), "finetune": stage("clat", 100 - pre)}
        write(abl / f"wrn34_10_split_{pre}_{100 - pre}.yaml", f"# Figure 2: {pre} PGD-AT epochs + {100 - pre} CLAT epochs (100-epoch budget).\n", cfg)
        n += 1
    print(f"wrote {n} configs under {OUT}")


if __name__ == "__main__":
    main()
