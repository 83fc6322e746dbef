"""Every ablation config of configs/paper/ differs from the CLAT config it is compared with in the ablated setting only.

A random-layer config with automatic λ compared against Table 1's CLAT config with a fixed λ measures two changes at
once (issue 34: λ's rule alone moved AutoAttack by 1.5 points in the study), so the pairs are checked on the resolved
configs (defaults filled in), λ's rule included.
"""

from __future__ import annotations

import re

import pytest

from clat.config.schema import to_dict
from clat.config.load import load_config
from clat.config.help import CONFIGS

ABL = CONFIGS / "paper" / "ablations"


# (ablation file name, the config it is compared with, the keys it may change), first match wins.
PAIRS = [
    (r"(?P<m>\w+)_random_layers_lam_auto", "paper/ablations/{m}_lam_auto", {"clat.selection"}),
    (r"(?P<m>\w+)_lam_auto", "paper/cifar10/{m}_pgd_at_clat", {"clat.lam_mode"}),
    (r"(?P<m>\w+)_random_layers_cifar100", "paper/cifar100/{m}_pgd_at_clat", {"clat.selection"}),
    (r"(?P<m>\w+)_random_layers", "paper/cifar10/{m}_pgd_at_clat", {"clat.selection"}),
    (r"(?P<m>\w+)_nondynamic", "paper/cifar10/{m}_pgd_at_clat", {"clat.dynamic"}),
    (r"(?P<m>\w+)_k\d+", "paper/cifar10/{m}_pgd_at_clat", {"clat.k"}),
    (r"(?P<m>\w+)_split_\d+_\d+", "paper/cifar10/{m}_pgd_at_clat", {"pretrain.epochs", "finetune.epochs"}),
    (r"(?P<m>\w+)_ce_adv", "paper/cifar10/{m}_pgd_at_clat", {"clat.ce_on"}),
    (r"(?P<m>\w+)_sqrt_n", "paper/cifar10/{m}_pgd_at_clat", {"clat.criticality.scaling"}),
    (r"(?P<m>\w+)_(previous|input)_denominator", "paper/cifar10/{m}_pgd_at_clat", {"clat.criticality.denominator"}),
]


def reference(name: str) -> tuple[str, set[str]]:
    """The config an ablation is compared with, and the keys it may change (dotted)."""
    for pattern, ref, keys in PAIRS:
        if m := re.fullmatch(pattern, name):
            return ref.format(m=m.group("m")), keys
    raise AssertionError(f"ablation {name}: no CLAT config to compare it with; add its pair to tests/test_paper_configs.py")


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


ABLATIONS = sorted(p.stem for p in ABL.glob("*.yaml"))


@pytest.mark.parametrize("name", ABLATIONS)
def test_ablation_differs_from_its_clat_config_only_in_the_ablated_setting(name):
    ref_name, allowed = reference(name)
    mine = flat(to_dict(load_config(f"paper/ablations/{name}")))
    ref = flat(to_dict(load_config(ref_name)))
    assert mine.keys() == ref.keys()
    differ = {k for k in mine if mine[k] != ref[k]}
    assert differ <= allowed, f"{name} vs {ref_name}: also differs in {sorted(differ - allowed)}"
    if name not in ("resnet18_k1", "wrn34_10_split_50_50"):  # the points of the k sweep and of the split that are Table 1's row
        assert differ, f"{name} equals {ref_name}: the ablated setting is not set"


def test_every_ablation_has_its_pair_and_lam_rule_is_table_1_s():
    assert len(ABLATIONS) >= 27
    rules = {flat(to_dict(load_config(f"paper/ablations/{n}")))["clat.lam_mode"] for n in ABLATIONS if "lam_auto" not in n}
    assert rules == {flat(to_dict(load_config("paper/cifar10/resnet18_pgd_at_clat")))["clat.lam_mode"]} == {"fixed"}
