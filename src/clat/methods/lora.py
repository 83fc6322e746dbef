"""LoRA adapters on the convolution layers (ConvLoRA; Hu et al. 2022, Aleem et al. 2024), via ``peft``.

The parameter-efficient peer of the paper's Table 1 ("PGD-AT + LoRA"): every
conv layer found by :func:`clat.layers.discovery.find_layers` (``lora.targets=all_conv``,
or the layers listed in ``lora.layers``) gets a rank-``r`` adapter
(``peft.inject_adapter_in_model``, in place); only the adapters train, with the
PGD-AT objective; BatchNorm statistics stay fixed. At the end of the stage the
adapters are merged into the conv weights and removed, so the checkpoint is a
plain model again (same keys as before, loadable the same way).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from torch import nn

from clat.attacks.threat import ThreatModel
from clat.base.errors import ConfigError
from clat.layers.discovery import Layer, resolve_layers
from clat.methods.base import EpochContext
from clat.methods.pgd_at import PGDAT
from clat.methods.registry import register_method


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError('the lora method needs the peft library: pip install "clat-at[lora]" (or pip install peft)') from None
    return peft


def merge_adapters(model: nn.Module) -> int:
    """Merge every LoRA adapter into its base layer and put the base layer back; returns how many."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    n = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
            n += 1
    return n


@dataclass
class LoraConfig:
    rank: int = 8  # rank of each adapter
    alpha: float = 16.0  # peft's lora_alpha: the adapter's output is scaled by alpha / rank
    layers: list[int | str] = field(default_factory=list)  # layers to adapt (names, or indices given as integers); empty: every conv layer

    def check(self, need) -> None:
        need(self.rank >= 1 and self.alpha > 0, f"lora.rank must be >= 1 and lora.alpha > 0, got {self.rank}, {self.alpha}")


@register_method("lora", label="LoRA", section=LoraConfig, needs_layers=True)
class LoRA(PGDAT):
    @classmethod
    def from_config(cls, ctx) -> "LoRA":
        return cls(ctx.cfg.attack.threat(), ctx.cfg.lora, ctx.layers)


    def __init__(self, attack: ThreatModel, cfg: LoraConfig, layers: list[Layer]) -> None:
        super().__init__(attack)
        self.cfg = cfg
        targets = resolve_layers(layers, cfg.layers) if cfg.layers else [l for l in layers if l.kind.startswith("Conv")]
        if not targets:
            raise ConfigError("lora: no conv layer to adapt; list layers in lora.layers")
        self.targets = targets

    def setup(self, model: nn.Module) -> None:
        peft = _peft()
        # one anchored pattern: a list would make peft match by suffix (``conv1`` would also adapt every ``*.conv1``)
        pattern = "|".join(re.escape(l.name) for l in self.targets)
        config = peft.LoraConfig(r=self.cfg.rank, lora_alpha=self.cfg.alpha, lora_dropout=0.0, target_modules=f"^(?:{pattern})$")
        peft.inject_adapter_in_model(config, model)
        model.to(next(model.parameters()).device)

    def on_epoch_start(self, model: nn.Module, ctx: EpochContext) -> dict:
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        return {}

    def trainable_bns(self) -> list[str] | None:
        return []

    def plain_model(self, model: nn.Module) -> nn.Module:
        from peft.tuners.tuners_utils import BaseTunerLayer

        if not any(isinstance(m, BaseTunerLayer) for m in model.modules()):  # merged already (the stage's end)
            return model
        plain = copy.deepcopy(model)  # the training model keeps its adapters
        merge_adapters(plain)
        return plain

    def on_stage_end(self, model: nn.Module, validate) -> dict:
        n = merge_adapters(model)
        for p in model.parameters():
            p.requires_grad_(True)
        return {"lora_merged": n}
