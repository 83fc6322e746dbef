"""Find a model's layers, capture their features, stop a forward pass early, freeze.

A *layer* (SPEC "Layers and features") is a ``Conv``/``Linear`` module merged
with the ``BatchNorm`` that directly consumes its output, in forward execution
order, addressed by the conv's qualified name (``layer3.0.conv2``). Discovery
runs one real forward pass with hooks, so it works on any ``nn.Module``
(torchvision, timm, hand-written), whatever its ``forward`` does.

A module that runs more than once in one forward pass (weight sharing) is one
layer; its feature is the output of its *first* call, and ``Layer.calls`` says
how many calls were seen so that tools can warn about it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, Mapping, Sequence

import torch
from torch import nn

from clat.errors import ConfigError

PARAMETRIC_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BN_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

FeaturePoint = Literal["post_bn", "pre_bn"]


@dataclass(frozen=True)
class Layer:
    """One parametric unit of a model (see module docstring)."""

    index: int
    name: str  # qualified name of the conv / linear module
    bn_name: str | None  # qualified name of the BatchNorm merged into it, if any
    kind: str  # "Conv2d", "Linear", ...
    out_shape: tuple[int, ...]  # feature shape of one sample
    in_shape: tuple[int, ...]  # shape of one sample of the tensor the layer reads
    num_params: int  # conv/linear + merged BN parameters
    calls: int = 1  # how many times the module ran in one forward pass
    reads_model_input: bool = False  # its input is computed by no earlier layer
    inplace_after: bool = False  # its output tensor is modified in place later in forward

    @property
    def module_names(self) -> tuple[str, ...]:
        return (self.name,) if self.bn_name is None else (self.name, self.bn_name)

    def output_module(self, point: FeaturePoint = "post_bn") -> str:
        return self.bn_name if (point == "post_bn" and self.bn_name is not None) else self.name

    @property
    def numel(self) -> int:
        """N_i of Eq. 5: number of feature elements for one sample."""
        n = 1
        for d in self.out_shape:
            n *= d
        return n


def find_layers(model: nn.Module, example_input: torch.Tensor | None = None, *, input_shape: Sequence[int] = (3, 32, 32)) -> list[Layer]:
    """Discover the layers of ``model`` by running one forward pass (eval mode, no grad).

    ``example_input`` is a batch the model accepts; by default two zero images of
    ``input_shape`` on the model's device. The model's train/eval mode is restored.
    """
    if example_input is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        example_input = torch.zeros(2, *input_shape, device=device)
    names = {m: n for n, m in model.named_modules()}
    order: list[nn.Module] = []
    info: dict[nn.Module, dict] = {}
    last_out: dict[int, nn.Module] = {}  # id(output tensor) -> conv that produced it
    bn_of: dict[nn.Module, nn.Module] = {}
    first_input_ptr: list[int] = []
    produced: set[int] = set()  # ids of tensors produced by layers (conservative "downstream" check)
    handles = []

    def pre_hook(mod: nn.Module, args: tuple) -> None:
        if mod in info:
            info[mod]["calls"] += 1
            return
        x = args[0]
        if not first_input_ptr:
            first_input_ptr.append(x.data_ptr())
        order.append(mod)
        info[mod] = {
            "calls": 1,
            "in_shape": tuple(x.shape[1:]),
            "reads_model_input": len(order) == 1 or x.data_ptr() == first_input_ptr[0],
        }

    def post_hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        d = info[mod]
        if "out_shape" not in d:
            d["out_shape"] = tuple(out.shape[1:])
            d["out_ref"] = (out, out._version)
        last_out[id(out)] = mod
        produced.add(id(out))

    def bn_pre_hook(mod: nn.Module, args: tuple) -> None:
        src = last_out.get(id(args[0]))
        if src is not None and src not in bn_of and mod not in bn_of.values():
            bn_of[src] = mod

    def bn_post_hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        for conv, bn in bn_of.items():
            if bn is mod and "bn_out_ref" not in info[conv]:
                info[conv]["bn_out_ref"] = (out, out._version)

    for m in model.modules():
        if isinstance(m, PARAMETRIC_TYPES):
            handles.append(m.register_forward_pre_hook(pre_hook))
            handles.append(m.register_forward_hook(post_hook))
        elif isinstance(m, BN_TYPES):
            handles.append(m.register_forward_pre_hook(bn_pre_hook))
            handles.append(m.register_forward_hook(bn_post_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    except Exception as e:  # the model itself failed on the example input
        raise ConfigError(
            f"could not run the model on an example input of shape {tuple(example_input.shape)} to find its layers ({type(e).__name__}: {e}); "
            "pass example_input= with a batch the model accepts"
        ) from e
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    layers = []
    for i, mod in enumerate(order):
        d = info[mod]
        bn = bn_of.get(mod)
        ref, version = d["bn_out_ref"] if bn is not None else d["out_ref"]
        n_params = sum(p.numel() for p in mod.parameters(recurse=False))
        if bn is not None:
            n_params += sum(p.numel() for p in bn.parameters(recurse=False))
        layers.append(
            Layer(
                index=i,
                name=names[mod],
                bn_name=names[bn] if bn is not None else None,
                kind=type(mod).__name__,
                out_shape=d["out_shape"],
                in_shape=d["in_shape"],
                num_params=n_params,
                calls=d["calls"],
                reads_model_input=d["reads_model_input"],
                inplace_after=ref._version != version,
            )
        )
    if not layers:
        raise ConfigError("the model has no Conv or Linear layer that runs in its forward pass; CLAT needs at least one")
    return layers


def resolve_layers(layers: Sequence[Layer], selectors: Iterable[str | int]) -> list[Layer]:
    """Layers picked by qualified name or index (``"layer3.0.conv2"``, ``11``, ``"11"``)."""
    by_name = {layer.name: layer for layer in layers}
    out = []
    for s in selectors:
        if isinstance(s, int) or (isinstance(s, str) and s.lstrip("-").isdigit()):
            i = int(s)
            if not 0 <= i < len(layers):
                raise ConfigError(f"layer index {i} is out of range: the model has {len(layers)} layers (0..{len(layers) - 1})")
            out.append(layers[i])
        elif s in by_name:
            out.append(by_name[s])
        else:
            close = [n for n in by_name if s.split(".")[-1] in n][:5]
            raise ConfigError(f"no layer named {s!r}; layer names look like {close or list(by_name)[:5]} (see `clat criticality` for the full list)")
    return out


class _StopForward(Exception):
    """Raised from a hook once every requested feature is captured."""


@dataclass
class Features:
    """Outputs of one (possibly truncated) forward pass."""

    outputs: dict[str, torch.Tensor]  # layer name -> feature
    inputs: dict[str, torch.Tensor]  # layer name -> the tensor the layer read (if requested)
    logits: torch.Tensor | None  # None when the pass stopped early


class FeatureExtractor:
    """Capture the features of some layers in one forward pass.

    ``stop_early=True`` ends the pass right after the deepest requested feature:
    the rest of the network is not run (the feature attack of CLAT needs only the
    network up to its deepest critical layer). The captured values are exactly
    those of a full pass. Hooks live only for the duration of a call, so the
    model is left untouched between calls.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[Layer],
        *,
        point: FeaturePoint = "post_bn",
        capture_inputs: bool = False,
    ) -> None:
        if not layers:
            raise ConfigError("FeatureExtractor needs at least one layer")
        self.model = model
        self.layers = list(layers)
        self.point = point
        self.capture_inputs = capture_inputs
        modules = dict(model.named_modules())
        self._out_mod = {layer.name: modules[layer.output_module(point)] for layer in self.layers}
        self._in_mod = {layer.name: modules[layer.name] for layer in self.layers}
        self._clone = {layer.name: layer.inplace_after for layer in self.layers}

    def __call__(self, x: torch.Tensor, *, stop_early: bool = True) -> Features:
        outputs: dict[str, torch.Tensor] = {}
        inputs: dict[str, torch.Tensor] = {}
        wanted = len(self.layers)
        handles = []

        def done() -> bool:
            return len(outputs) == wanted and (not self.capture_inputs or len(inputs) == wanted)

        def make_out_hook(name: str):
            def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
                if name not in outputs:
                    outputs[name] = out.clone() if self._clone[name] else out
                    if stop_early and done():
                        raise _StopForward

            return hook

        def make_in_hook(name: str):
            def hook(mod: nn.Module, args: tuple) -> None:
                if name not in inputs:
                    inputs[name] = args[0]

            return hook

        try:
            for layer in self.layers:
                handles.append(self._out_mod[layer.name].register_forward_hook(make_out_hook(layer.name)))
                if self.capture_inputs:
                    handles.append(self._in_mod[layer.name].register_forward_pre_hook(make_in_hook(layer.name)))
            try:
                # eager even when the model was compiled in place (``model.compile()``): the
                # hooks above, and the early stop they raise, need the module-by-module forward
                logits = self.model._call_impl(x)
            except _StopForward:
                logits = None
        finally:
            for h in handles:
                h.remove()
        if not done():
            missing = [layer.name for layer in self.layers if layer.name not in outputs]
            raise ConfigError(f"layers {missing} did not run in the forward pass; were they found on this model?")
        return Features(outputs, inputs, logits)


def layer_parameter_names(model: nn.Module, layers: Iterable[Layer]) -> list[str]:
    """Qualified parameter names belonging to ``layers`` (conv/linear and merged BN)."""
    modules = dict(model.named_modules())
    names = []
    for layer in layers:
        for mod_name in layer.module_names:
            for p_name, _ in modules[mod_name].named_parameters(recurse=False):
                names.append(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def freeze_all_but(model: nn.Module, layers: Iterable[Layer]) -> int:
    """``requires_grad`` on the parameters of ``layers`` only; returns the trainable count."""
    keep = set(layer_parameter_names(model, layers))
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
        if name in keep:
            n += p.numel()
    return n


def unfreeze_all(model: nn.Module) -> int:
    for p in model.parameters():
        p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters())


def set_bn_train_mode(model: nn.Module, trainable_bns: Iterable[str] | None) -> None:
    """``model.train()``, then BatchNorm modules outside ``trainable_bns`` back to eval so
    their running statistics stay fixed. ``None`` means every BatchNorm trains."""
    model.train()
    if trainable_bns is None:
        return
    keep = set(trainable_bns)
    for name, m in model.named_modules():
        if isinstance(m, BN_TYPES) and name not in keep:
            m.eval()


@contextmanager
def frozen_bn_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers in train mode keep normalizing with batch statistics, but
    their running statistics are not updated (attack iterations must not pollute them)."""
    saved = []
    for m in model.modules():
        if isinstance(m, BN_TYPES) and m.training and m.track_running_stats:
            saved.append((m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None))
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for m, momentum, nbt in saved:
            m.momentum = momentum
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def layers_table(layers: Sequence[Layer]) -> list[Mapping[str, object]]:
    return [
        {"index": l.index, "name": l.name, "bn": l.bn_name, "kind": l.kind, "out_shape": list(l.out_shape), "params": l.num_params}
        for l in layers
    ]
