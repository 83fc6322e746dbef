"""clat's PGD-AT training step vs peer implementations, same model, batch and attack.

    benchmarks/.venv-peers/bin/python benchmarks/peers.py            # resnet18 (batch 32), small_cnn (batch 128)
    benchmarks/.venv-peers/bin/python benchmarks/peers.py --quick    # tiny_cnn only, < 1 min

(create benchmarks/.venv-peers with ``bash benchmarks/peers_env.sh``; with clat's own
.venv the peers that are not installed are skipped with a message.)

One PGD-AT training step = a 10-step ℓ∞ PGD attack (ε = 8/255, α = 2/255, uniform
random start, inputs in [0, 1]) on the batch, then cross-entropy on the adversarial
batch, backward and an SGD step (lr 0.01, momentum 0.9, weight decay 5e-4). Every
implementation trains its own copy of the same initial model on the same batch;
the implementations are interleaved round by round, 1 warm-up step each excluded.

- ours: clat as shipped: ``clat.methods.PGDAT`` trained by the loop's own Stage with the default config's
  settings (``channels_last: auto``, i.e. NHWC on a CPU; benchmarks/cpu_defaults.py measured why).
  Attack in train mode (batch statistics) with BatchNorm running statistics frozen;
  input gradients only (``torch.autograd.grad``).
- textbook: the loop most tutorials write: ``delta.requires_grad_()``,
  ``loss.backward()`` on the model at every PGD step (so parameter gradients are also
  computed, then zeroed before the training step), sign step, clamp to the ε-ball and to
  [0, 1], then the optimizer step. Train mode throughout (running statistics updated by
  every attack forward).
- torchattacks: as its README shows it: ``torchattacks.PGD(model, eps=8/255, alpha=2/255, steps=10,
  random_start=True)``, ``x_adv = atk(x, y)``, then CE + backward + SGD step. Its default attack mode:
  the model is put in eval mode for the attack (BatchNorm running statistics) and back in train mode after.
- torchattacks_train: the same with ``atk.set_model_training_mode(model_training=True, batchnorm_training=True)``,
  so its attack uses batch statistics like ours (what a user reproducing Madry et al.'s train-mode attack sets).
- ART: ``art.defences.trainer.AdversarialTrainerMadryPGD`` (eps=8/255, eps_step=2/255,
  max_iter=10, num_random_init=1) over an ``art.estimators.classification.PyTorchClassifier``
  (clip_values (0, 1)), timed as ``trainer.fit(x, y, nb_epochs=1, batch_size=B)`` on
  exactly one batch: ART's own per-batch path (attack.generate on the batch, then the
  classifier's fit for one epoch on it). Its attack's internal batch size is set to B
  (the trainer leaves ART's default 32). Differences that are ART's design: the attack
  runs in eval mode (BatchNorm running statistics), computes parameter gradients at
  every step (``loss.backward()``), works on NumPy arrays (host copies each step), and
  ``generate`` always computes the attack success rate (2 extra forward passes).
Target: ours >= 1.5x the fastest peer (img/s).
"""

from __future__ import annotations

import contextlib
import functools
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common as C  # noqa: E402

from clat.config.schema import AttackConfig  # noqa: E402
from clat.methods import PGDAT  # noqa: E402

SETTINGS = {"tiny_cnn": 32, "small_cnn": 128, "resnet18": 32, "preact_resnet18": 32}
EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 10
TARGET = 1.5


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=C.LR, momentum=C.MOMENTUM, weight_decay=C.WEIGHT_DECAY)


def make_ours(model, x, y):
    t = C.Trainer(PGDAT(AttackConfig(eps=EPS, alpha=ALPHA, steps=STEPS)), model)
    return lambda: t.step(x, y), {"attack_bn": "train mode (batch stats), running stats frozen", "param_grads_in_attack": False,
                                  "channels_last": t.stage.runner.channels_last}


def make_textbook(model, x, y):
    opt = _sgd(model)
    model.train()

    def step():
        delta = torch.empty_like(x).uniform_(-EPS, EPS)
        delta = (x + delta).clamp(0, 1) - x
        for _ in range(STEPS):
            delta.requires_grad_(True)
            loss = F.cross_entropy(model(x + delta), y)
            loss.backward()
            delta = (delta.detach() + ALPHA * delta.grad.sign()).clamp(-EPS, EPS)
            delta = (x + delta).clamp(0, 1) - x
        opt.zero_grad()
        loss = F.cross_entropy(model(x + delta), y)
        loss.backward()
        opt.step()

    return step, {"attack_bn": "train mode (batch stats), running stats updated", "param_grads_in_attack": True}


def make_torchattacks(model, x, y, *, train_mode: bool = False):
    """torchattacks as its README runs it (eval-mode attack); ``train_mode``: its attack switched to train-mode
    BatchNorm (batch statistics), ours' semantics."""
    import torchattacks

    opt = _sgd(model)
    model.train()
    atk = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True)  # its defaults: eval-mode attack
    if train_mode:
        atk.set_model_training_mode(model_training=True, batchnorm_training=True)

    def step():
        x_adv = atk(x, y)
        opt.zero_grad()
        loss = F.cross_entropy(model(x_adv), y)
        loss.backward()
        opt.step()

    bn = "train mode (batch stats), running stats updated" if train_mode else "eval mode (running stats; torchattacks' default)"
    return step, {"version": torchattacks.__version__, "attack_bn": bn, "param_grads_in_attack": False}


def make_art(model, x, y):
    import art
    from art.defences.trainer import AdversarialTrainerMadryPGD
    from art.estimators.classification import PyTorchClassifier

    opt = _sgd(model)
    model.train()
    bs = x.shape[0]
    clf = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), optimizer=opt, input_shape=tuple(x.shape[1:]),
                            nb_classes=10, clip_values=(0.0, 1.0), device_type="gpu" if x.is_cuda else "cpu")
    trainer = AdversarialTrainerMadryPGD(clf, nb_epochs=1, batch_size=bs, eps=EPS, eps_step=ALPHA, max_iter=STEPS, num_random_init=1)
    trainer.attack.set_params(batch_size=bs)  # one attack batch = the training batch
    x_np, y_np = x.cpu().numpy(), y.cpu().numpy()

    def step():
        with contextlib.redirect_stderr(io.StringIO()):  # ART's tqdm bars
            trainer.fit(x_np, y_np, nb_epochs=1, batch_size=bs)

    meta = {"version": art.__version__, "api": "AdversarialTrainerMadryPGD.fit(one batch, nb_epochs=1)",
            "attack_bn": "eval mode (running stats)", "param_grads_in_attack": True,
            "extra_work": "NumPy<->tensor copies; attack success rate (2 extra forwards) per generate"}
    return step, meta


PEERS = {"textbook": (make_textbook, None), "torchattacks": (make_torchattacks, "torchattacks"),
         "torchattacks_train": (functools.partial(make_torchattacks, train_mode=True), "torchattacks"), "art": (make_art, "art")}


def available(module: str | None) -> str | None:
    """None if importable, else the reason."""
    if module is None:
        return None
    try:
        __import__(module)
        return None
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


def check_perturbation(name: str, model, x, y) -> float | None:
    """Largest |x_adv - x| of one attack by each library on a few images (untimed)."""
    import copy

    m = copy.deepcopy(model).train()
    xs, ys = x[:8], y[:8]
    if name.startswith("torchattacks"):
        import torchattacks

        xa = torchattacks.PGD(m, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True)(xs, ys)
    elif name == "art":
        from art.attacks.evasion import ProjectedGradientDescent
        from art.estimators.classification import PyTorchClassifier

        clf = PyTorchClassifier(model=m, loss=torch.nn.CrossEntropyLoss(), optimizer=_sgd(m), input_shape=tuple(x.shape[1:]),
                                nb_classes=10, clip_values=(0.0, 1.0), device_type="gpu" if x.is_cuda else "cpu")
        atk = ProjectedGradientDescent(clf, eps=EPS, eps_step=ALPHA, max_iter=STEPS, num_random_init=1, batch_size=8, verbose=False)
        xa = torch.from_numpy(atk.generate(xs.cpu().numpy(), y=ys.cpu().numpy())).to(x.device)
    else:
        from clat.attacks.threat import ThreatModel, pgd

        xa = pgd(m, xs, ys, ThreatModel(eps=EPS, alpha=ALPHA, steps=STEPS))
    return float((xa - xs).abs().max())


def bench_model(name: str, repeats: int, min_time: float, skip: dict[str, str]) -> dict:
    dev = C.device()
    bs = SETTINGS[name]
    base = C.build_model(name)
    x, y, data = C.real_images(bs)
    x, y = x.to(dev), y.to(dev)
    fns, meta = {}, {}
    fns["ours"], meta["ours"] = make_ours(C.fresh_copy(base), x, y)
    for peer, (make, _) in PEERS.items():
        if peer in skip:
            continue
        fns[peer], meta[peer] = make(C.fresh_copy(base), x, y)
    max_pert = {k: check_perturbation(k, base, x, y) for k in fns}
    times = C.interleaved(fns, repeats, warmup=1, min_time=min_time, label=name)
    med = {k: C.median(v) for k, v in times.items()}
    peers = [k for k in fns if k != "ours"]
    paired = {k: C.paired_ratios(times[k], times["ours"]) for k in peers}
    speedup = {k: C.median(paired[k]) for k in peers}  # median of per-round ratios
    fastest = min(peers, key=lambda k: speedup[k]) if peers else None  # the peer ours is least faster than
    return {
        "model": name, "batch_size": bs, "data": data, "repeats": repeats,
        "times": {k: C.summary(v) for k, v in times.items()}, "img_per_s": {k: bs / v for k, v in med.items()},
        "speedup_ours_over": speedup, "paired_speedups": paired,
        "speedup_ratio_of_medians": {k: med[k] / med["ours"] for k in peers},
        "fastest_peer": fastest, "speedup_over_fastest": speedup[fastest] if fastest else None,
        "meets_target": (speedup[fastest] >= TARGET) if fastest else None,
        "max_abs_perturbation_check": max_pert, "implementations": meta,
    }


def main() -> None:
    default = ["resnet18", "small_cnn"]
    args, models = C.timing_args(C.timing_parser(__doc__, list(SETTINGS), default, "timed rounds (default 5; --quick 3)"), default)
    info = C.env_info()
    skip = {p: why for p, (_, mod) in PEERS.items() if (why := available(mod)) is not None}
    C.header("PGD-AT training step: clat vs peer implementations", info,
             "PGD: linf eps=8/255 alpha=2/255 10 steps random start; SGD lr 0.01 momentum 0.9 wd 5e-4; interleaved rounds, 1 warm-up\n"
             "step excluded; times are medians, speed-ups are medians of the per-round ratios t_peer/t_ours")
    for p, why in skip.items():
        print(f"SKIPPED peer {p!r}: not importable ({why}). Install the peers with: bash benchmarks/peers_env.sh, "
              f"then run with benchmarks/.venv-peers/bin/python")
    if skip:
        print()
    results = [bench_model(m, args.repeats or (3 if args.quick else 5), args.min_time, skip) for m in models]
    for r in results:
        rows = []
        for k in r["times"]:
            meta = r["implementations"][k]
            rows.append([k, f"{r['times'][k]['median_s']:.3f}", f"{r['img_per_s'][k]:.1f}",
                         "1.00x" if k == "ours" else f"{r['speedup_ours_over'][k]:.2f}x",
                         "-" if k == "ours" else f"{min(r['paired_speedups'][k]):.2f}-{max(r['paired_speedups'][k]):.2f}",
                         f"{r['max_abs_perturbation_check'][k] * 255:.2f}/255", meta["attack_bn"]])
        print(C.table(["implementation", "step s", "img/s", "ours speed-up", "per-round", "max |δ| (check)", "attack BatchNorm"], rows,
                      f"{r['model']}, batch {r['batch_size']}"))
        if r["fastest_peer"]:
            print(f"  fastest peer: {r['fastest_peer']}; ours is {r['speedup_over_fastest']:.2f}x its speed; "
                  f"target >= {TARGET}x: {'MET' if r['meets_target'] else 'NOT MET'}")
        print()
    C.finish(info)
    path = C.write_json("peers" + ("_quick" if args.quick else ""),
                        {"benchmark": "peers", "quick": args.quick, "env": info, "skipped": skip, "target": TARGET,
                                  "results": results})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
