"""Find a model's layers (:func:`find_layers`), what each one is (:class:`Layer`, :class:`Tap`, :class:`Source`), and
pick them by name or index.

A *layer* (SPEC "Layers and features") is a ``Conv``/``Linear`` module merged
with the ``BatchNorm`` that directly consumes its output (with
``merge_norms=True`` also a GroupNorm, LayerNorm or InstanceNorm), in forward
execution order, addressed by the conv's qualified name (``layer3.0.conv2``).
Discovery runs one real forward pass, so it works on any ``nn.Module``
(torchvision, timm, hand-written), whatever its ``forward`` does.

Provenance comes from the computation, never from memory addresses: during
discovery every torch operation is traced (a ``TorchFunctionMode``,
:mod:`clat.layers.tracing`), every tensor it touches is kept alive, and each
tensor version is mapped to the operation that produced it and the operations'
data inputs. From that graph each layer gets

- its *feature taps*: the operations that produce its feature (after its BN,
  or the conv output before it), addressed by the operation's ordinal in the
  forward pass, so a later pass can capture the very same tensor;
- its *source* (what Eq. 6's denominator measures): walk back from the tensor
  the layer reads through operations with a single data input (activations,
  pooling, dropout, reshapes, norms that are not part of a layer) until reaching
  the feature of another layer (the source is that layer: Eq. 6 exactly on a
  chain, both at the same feature point), an operation that joins several
  data tensors (a residual sum or a concatenation: the source is that tensor,
  before any activation that follows), or the model input (``C = W``).

A module that runs more than once in one forward pass (weight sharing) is one
layer; its feature is the output of its *first* call, and ``Layer.calls`` says
how many calls were seen so that tools can warn about it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping, Sequence

import torch
from torch import nn

from clat.base.errors import ConfigError
from clat.layers.tracing import ModuleCalls, TensorKey, Tracer

PARAMETRIC_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BN_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# merged into the layer they follow only with ``merge_norms=True`` (no running statistics to freeze)
OTHER_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)

FeaturePoint = Literal["post_bn", "pre_bn"]
SourceKind = Literal["model_input", "layer", "tensor", "untraced"]


@dataclass(frozen=True)
class Tap:
    """One tensor of the forward pass: output ``slot`` of the ``op``-th torch operation
    (outputs first, then in-place-modified inputs). A later pass over a batch of any
    size captures the same tensor by counting operations (:class:`TapCapture`)."""

    op: int
    slot: int
    func: str  # the operation's name, checked when the tensor is captured again
    shape: tuple[int, ...]  # one sample's shape
    inplace_after: bool  # modified in place later in the pass: captured as a copy
    where: str = ""  # readable: the operation and the module it ran in

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Source:
    """What feeds a layer, measured at a feature point: where Eq. 6's ``W_{i-1}`` is taken."""

    kind: SourceKind  # model_input: C = W; layer: the feature of layer ``layer``; tensor: ``tap``; untraced: unknown
    layer: int | None = None
    tap: Tap | None = None

    def describe(self, layers: Sequence["Layer"] | None = None) -> str:
        if self.kind == "model_input":
            return "model input (C = W)"
        if self.kind == "layer":
            return f"layer {self.layer}" + (f" ({layers[self.layer].name})" if layers is not None else "")
        if self.kind == "tensor" and self.tap is not None:
            return self.tap.where
        return "untraced"


@dataclass(frozen=True)
class Layer:
    """One parametric unit of a model (see module docstring)."""

    index: int
    name: str  # qualified name of the conv / linear module
    bn_name: str | None  # qualified name of the norm (BatchNorm by default) merged into it, if any
    kind: str  # "Conv2d", "Linear", ...
    out_shape: tuple[int, ...]  # feature shape of one sample
    in_shape: tuple[int, ...]  # shape of one sample of the tensor the layer reads
    num_params: int  # conv/linear + merged norm parameters
    calls: int = 1  # how many times the module ran in one forward pass
    reads_model_input: bool = False  # no other layer's output is upstream of its input
    inplace_after: bool = False  # its (post-BN) feature tensor is modified in place later in forward
    taps: tuple[Tap | None, Tap | None] = (None, None)  # feature at (post_bn, pre_bn)
    sources: tuple[Source, Source] = (Source("untraced"), Source("untraced"))  # what feeds it, at (post_bn, pre_bn)

    @property
    def module_names(self) -> tuple[str, ...]:
        return (self.name,) if self.bn_name is None else (self.name, self.bn_name)

    def output_module(self, point: FeaturePoint = "post_bn") -> str:
        return self.bn_name if (point == "post_bn" and self.bn_name is not None) else self.name

    def tap(self, point: FeaturePoint = "post_bn") -> Tap | None:
        return self.taps[_POINTS.index(point)]

    def source(self, point: FeaturePoint = "post_bn") -> Source:
        return self.sources[_POINTS.index(point)]

    @property
    def numel(self) -> int:
        """N_i of Eq. 5: number of feature elements for one sample."""
        n = 1
        for d in self.out_shape:
            n *= d
        return n


_POINTS: tuple[FeaturePoint, FeaturePoint] = ("post_bn", "pre_bn")
def _readable(func: str) -> str:
    """``TensorBase.__iadd__`` -> ``sum (__iadd__)``, ``cat`` -> ``concatenation (cat)``."""
    short = func.rsplit(".", 1)[-1]
    if short.strip("_").rstrip("_") in ("add", "iadd", "radd", "add_"):
        return f"sum ({short})"
    if short in ("cat", "concat", "concatenate", "stack"):
        return f"concatenation ({short})"
    return short


def find_layers(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    *,
    input_shape: Sequence[int] = (3, 32, 32),
    merge_norms: bool = False,
) -> list[Layer]:
    """Discover the layers of ``model`` by running one forward pass (eval mode, no grad).

    ``example_input`` is a batch the model accepts; by default two zero images of
    ``input_shape`` on the model's device. The model's train/eval mode is restored.
    ``merge_norms=True`` also merges a GroupNorm/LayerNorm/InstanceNorm that directly
    consumes a layer's output into that layer (BatchNorm always is).

    Steps: trace one forward pass (:class:`clat.layers.tracing.Tracer` records the operations,
    :class:`clat.layers.tracing.ModuleCalls` the layer modules and their norms), then turn the
    record into :class:`Layer` s (``_Graph``: taps, sources, provenance).
    """
    if example_input is None:
        example_input = _zero_batch(model, input_shape)
    names = {m: n for n, m in model.named_modules()}
    norm_types = BN_TYPES + (OTHER_NORM_TYPES if merge_norms else ())
    tracer = Tracer(example_input)
    calls = ModuleCalls(tracer, names)
    _run_traced(model, example_input, tracer, calls.attach(model, PARAMETRIC_TYPES, norm_types))
    if not calls.order:
        raise ConfigError("the model has no Conv or Linear layer that runs in its forward pass; CLAT needs at least one")
    return _Graph(tracer, calls.order, calls.info, calls.norm_of, calls.outputs, names).layers()


def _zero_batch(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    """Two zero images of ``input_shape`` on the model's device (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    return torch.zeros(2, *input_shape, device=device)


def _run_traced(model: nn.Module, example_input: torch.Tensor, tracer: Tracer, handles: list) -> None:
    """One forward pass of ``model`` on ``example_input`` (eval mode, no grad) under ``tracer``; the hooks of
    ``handles`` are removed and the model's train/eval mode is restored afterwards, however it ends."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tracer:
            model._call_impl(example_input)  # eager even when the model was compiled in place
    except Exception as e:  # the model itself failed on the example input
        raise ConfigError(
            f"could not run the model on an example input of shape {tuple(example_input.shape)} to find its layers "
            f"({type(e).__name__}: {e}); "
            "pass example_input= with a batch the model accepts"
        ) from e
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


class _Graph:
    """Turns discovery's trace into :class:`Layer` records (taps, sources, provenance)."""

    def __init__(self, tracer: Tracer, order, info, norm_of, outputs, names) -> None:
        self.t, self.order, self.info, self.norm_of, self.names = tracer, order, info, norm_of, names
        self.index = {mod: i for i, mod in enumerate(order)}
        # the feature of each layer at each point, and every tensor a layer's modules output
        self.feature: dict[FeaturePoint, dict[TensorKey, int]] = {"post_bn": {}, "pre_bn": {}}
        self.stops: dict[FeaturePoint, dict[TensorKey, int]] = {"post_bn": {}, "pre_bn": {}}
        for mod, i in self.index.items():
            d = info[mod]
            norm = norm_of.get(mod)
            self.feature["pre_bn"][d["out_key"]] = i
            self.feature["post_bn"][d["norm_out_key"] if norm is not None else d["out_key"]] = i
            for k in outputs.get(mod, []):
                self.stops["post_bn"][k] = self.stops["pre_bn"][k] = i
            if norm is not None:
                for k in outputs.get(norm, []):
                    self.stops["post_bn"][k] = i

    def tap(self, k: TensorKey) -> Tap | None:
        p = self.t.producer.get(k)
        if p is None:
            return None
        op, slot, tensor = p
        func, where = self.t.funcs[op], self.t.where[op]
        return Tap(op, slot, func, tuple(tensor.shape[1:]), tensor._version != k[1], f"{_readable(func)} in {where or 'the model'}")

    def source(self, start: TensorKey, point: FeaturePoint) -> Source:
        k = start
        while True:
            if k == self.t.root:
                return Source("model_input")
            if k in self.stops[point]:
                j = self.stops[point][k]
                if self.feature[point].get(k) == j:
                    return Source("layer", j, self.tap(k))
                tap = self.tap(k)
                return Source("tensor", None, tap) if tap is not None else Source("untraced")
            p = self.t.producer.get(k)
            if p is None:
                return Source("untraced")
            data = self.t.data_inputs[p[0]]
            if len(data) != 1:  # joins several data tensors: a residual sum, a concatenation
                return Source("tensor", None, self.tap(k))
            k = data[0]

    def reads_model_input(self, start: TensorKey) -> bool:
        """No layer's output is upstream of ``start`` (walking every data input)."""
        seen, todo = set(), [start]
        while todo:
            k = todo.pop()
            if k in seen:
                continue
            seen.add(k)
            if k in self.stops["post_bn"] or k in self.stops["pre_bn"]:
                return False
            p = self.t.producer.get(k)
            if p is not None:
                todo.extend(self.t.data_inputs[p[0]])
        return True

    def layers(self) -> list[Layer]:
        out = []
        for i, mod in enumerate(self.order):
            d = self.info[mod]
            norm = self.norm_of.get(mod)
            post_key = d["norm_out_key"] if norm is not None else d["out_key"]
            post_tap, pre_tap = self.tap(post_key), self.tap(d["out_key"])
            n_params = sum(p.numel() for p in mod.parameters(recurse=False))
            if norm is not None:
                n_params += sum(p.numel() for p in norm.parameters(recurse=False))
            out.append(Layer(
                index=i,
                name=self.names[mod],
                bn_name=self.names[norm] if norm is not None else None,
                kind=type(mod).__name__,
                out_shape=d["out_shape"],
                in_shape=d["in_shape"],
                num_params=n_params,
                calls=d["calls"],
                reads_model_input=self.reads_model_input(d["in_key"]),
                inplace_after=post_tap.inplace_after if post_tap is not None else False,
                taps=(post_tap, pre_tap),
                sources=(self.source(d["in_key"], "post_bn"), self.source(d["in_key"], "pre_bn")),
            ))
        return out


def unassigned_parameters(model: nn.Module, layers: Iterable[Layer]) -> dict[str, int]:
    """Modules whose parameters belong to no layer (never selectable: frozen under CLAT and
    RiFT) -> their parameter count: norms that read no layer's output directly (a residual sum
    in a pre-activation net), GroupNorm/LayerNorm (unless ``merge_norms``), attention
    projections held as raw parameters, embeddings, ..."""
    assigned = set(layer_parameter_names(model, layers))
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        if name not in assigned:
            mod = name.rsplit(".", 1)[0] if "." in name else ""
            out[mod or "(model)"] = out.get(mod or "(model)", 0) + p.numel()
    return out


def warn_unassigned(model: nn.Module, layers: Iterable[Layer], method: str) -> None:
    """One warning listing the parameters ``method`` can never train (they stay frozen)."""
    rest = unassigned_parameters(model, layers)
    if not rest:
        return
    n, total = sum(rest.values()), sum(p.numel() for p in model.parameters())
    kinds = {type(model.get_submodule(m)).__name__ for m in rest if m != "(model)"}
    hint = ("; model.merge_norms=true makes a norm that follows a conv/linear part of its layer"
            if kinds & {c.__name__ for c in OTHER_NORM_TYPES} else "")
    warnings.warn(
        f"method {method}: {n:,} of {total:,} parameters belong to no selectable layer and stay frozen: "
        f"{', '.join(f'{m} ({c:,})' for m, c in rest.items())}{hint}",
        stacklevel=2,
    )


def resolve_layers(layers: Sequence[Layer], selectors: Iterable[str | int]) -> list[Layer]:
    """Layers picked by qualified name (``"layer3.0.conv2"``) or by index (``11``, an int).

    A string is always a name, looked up exactly: in a top-level ``nn.Sequential`` the
    layers are *named* ``"0"``, ``"3"``, ... and ``"3"`` is the layer of that name, not
    the fourth layer. Only an ``int`` is an index."""
    by_name = {layer.name: layer for layer in layers}
    out = []
    for s in selectors:
        if isinstance(s, bool) or not isinstance(s, (int, str)):
            raise ConfigError(f"a layer is selected by its name (a string) or its index (an integer), got {s!r}")
        if isinstance(s, int):
            if not 0 <= s < len(layers):
                raise ConfigError(f"layer index {s} is out of range: the model has {len(layers)} layers (0..{len(layers) - 1})")
            out.append(layers[s])
        elif s in by_name:
            out.append(by_name[s])
        else:
            hint = ""
            if s.lstrip("-").isdigit():
                hint = f"; to select the layer with index {s}, write it as an integer (clat.layers=[{s}], not '{s}')"
            close = [n for n in by_name if s.split(".")[-1] in n][:5]
            raise ConfigError(f"no layer named {s!r}{hint}; layer names look like {close or list(by_name)[:5]} (see `clat criticality` "
                              f"for the full list)")
    return out


def layer_parameter_names(model: nn.Module, layers: Iterable[Layer]) -> list[str]:
    """Qualified parameter names belonging to ``layers`` (conv/linear and merged BN)."""
    modules = dict(model.named_modules())
    names = []
    for layer in layers:
        for mod_name in layer.module_names:
            for p_name, _ in modules[mod_name].named_parameters(recurse=False):
                names.append(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def layers_table(layers: Sequence[Layer]) -> list[Mapping[str, object]]:
    return [
        {"index": l.index, "name": l.name, "bn": l.bn_name, "kind": l.kind, "out_shape": list(l.out_shape), "params": l.num_params}
        for l in layers
    ]
