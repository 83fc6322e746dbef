"""The record of one forward pass that layer discovery reads: every torch operation, and every call of a layer's modules.

- :class:`Tracer` (a ``TorchFunctionMode``) counts every torch operation in the order it runs and records its data
  inputs (tensors computed from the model input), what it produced and the module it ran in. Every tensor it sees is
  kept alive until discovery ends, so no ``id`` is reused: a tensor version is named by :func:`tensor_key`.
- :class:`ModuleCalls` (forward hooks) records the conv/linear modules in the order they first run, what each read
  and wrote, and the norm that directly consumes each one's output.

:func:`clat.layers.discovery.find_layers` runs both over one forward pass and builds the layers from what they
recorded; :class:`clat.layers.capture.TapCapture` counts operations the same way (:func:`tensor_key`,
:func:`tensors_in`, :func:`func_name`) to capture a traced tensor again.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["TensorKey", "tensor_key", "func_name", "tensors_in", "Tracer", "ModuleCalls"]

TensorKey = tuple[int, int]  # (id(tensor), tensor._version): one version of one tensor


def tensor_key(t: torch.Tensor) -> TensorKey:
    return (id(t), t._version)


def func_name(func) -> str:
    name = getattr(func, "__name__", None) or type(func).__name__
    owner = getattr(func, "__objclass__", None) or getattr(func, "__self__", None)
    return f"{getattr(owner, '__name__', '')}.{name}".lstrip(".") if isinstance(owner, type) else str(name)


def tensors_in(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class Tracer(TorchFunctionMode):
    """Discovery's record of the forward pass: every torch operation (counted in the order
    it runs), its data inputs (tensors computed from the model input) and what it produced.
    Every tensor seen is kept alive until discovery ends, so no id is reused."""

    def __init__(self, root: torch.Tensor) -> None:
        super().__init__()
        self.count = 0
        self.paused = 0
        self.keep: list[torch.Tensor] = [root]
        self.root = tensor_key(root)
        self.producer: dict[TensorKey, tuple[int, int, torch.Tensor]] = {}  # key -> (op, slot, tensor)
        self.data_inputs: dict[int, list[TensorKey]] = {}  # op -> distinct data-input keys
        self.funcs: dict[int, str] = {}
        self.where: dict[int, str] = {}
        self.modules: list[str] = []  # names of the modules running now (innermost last)

    def is_data(self, k: TensorKey) -> bool:
        return k == self.root or k in self.producer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        ins = tensors_in((args, kwargs))
        before = [(tensor_key(t), t) for t in ins]
        out = func(*args, **kwargs)
        n = self.count
        self.count += 1
        data = list(dict.fromkeys(k for k, _ in before if self.is_data(k)))
        if not data:
            return out
        outs = tensors_in(out)
        slots = outs + [t for (k, t) in before if tensor_key(t) != k]  # outputs, then inputs modified in place
        self.keep.extend(ins)
        self.keep.extend(outs)
        self.data_inputs[n] = data
        self.funcs[n] = func_name(func)
        self.where[n] = self.modules[-1] if self.modules else ""
        for s, t in enumerate(slots):
            self.producer.setdefault(tensor_key(t), (n, s, t))
        return out

    @contextmanager
    def pause(self) -> Iterator[None]:
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


class ModuleCalls:
    """Discovery's record of the module calls (forward hooks, run with the :class:`Tracer` paused): the layer modules
    (conv/linear) in the order they first ran, what each read and wrote, and the norm merged into each one (the first
    norm module that reads its output). The tracer also learns which module each operation ran in."""

    def __init__(self, tracer: Tracer, names: dict[nn.Module, str]) -> None:
        self.tracer, self.names = tracer, names
        self.order: list[nn.Module] = []
        self.info: dict[nn.Module, dict] = {}  # calls, in_shape, in_key, out_shape, out_key, norm_out_key
        self.conv_out: dict[TensorKey, nn.Module] = {}  # output (any call) of a conv/linear -> the module
        self.norm_of: dict[nn.Module, nn.Module] = {}  # conv -> the norm merged into it
        self.outputs: dict[nn.Module, list[TensorKey]] = {}  # every output of every layer module (conv or merged norm)

    def attach(self, model: nn.Module, layer_types: tuple[type[nn.Module], ...],
               norm_types: tuple[type[nn.Module], ...]) -> list:
        """Register the hooks on every module of ``model``; returns their handles (to remove them)."""
        handles = []
        for m in model.modules():
            handles.append(m.register_forward_pre_hook(self.enter))
            if isinstance(m, layer_types):
                handles.append(m.register_forward_pre_hook(self.pre_hook))
                handles.append(m.register_forward_hook(self.post_hook))
            elif isinstance(m, norm_types):
                handles.append(m.register_forward_pre_hook(self.norm_pre_hook))
                handles.append(m.register_forward_hook(self.norm_post_hook))
            handles.append(m.register_forward_hook(self.leave))
        return handles

    def pre_hook(self, mod: nn.Module, args: tuple) -> None:
        with self.tracer.pause():
            if mod in self.info:
                self.info[mod]["calls"] += 1
                return
            x = args[0]
            self.order.append(mod)
            self.info[mod] = {"calls": 1, "in_shape": tuple(x.shape[1:]), "in_key": tensor_key(x)}

    def post_hook(self, mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        with self.tracer.pause():
            d = self.info[mod]
            k = tensor_key(out)
            if "out_key" not in d:
                d["out_shape"] = tuple(out.shape[1:])
                d["out_key"] = k
            self.conv_out[k] = mod
            self.outputs.setdefault(mod, []).append(k)

    def norm_pre_hook(self, mod: nn.Module, args: tuple) -> None:
        with self.tracer.pause():
            src = self.conv_out.get(tensor_key(args[0]))
            if src is not None and src not in self.norm_of and mod not in self.norm_of.values():
                self.norm_of[src] = mod

    def norm_post_hook(self, mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        with self.tracer.pause():
            for conv, norm in self.norm_of.items():
                if norm is mod:
                    self.info[conv].setdefault("norm_out_key", tensor_key(out))
                    self.outputs.setdefault(mod, []).append(tensor_key(out))

    def enter(self, mod: nn.Module, args: tuple) -> None:
        self.tracer.modules.append(self.names.get(mod, "?"))

    def leave(self, mod: nn.Module, args: tuple, out) -> None:
        if self.tracer.modules:
            self.tracer.modules.pop()
