"""Layer weakness (Eq. 5), criticality index (Eq. 6), and critical-layer selection.

One untargeted PGD perturbation δ of the model's cross-entropy (model in eval
mode, under the run's threat model: its norm, radius and step) and two forward
passes (clean, attacked) give every layer's weakness

    W_i = mean_x ‖F_i(x+δ) − F_i(x)‖₂ / N_i

and its criticality ``C_i = W_i / W_src(i)``. The denominator (SPEC "Weakness and
criticality"):

- ``upstream`` (default, the paper's Eq. 6): ``W_src(i)`` is measured on what feeds
  layer i, at the same feature point as the numerator. Walking back from the
  tensor layer i reads through operations with one data input (activations,
  pooling, reshapes, norms that belong to no layer), the first of these ends the
  walk: the feature of another layer j (then ``W_src(i) = W_j``, exactly
  ``C_i = W_i / W_{i-1}`` on a conv-BN-ReLU chain); a tensor that joins several
  data tensors (a residual sum before its activation, a concatenation), whose
  own weakness is measured with its own N; or the model input (``C_i = W_i``, the
  paper's ``C_1 = W_1``). A shortcut conv and its block's first conv read the
  same residual sum and so share a denominator: no jump because a sibling
  branch was tuned. :func:`clat.layers.discovery.find_layers` records each layer's source.
- ``previous``: the layer before i in execution order (Eq. 6 read literally,
  also across parallel branches); ``C_0 = W_0``.
- ``input``: the tensor layer i reads, after whatever activation, pooling or
  residual sum precedes it (clat's default before 0.3; an ablation). Layers
  whose input no other layer computes have ``C_i = W_i``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import nn

from clat.attacks.threat import DEFAULT_THREAT, Shard, ThreatModel, pgd
from clat.base import rng
from clat.base.errors import ConfigError
from clat.layers.capture import FeatureExtractor
from clat.layers.discovery import FeaturePoint, Layer, Tap, resolve_layers

Denominator = Literal["upstream", "previous", "input"]
Scaling = Literal["n", "sqrt_n", "none"]
DENOMINATORS: tuple[str, ...] = ("upstream", "previous", "input")


def scale(n: int, scaling: Scaling) -> float:
    return {"n": 1.0 / n, "sqrt_n": 1.0 / math.sqrt(n), "none": 1.0}[scaling]


@dataclass
class CriticalityConfig:
    batch_size: int = 100  # fresh random training images per (re)selection
    # Eq. 6: upstream (default), previous in execution order, or the post-activation input (ablations)
    denominator: Literal["upstream", "previous", "input"] = "upstream"
    scaling: Literal["n", "sqrt_n", "none"] = "n"  # 1/N_i (paper), 1/sqrt(N_i) or none
    point: Literal["post_bn", "pre_bn"] = "post_bn"  # where a layer's feature is read: after its BatchNorm (default) or before
    include_classifier: bool = False  # the last layer (the classifier) may be selected too
    steps: int = 10  # PGD steps of the criticality perturbation (eps/alpha from `attack`)
    # images attacked and measured at once (same result); null: a quarter of data.batch_size, so a re-selection peaks below a training step
    # (benchmarks/memory.py)
    chunk_size: int | None = None

    def measure_kwargs(self) -> dict:
        """The settings that decide what :func:`compute_criticality` measures, as its keywords: every caller that ranks
        layers (CLAT's selection, ``clat criticality``, ``clat stability``) passes them whole, so none drops one."""
        return {"denominator": self.denominator, "scaling": self.scaling, "point": self.point,
                "include_classifier": self.include_classifier}



@dataclass
class CriticalityResult:
    """Per-layer weakness and criticality; everything a table, plot or selection needs."""

    layers: list[Layer]
    weakness: list[float]
    input_weakness: list[float]  # the denominator's W (nan where C = W)
    criticality: list[float]
    eligible: list[bool]  # False for layers excluded from selection (the classifier by default)
    settings: dict = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)  # what each denominator measured

    @property
    def ranking(self) -> list[int]:
        """Eligible layer indices, most critical first."""
        idx = [i for i, ok in enumerate(self.eligible) if ok]
        return sorted(idx, key=lambda i: -self.criticality[i])

    def top_k(self, k: int) -> list[Layer]:
        n = sum(self.eligible)
        if not 1 <= k <= n:
            raise ConfigError(f"k={k} critical layers requested but {n} layers are eligible for selection; choose k between 1 and {n}")
        return [self.layers[i] for i in self.ranking[:k]]

    def to_dict(self, k: int | None = None) -> dict:
        rank = {i: r + 1 for r, i in enumerate(self.ranking)}
        selected = {layer.index for layer in self.top_k(k)} if k else set()
        return {
            "settings": self.settings,
            "layers": [
                {
                    "index": layer.index,
                    "name": layer.name,
                    "bn": layer.bn_name,
                    "kind": layer.kind,
                    "out_shape": list(layer.out_shape),
                    "params": layer.num_params,
                    "weakness": self.weakness[i],
                    "input_weakness": self.input_weakness[i],
                    "denominator_source": self.sources[i] if self.sources else None,
                    "criticality": self.criticality[i],
                    "rank": rank.get(i),
                    "eligible": self.eligible[i],
                    "selected": layer.index in selected,
                }
                for i, layer in enumerate(self.layers)
            ],
        }


def eligible_mask(layers: Sequence[Layer], *, include_classifier: bool = False, exclude: Sequence[str | int] = ()) -> list[bool]:
    """Which layers may be selected. The final classifier (the last layer, when it is
    a Linear) is excluded by default: its 1/N_i-normalised index is incomparable
    (SPEC: C ≈ 312 vs ≤ 3 for conv layers on a CIFAR ResNet-18)."""

    banned = {layer.index for layer in resolve_layers(layers, exclude)}
    if not include_classifier and layers[-1].kind == "Linear":
        banned.add(layers[-1].index)
    return [layer.index not in banned for layer in layers]


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).flatten(1).float().norm(dim=1).mean().item()


@torch.no_grad()
def weakness_from_features(
    layers: Sequence[Layer],
    clean: dict[str, torch.Tensor],
    adv: dict[str, torch.Tensor],
    scaling: Scaling = "n",
) -> list[float]:
    return [distance(adv[layer.name], clean[layer.name]) * scale(layer.numel, scaling) for layer in layers]


def compute_criticality(
    model: nn.Module,
    layers: Sequence[Layer],
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel = DEFAULT_THREAT,
    *,
    denominator: Denominator = "upstream",
    scaling: Scaling = "n",
    point: FeaturePoint = "post_bn",
    include_classifier: bool = False,
    exclude: Sequence[str | int] = (),
    x_adv: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> CriticalityResult:
    """Criticality of every layer from one PGD perturbation of the batch ``(x, y)``.

    ``threat`` is the attack's threat model (norm, ε, step, steps; CLAT passes its run's, with
    ``clat.criticality.steps``). The model runs in eval mode (its mode is restored). ``x_adv`` may be given
    to reuse a perturbation (then no attack is run). ``x`` holds [0, 1] images. ``chunk_size``: attack and measure at most this many images
    at a time (the peak memory of a batch of that size; the result is the whole batch's, see
    :func:`_mean_distances`).
    """
    if denominator not in DENOMINATORS:
        raise ConfigError(f"unknown criticality denominator {denominator!r}; use one of {', '.join(DENOMINATORS)}")
    if scaling not in ("n", "sqrt_n", "none"):
        raise ConfigError(f"unknown criticality scaling {scaling!r}; use 'n', 'sqrt_n' or 'none'")
    index = {layer.index: i for i, layer in enumerate(layers)}
    taps: list[Tap] = []
    if denominator == "upstream":
        missing = [l.name for l in layers if l.source(point).kind == "untraced"]
        if missing:
            warnings.warn(f"criticality: could not trace what feeds {', '.join(missing)}; their denominator is the tensor they read "
                          "(denominator=input)", stacklevel=2)
        for layer in layers:
            src = layer.source(point)
            if src.kind == "tensor" or (src.kind == "layer" and src.layer not in index):
                assert src.tap is not None
                taps.append(src.tap)
    was_training = model.training
    model.eval()
    try:
        untraced = denominator == "upstream" and any(l.source(point).kind == "untraced" for l in layers)
        extractor = FeatureExtractor(model, layers, point=point, capture_inputs=denominator == "input" or untraced, taps=taps)
        dist = _mean_distances(model, extractor, x, y, threat, x_adv, chunk_size)
    finally:
        model.train(was_training)
    w = [dist["outputs"][layer.name] * scale(layer.numel, scaling) for layer in layers]
    nan = float("nan")
    w_src: list[float] = []
    sources: list[str] = []
    for i, layer in enumerate(layers):
        src = layer.source(point)
        if denominator == "previous":
            w_src.append(w[i - 1] if i > 0 else nan)
            sources.append(f"layer {layers[i - 1].index} ({layers[i - 1].name})" if i > 0 else "first layer (C = W)")
        elif denominator == "input" or src.kind == "untraced":
            if layer.reads_model_input:
                w_src.append(nan)
                sources.append("model input (C = W)")
            else:
                n_in = math.prod(layer.in_shape)
                w_src.append(dist["inputs"][layer.name] * scale(n_in, scaling))
                sources.append("the tensor it reads")
        elif src.kind == "model_input":
            w_src.append(nan)
            sources.append(src.describe())
        elif src.kind == "layer" and src.layer in index:
            w_src.append(w[index[src.layer]])
            sources.append(f"layer {src.layer} ({layers[index[src.layer]].name})")
        else:
            assert src.tap is not None
            w_src.append(dist["taps"][src.tap] * scale(src.tap.numel, scaling))
            sources.append(src.describe())
    c = [w[i] if math.isnan(d) else (w[i] / d if d > 0 else float("inf")) for i, d in enumerate(w_src)]
    settings = {"eps": threat.eps, "alpha": threat.alpha, "steps": threat.steps, "norm": threat.norm, "denominator": denominator,
                "scaling": scaling,
                "point": point, "batch_size": int(x.shape[0])}
    return CriticalityResult(list(layers), w, w_src, c, eligible_mask(layers, include_classifier=include_classifier, exclude=exclude),
                             settings, sources)


def _mean_distances(model: nn.Module, extractor: FeatureExtractor, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                    x_adv: torch.Tensor | None, chunk: int | None) -> dict[str, dict]:
    """``{"outputs" | "inputs" | "taps": {key: mean over the batch of ‖F(x+δ) − F(x)‖₂}}`` for what ``extractor``
    captures, attacking (unless ``x_adv`` is given) and measuring ``chunk`` images at a time. The model is in eval
    mode, so every image's attack and features are its own; each chunk's PGD draws its random start as a slice
    of the whole batch's draw (:class:`clat.attacks.threat.Shard`, from the same RNG state), so the perturbations are
    those of one unchunked attack and the RNG ends where that attack leaves it."""
    n = len(x)
    chunk = n if chunk is None or chunk >= n else chunk
    if chunk < 1:
        raise ConfigError(f"criticality chunk size must be >= 1, got {chunk}")
    state = rng.device_state(x.device)
    sums: dict[str, dict] = {"outputs": {}, "inputs": {}, "taps": {}}
    for off in range(0, n, chunk):
        xc = x[off : off + chunk]
        if x_adv is not None:
            xa = x_adv[off : off + chunk]
        elif chunk == n:
            xa = pgd(model, xc, y, threat)
        else:
            rng.set_device_state(x.device, state)
            xa = pgd(model, xc, y[off : off + chunk], threat, shard=Shard(off, n))
        # Every layer's clean and adversarial features are held at once, about twice what the attack's graph keeps
        # (two saved tensors per layer): measured in quarters of the chunk, they stay below the attack's peak.
        part = -(-len(xc) // 4)
        for p0 in range(0, len(xc), part):
            xp, ap = xc[p0 : p0 + part], xa[p0 : p0 + part]
            with torch.no_grad():
                fc, fa = extractor(xp, stop_early=False), extractor(ap, stop_early=False)
            m = len(xp)
            for kind, acc in sums.items():
                clean, adv = getattr(fc, kind), getattr(fa, kind)
                for key in clean or {}:  # a part's mean, weighted by its size
                    acc[key] = acc.get(key, 0.0) + distance(adv[key], clean[key]) * m
            del fc, fa
    return {kind: {key: v / n for key, v in acc.items()} for kind, acc in sums.items()}


def select_random(layers: Sequence[Layer], eligible: Sequence[bool], k: int, generator: torch.Generator) -> list[Layer]:
    """k eligible layers drawn uniformly without replacement (the "random layers" ablation)."""
    pool = [layer for layer, ok in zip(layers, eligible) if ok]
    if not 1 <= k <= len(pool):
        raise ConfigError(f"k={k} random layers requested but {len(pool)} layers are eligible; choose k between 1 and {len(pool)}")
    perm = torch.randperm(len(pool), generator=generator)[:k].tolist()
    return sorted((pool[i] for i in perm), key=lambda layer: layer.index)
