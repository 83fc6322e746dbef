"""Capture layer features in a forward pass (and stop it early), by module hooks or by the tensors
discovery traced (:class:`TapCapture`): what CLAT's feature attack and the criticality index read."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from clat.base.errors import ConfigError
from clat.layers.discovery import FeaturePoint, Layer, Tap
from clat.layers.tracing import func_name, tensor_key, tensors_in


class TapCapture(TorchFunctionMode):
    """Capture the tensors of some :class:`Tap` s during a forward pass, by counting torch
    operations exactly as discovery did (the pass must run the same sequence of
    operations; a mismatch is an error, never a wrong tensor). Use as a context manager
    around the forward pass; the tensors are in ``.values`` (tap -> tensor)."""

    def __init__(self, taps: Iterable[Tap]) -> None:
        super().__init__()
        self.want: dict[int, list[Tap]] = {}
        for t in taps:
            self.want.setdefault(t.op, []).append(t)
        self.count = 0
        self.values: dict[Tap, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        wanted = self.want.get(self.count)
        if wanted is None:
            self.count += 1
            return func(*args, **kwargs)
        before = [(tensor_key(t), t) for t in tensors_in((args, kwargs))]
        out = func(*args, **kwargs)
        n = self.count
        self.count += 1
        slots = tensors_in(out) + [t for (k, t) in before if tensor_key(t) != k]
        for tap in wanted:
            name = func_name(func)
            t = slots[tap.slot] if tap.slot < len(slots) else None
            if name != tap.func or t is None or tuple(t.shape[1:]) != tap.shape:
                raise ConfigError(
                    f"the model ran a different sequence of operations than when its layers were found (operation {n} is {name}, "
                    f"expected {tap.func} with a sample shape of {tap.shape}): its forward pass depends on the input. "
                    "Measure criticality with clat.criticality.denominator=input instead"
                )
            self.values[tap] = t.clone() if tap.inplace_after else t
        return out

    def check_complete(self) -> None:
        missing = [t for ts in self.want.values() for t in ts if t not in self.values]
        if missing:
            raise ConfigError(f"the forward pass ended before operation {missing[0].op} ({missing[0].where}) ran; "
                              "measure criticality with clat.criticality.denominator=input instead")


class _StopForward(Exception):
    """Raised from a hook once every requested feature is captured."""


@dataclass
class Features:
    """Outputs of one (possibly truncated) forward pass."""

    outputs: dict[str, torch.Tensor]  # layer name -> feature
    inputs: dict[str, torch.Tensor]  # layer name -> the tensor the layer read (if requested)
    logits: torch.Tensor | None  # None when the pass stopped early
    taps: dict[Tap, torch.Tensor] | None = None  # the requested taps' tensors (if requested)


class FeatureExtractor:
    """Capture the features of some layers in one forward pass.

    ``stop_early=True`` ends the pass right after the deepest requested feature:
    the rest of the network is not run (the feature attack of CLAT needs only the
    network up to its deepest critical layer). The captured values are exactly
    those of a full pass. Hooks live only for the duration of a call, so the
    model is left untouched between calls. ``taps`` are further tensors of the
    pass (e.g. the residual sums that feed layers) captured by :class:`TapCapture`.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[Layer],
        *,
        point: FeaturePoint = "post_bn",
        capture_inputs: bool = False,
        taps: Iterable[Tap] = (),
    ) -> None:
        if not layers:
            raise ConfigError("FeatureExtractor needs at least one layer")
        self.model = model
        self.layers = list(layers)
        self.point = point
        self.capture_inputs = capture_inputs
        self.taps = list(dict.fromkeys(taps))
        modules = dict(model.named_modules())
        self._out_mod = {layer.name: modules[layer.output_module(point)] for layer in self.layers}
        self._in_mod = {layer.name: modules[layer.name] for layer in self.layers}
        self._clone = {layer.name: (layer.tap(point).inplace_after if layer.tap(point) is not None else layer.inplace_after)
                       for layer in self.layers}

    def __call__(self, x: torch.Tensor, *, stop_early: bool = True) -> Features:
        outputs: dict[str, torch.Tensor] = {}
        inputs: dict[str, torch.Tensor] = {}
        wanted = len(self.layers)
        handles = []
        if self.taps and stop_early:
            raise ValueError("taps are captured on full forward passes only (stop_early=False)")

        def done() -> bool:
            return len(outputs) == wanted and (not self.capture_inputs or len(inputs) == wanted)

        def make_out_hook(name: str):
            def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
                if name not in outputs:
                    with torch._C.DisableTorchFunction():  # not an operation of the model's own pass
                        outputs[name] = out.clone() if self._clone[name] else out
                    if stop_early and done():
                        raise _StopForward

            return hook

        def make_in_hook(name: str):
            def hook(mod: nn.Module, args: tuple) -> None:
                if name not in inputs:
                    inputs[name] = args[0]

            return hook

        capture = TapCapture(self.taps) if self.taps else None
        try:
            for layer in self.layers:
                handles.append(self._out_mod[layer.name].register_forward_hook(make_out_hook(layer.name)))
                if self.capture_inputs:
                    handles.append(self._in_mod[layer.name].register_forward_pre_hook(make_in_hook(layer.name)))
            try:
                # eager even when the model was compiled in place (``model.compile()``): the
                # hooks above, and the early stop they raise, need the module-by-module forward
                if capture is not None:
                    with capture:
                        logits = self.model._call_impl(x)
                    capture.check_complete()
                else:
                    logits = self.model._call_impl(x)
            except _StopForward:
                logits = None
        finally:
            for h in handles:
                h.remove()
        if not done():
            missing = [layer.name for layer in self.layers if layer.name not in outputs]
            raise ConfigError(f"layers {missing} did not run in the forward pass; were they found on this model?")
        return Features(outputs, inputs, logits, capture.values if capture is not None else None)


@contextlib.contextmanager
def recomputed_blocks(model: nn.Module, keep: Sequence[str]) -> Iterator[list[str]]:
    """Inside the block, the model's blocks are activation-checkpointed: each keeps only its input and recomputes
    its activations during the backward pass (``torch.utils.checkpoint``, non-reentrant). A block is the outermost
    module, other than an ``nn.Sequential`` container, that holds two or more conv/linear layers and none of the
    modules named in ``keep`` (the layers whose features are hooked, e.g. CLAT's critical layers, and their
    parents). Values and gradients are those of the plain pass (recomputation repeats the same arithmetic; the
    caller freezes BatchNorm statistics); memory drops, time rises by about one forward pass of the blocks.
    Yields the names of the blocks (none for a plain chain such as VGG's ``features``)."""

    blocks: list[str] = []
    for name, m in model.named_modules():
        if not name or isinstance(m, nn.Sequential) or any(k == name or k.startswith(name + ".") for k in keep):
            continue
        if any(name.startswith(b + ".") for b in blocks):
            continue
        if sum(isinstance(c, (nn.Conv2d, nn.Linear)) for c in m.modules()) >= 2:
            blocks.append(name)
    modules = dict(model.named_modules())
    saved = [(modules[b], modules[b].__dict__.get("forward")) for b in blocks]
    for m, _ in saved:
        m.forward = functools.partial(checkpoint, m.forward, use_reentrant=False)
    try:
        yield blocks
    finally:
        for m, own in saved:
            if own is None:
                del m.forward
            else:
                m.forward = own
