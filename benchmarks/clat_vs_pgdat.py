"""CLAT fine-tuning step vs PGD-AT training step: measured ratio, FLOP bound, savings.

    .venv/bin/python benchmarks/clat_vs_pgdat.py            # small_cnn (batch 128), resnet18 + preact_resnet18 (batch 32)
    .venv/bin/python benchmarks/clat_vs_pgdat.py --quick    # tiny_cnn only, < 1 min
    .venv/bin/python benchmarks/clat_vs_pgdat.py --models resnet18

Both steps are clat's real code paths on copies of the same model, the same batch,
the same attack (ℓ∞, ε = 8/255, α = 2/255, 10 steps, random start): ``method.loss``
+ ``backward`` + ``after_backward`` + SGD-momentum step, as ``clat.train`` runs them.
CLAT's critical layer is pinned (ClatConfig.layers) so that the comparison uses a
known deepest critical layer (ResNet-18: layer 11, ``layer3.0.conv2``, the paper's);
the layers a real criticality run selects on this (untrained) model are reported too.

FLOP bound. Let p = FLOPs of a forward pass up to and including the deepest critical
layer / FLOPs of a full forward pass (FlopCounterMode; conv and matmul only). In
forward-equivalents, a PGD-10 AT step is 10 × (forward + input backward) + forward +
backward ≈ 23, and a CLAT step is 10 × 2p (attack on the truncated net) + about 2p
(adversarial forward and its backward) + 2 (clean full forward, CE backward) ≈ 22p + 2.
So t_clat / t_pgdat ≈ (22p + 2) / 23.

Savings breakdown: each optimisation of CLAT is turned off on its own, by subclassing
clat.methods.CLAT (src/ is not touched), and timed against full CLAT in the same rounds:
  (a) the feature attack runs the network only up to the deepest critical layer
      (off: a full forward in every attack step, ``stop_early=False``);
  (b) the clean features are computed once per batch
      (off: the clean target features are recomputed, without grad, in every attack step);
  (c) frozen layers compute no weight gradients
      (off: every parameter requires grad; the gradients of the frozen ones are discarded
      in ``after_backward``, before the optimizer step);
  (d) the CE term's backward stops at the earliest critical layer
      (off: the clean input requires grad, so the backward runs through the whole network
      down to the input; still no weight gradients for frozen layers).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402

import clat  # noqa: E402
from clat.attacks.threat import feature_distance, perturb  # noqa: E402
from clat.config.schema import AttackConfig  # noqa: E402
from clat.methods.clat import ClatConfig  # noqa: E402
from clat.layers.freezing import freeze_all_but, frozen_bn_statistics  # noqa: E402
from clat.methods import CLAT, PGDAT, create_method  # noqa: E402
from clat.methods.base import EpochContext  # noqa: E402
from clat.models import model_info  # noqa: E402

# model -> (batch size, pinned critical layer)
SETTINGS = {
    "tiny_cnn": (32, "features.2.0"),
    "small_cnn": (128, "features.2.0"),
    "resnet18": (32, "layer3.0.conv2"),  # layer 11, the paper's critical layer for RN18
    "preact_resnet18": (32, "layer3.0.conv2"),  # layer 12 here (the shortcut conv comes first)
}


# ----------------------------------------------------------------------------- ablations
class ClatFullForwardAttack(CLAT):
    """(a) off: the feature attack runs the whole network (stop_early=False)."""

    def attack_features(self, model, x, target, shard=None):
        assert self.cfg.inner == "pgd"
        ext = self.extractor(model)
        with frozen_bn_statistics(model):
            return perturb(lambda xa: feature_distance(ext(xa, stop_early=False).outputs, target, self._scale), x, self.threat, shard=shard)


class ClatCleanPerStep(CLAT):
    """(b) off: the clean target features are recomputed (no grad) in every attack step."""

    def attack_features(self, model, x, target, shard=None):
        assert self.cfg.inner == "pgd"
        ext = self.extractor(model)

        def objective(xa):
            with torch.no_grad():
                clean_target = ext(x).outputs
            return feature_distance(ext(xa).outputs, clean_target, self._scale)

        with frozen_bn_statistics(model):
            return perturb(objective, x, self.threat, shard=shard)


class ClatAllWeightGrads(CLAT):
    """(c) off: all parameters require grad; frozen layers' gradients are discarded before the step."""

    _keep: set[int] = set()

    def _freeze(self, model):
        n = freeze_all_but(model, self.selected)
        self._keep = {id(p) for p in model.parameters() if p.requires_grad}
        for p in model.parameters():
            p.requires_grad_(True)
        return n

    def after_backward(self, model):
        super().after_backward(model)
        for p in model.parameters():
            if id(p) not in self._keep:
                p.grad = None


class ClatBackwardToInput(CLAT):
    """(d) off: the clean input requires grad, so the CE backward runs down to the input."""

    def loss(self, model, x, y, shard=None):
        return super().loss(model, x.detach().requires_grad_(True), y, shard)


VARIANTS = {
    "clat": (CLAT, "-", "full CLAT"),
    "clat_a_off": (ClatFullForwardAttack, "(a)", "attack runs the full network"),
    "clat_b_off": (ClatCleanPerStep, "(b)", "clean target recomputed every attack step"),
    "clat_c_off": (ClatAllWeightGrads, "(c)", "weight grads for all layers, frozen ones discarded"),
    "clat_d_off": (ClatBackwardToInput, "(d)", "CE backward down to the input"),
}


def real_selection(model, layers, name: str, n: int) -> dict:
    """The layers CLAT's own epoch hook selects (criticality on n real training images)."""
    cfg = clat.load_config(overrides=[f"clat.criticality.batch_size={n}"])
    k = model_info(name).default_k
    method = create_method("clat", cfg, layers, default_k=k)
    xs, ys, _ = C.real_images(n, seed=1)
    xs, ys = xs.to(C.device()), ys.to(C.device())
    m = C.fresh_copy(model)
    ctx = EpochContext(epoch=0, stage_epoch=0, sample_batch=lambda b: (xs[:b], ys[:b]), generator=torch.Generator().manual_seed(0))
    event = method.on_epoch_start(m, ctx)["selection"]
    return {"k": k, "batch_size": n, "selected": event["selected"], "selected_index": event["selected_index"],
            "trainable_params": event["trainable_params"]}


def check_equivalence(base, layers, pinned: str, x, y) -> dict:
    """Every ablation must compute exactly CLAT's loss and gradients (only slower): one
    step on a few images from the same seed, max |grad difference| per variant."""
    grads = {}
    for key, (cls, _, _) in VARIANTS.items():
        t = C.Trainer(cls(AttackConfig(), ClatConfig(layers=[pinned]), layers, k=1), C.fresh_copy(base), selection=[pinned])
        torch.manual_seed(1234)  # same random start
        loss, _ = t.method.loss(t.model, x, y)
        t.opt.zero_grad(set_to_none=True)
        loss.backward()
        t.method.after_backward(t.model)
        grads[key] = {n: q.grad.detach().clone() for n, q in t.model.named_parameters() if q.grad is not None}
    ref = grads["clat"]
    out = {}
    for key, g in grads.items():
        same_set = set(g) == set(ref)
        diff = max(float((g[n] - ref[n]).abs().max()) for n in ref) if same_set else float("inf")
        scale = max(float(ref[n].abs().max()) for n in ref)
        out[key] = {"same_trainable_set": same_set, "max_abs_grad_diff": diff, "max_rel_grad_diff": diff / scale if scale else diff}
    return out


def bench_model(name: str, bs: int, pinned: str, repeats: int, crit_n: int, flop_ratio: bool, min_time: float) -> dict:
    dev = C.device()
    base = C.build_model(name)
    layers = clat.find_layers(base)
    x, y, data = C.real_images(bs)
    x, y = x.to(dev), y.to(dev)
    (pin,) = clat.resolve_layers(layers, [pinned])
    p, part, full = C.forward_fraction(base, pin, x)
    bound = (22 * p + 2) / 23

    C.log(f"[{name}] criticality selection on {crit_n} images ...")
    sel = real_selection(base, layers, name, crit_n)
    deepest = max(sel["selected_index"])
    p_sel = C.forward_fraction(base, layers[deepest], x)[0]
    sel.update({"deepest": layers[deepest].name, "p": p_sel, "bound": (22 * p_sel + 2) / 23})

    equivalence = check_equivalence(base, layers, pinned, x[:4], y[:4])
    attack = AttackConfig()  # eps 8/255, alpha 2/255, 10 steps, linf
    trainers = {"pgd_at": C.Trainer(PGDAT(attack), C.fresh_copy(base))}
    for key, (cls, _, _) in VARIANTS.items():
        method = cls(attack, ClatConfig(layers=[pinned]), layers, k=1)
        trainers[key] = C.Trainer(method, C.fresh_copy(base), selection=[pinned])
    trainable = {k: sum(q.numel() for q in t.model.parameters() if q.requires_grad) for k, t in trainers.items()}
    fns = {k: (lambda t=t: t.step(x, y)) for k, t in trainers.items()}
    times = C.interleaved(fns, repeats, warmup=1, min_time=min_time, label=name)

    flops = {}
    if flop_ratio:
        for k in ("pgd_at", "clat"):
            flops[k] = C.count_flops(lambda t=trainers[k]: t.step(x, y))
    med = {k: C.median(v) for k, v in times.items()}
    paired = C.paired_ratios(times["clat"], times["pgd_at"])
    measured = C.median(paired)  # median of per-round ratios: robust to drifts that hit a whole round
    return {
        "model": name, "batch_size": bs, "data": data, "repeats": repeats,
        "pinned_layer": {"name": pin.name, "index": pin.index},
        "p": p, "flops_forward_to_layer": part, "flops_forward_full": full, "bound": bound,
        "flop_ratio_counted": (flops["clat"] / flops["pgd_at"]) if flops else None, "flops_step": flops,
        "measured_ratio": measured, "paired_ratios": paired, "ratio_of_medians": med["clat"] / med["pgd_at"],
        "ratio_of_best": min(times["clat"]) / min(times["pgd_at"]),
        "within_10pct_of_bound": abs(measured / bound - 1) <= 0.10,
        "times": {k: C.summary(v) for k, v in times.items()},
        "img_per_s": {k: bs / v for k, v in med.items()},
        "trainable_params": trainable,
        "breakdown": {k: {"optimisation": VARIANTS[k][1], "turned_off": VARIANTS[k][2],
                          "rel_to_clat": C.median(C.paired_ratios(times[k], times["clat"])),
                          "saving": 1 - 1 / C.median(C.paired_ratios(times[k], times["clat"])),
                          "rel_ratio_of_medians": med[k] / med["clat"],
                          "paired_rel": C.paired_ratios(times[k], times["clat"])} for k in VARIANTS if k != "clat"},
        "real_selection": sel,
        "ablation_equivalence": equivalence,
    }


def main() -> None:
    default = ["small_cnn", "resnet18", "preact_resnet18"]
    ap = C.timing_parser(__doc__, list(SETTINGS), default, "timed rounds per variant (default 5; --quick 3)")
    ap.add_argument("--batch-size", type=int, help="override the per-model batch size")
    ap.add_argument("--criticality-batch", type=int, default=100, help="images for the real selection (CLAT's default 100)")
    ap.add_argument("--no-flop-count", action="store_true", help="skip counting the FLOPs of one full step of each method")
    args, models = C.timing_args(ap, default)
    info = C.env_info()
    C.header("CLAT fine-tuning step vs PGD-10 AT step (clat.methods.CLAT vs clat.methods.PGDAT)", info,
             "attack: linf eps=8/255 alpha=2/255 10 steps random start; SGD momentum 0.9; interleaved rounds, 1 warm-up step excluded;\n"
             "times are medians, ratios are medians of the per-round ratios (variants of one round ran back to back)")
    results = []
    for name in models:
        bs, pinned = SETTINGS[name]
        bs = args.batch_size or bs
        reps = args.repeats or (3 if args.quick else 5)
        results.append(bench_model(name, bs, pinned, reps, args.criticality_batch, not args.no_flop_count, args.min_time))

    rows = []
    for r in results:
        rows.append([r["model"], r["batch_size"], f"{r['pinned_layer']['index']} {r['pinned_layer']['name']}", f"{r['p']:.3f}",
                     f"{r['bound']:.3f}", f"{r['flop_ratio_counted']:.3f}" if r["flop_ratio_counted"] else "-",
                     f"{r['times']['pgd_at']['median_s']:.2f}", f"{r['times']['clat']['median_s']:.2f}",
                     f"{r['measured_ratio']:.3f}", f"{min(r['paired_ratios']):.3f}-{max(r['paired_ratios']):.3f}",
                     "yes" if r["within_10pct_of_bound"] else "no"])
    print(C.table(["model", "batch", "deepest critical layer", "p", "bound", "FLOP ratio", "PGD-AT s", "CLAT s",
                   "t_clat/t_pgdat", "per-round", "within 10%"], rows,
                  "Step time, CLAT (pinned layer) vs PGD-10 AT. bound = (22p+2)/23; FLOP ratio = FlopCounterMode(CLAT "
                  "step)/FlopCounterMode(PGD-AT step)"))
    print()
    for r in results:
        rows = [[k, v["optimisation"], v["turned_off"], f"{r['times'][k]['median_s']:.2f}", f"{v['rel_to_clat']:.3f}x",
                 f"{min(v['paired_rel']):.2f}-{max(v['paired_rel']):.2f}", f"{100 * v['saving']:.1f}%"] for k, v in r["breakdown"].items()]
        rows.insert(0, ["clat", "-", "nothing (all optimisations on)", f"{r['times']['clat']['median_s']:.2f}", "1.000x", "-", "-"])
        print(C.table(["variant", "opt.", "turned off", "median s", "time / CLAT", "per-round", "saved by opt."], rows,
                      f"Savings breakdown, {r['model']} batch {r['batch_size']} (each optimisation off on its own)"))
        print()
    rows = [[r["model"], r["real_selection"]["k"],
             ", ".join(f"{i} {n}" for i, n in zip(r["real_selection"]["selected_index"], r["real_selection"]["selected"])),
             f"{r['real_selection']['p']:.3f}", f"{r['real_selection']['bound']:.3f}"] for r in results]
    for r in results:
        worst = max(v["max_rel_grad_diff"] for v in r["ablation_equivalence"].values())
        print(f"check, {r['model']}: every ablation gives CLAT's gradients on the same trainable parameters "
              f"(max |diff| / max |grad| = {worst:.1e}, 4 images, same seed): {'yes' if worst < 1e-4 else 'NO'}")
    print()
    print(C.table(["model", "k", "selected by criticality", "p", "bound"], rows,
                  f"Selection a real criticality run makes (CLAT.on_epoch_start, {args.criticality_batch} bundled CIFAR-10 images, "
                  "randomly initialised model: the paper's selection is for trained models)"))
    C.finish(info)
    path = C.write_json("clat_vs_pgdat" + ("_quick" if args.quick else ""),
                        {"benchmark": "clat_vs_pgdat", "quick": args.quick, "env": info, "results": results})
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
