"""Memory of CLAT vs full fine-tuning (PGD-AT on all parameters).

    .venv/bin/python benchmarks/memory.py            # resnet18 (batch 32), small_cnn (batch 128)
    .venv/bin/python benchmarks/memory.py --quick    # tiny_cnn only, < 1 min

For each variant: trainable parameters, gradient bytes (the ``.grad`` tensors that
exist after ``backward``), SGD-momentum optimizer-state bytes after one real step, and
the peak memory of one training step. Each measurement runs in a fresh subprocess
(``sys.executable benchmarks/memory.py --child ...``): the model, data, method and
optimizer are built, ``ru_maxrss`` is read (resource.getrusage(RUSAGE_SELF)), one
training step runs (clat's real step: ``method.loss`` + backward + SGD), ``ru_maxrss``
is read again, and the increase is reported (the high-water mark the step adds over
the set-up process; the first step of a process, so it also includes one-time
allocations, the same for every variant). With CUDA, ``torch.cuda.max_memory_allocated``
over the step is reported as well. Then, in the same process, a second step gives the
steady-state peak: freed heap is returned (malloc_trim), the peak-RSS counter is reset
(``/proc/self/clear_refs``), and the RSS high-water mark during the step minus the RSS
before it is reported. Variants are interleaved over the repeats; medians.

Note on CLAT's peak: since 0.2, CLAT runs its 10-step feature attack before any forward
pass that builds the update's graph (clat <= 0.2.0 kept the clean graph alive during the
attack; gradients are identical, tests/test_methods.py), so its step peaks in the attack:
a forward/backward up to the deepest selected layer with an input gradient. Its
re-selection attacks the criticality batch in chunks of a quarter of the training batch
(``clat.criticality.chunk_size``, default ``data.batch_size // 4``) and measures the layers' features in quarters
of a chunk; at the full batch it peaked 1.3x above a CLAT step of ResNet-18.

Variants: ``full`` = clat.methods.PGDAT, every parameter trainable; ``clat`` =
clat.methods.CLAT with the critical layer pinned (ResNet-18: layer 11,
``layer3.0.conv2``, the paper's), k = 1; ``clat_recompute`` = the same with ``clat.recompute=true``
(the feature attack recomputes the blocks before the layer in its backward); ``clat_selection`` = one re-selection
(``CLAT.on_epoch_start``: criticality on 100 images with PGD-10, then freezing), which
CLAT runs once every 10 epochs. Target (paper Table 6): ~95% fewer trainable parameters.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

SETTINGS = {"tiny_cnn": (32, "features.2.0"), "small_cnn": (128, "features.2.0"), "resnet18": (32, "layer3.0.conv2"),
            "preact_resnet18": (32, "layer3.0.conv2")}
VARIANTS = ["full", "clat", "clat_recompute", "clat_selection"]
CRIT_N = 100


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # Linux reports KiB


def _begin_peak(cuda: bool) -> tuple[int, int | None]:
    """Start a peak-memory measurement: peak RSS so far (and CUDA bytes in use, peak counter reset)."""
    gc.collect()
    before = _maxrss_bytes()
    if not cuda:
        return before, None
    import torch  # only a CUDA child gets here, after importing torch itself

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return before, torch.cuda.memory_allocated()


def _status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _trim_and_reset_peak() -> bool:
    """Return freed heap to the OS (glibc malloc_trim) and reset the peak-RSS counter
    (Linux: ``echo 5 > /proc/self/clear_refs``); False if the counter cannot be reset."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_steady(fn) -> tuple[int | None, int | None]:
    """Peak RSS during ``fn()`` minus the RSS before it, after returning freed heap and resetting the peak-RSS
    counter (so one-time allocations of an earlier call are not counted), and that RSS before; (None, None)
    where the counter cannot be reset."""
    gc.collect()
    if not _trim_and_reset_peak():
        return None, None
    base = _status_bytes("VmRSS")
    fn()
    hwm = _status_bytes("VmHWM")
    return (hwm - base if base is not None and hwm is not None else None), base


class _Mallinfo2(__import__("ctypes").Structure):
    _fields_ = [(n, __import__("ctypes").c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_in_use() -> int | None:
    """Bytes the C heap has handed out and not taken back (glibc mallinfo2: small blocks in use + mmapped
    blocks), i.e. live allocations, whatever the allocator keeps cached; None without glibc >= 2.33."""
    import ctypes

    try:
        f = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    f.restype = _Mallinfo2
    m = f()
    return m.uordblks + m.hblkhd


def in_use_peak(fn) -> int | None:
    """The peak of live heap bytes during ``fn()`` above those live before it, sampled every ~0.2 ms by a
    thread (torch's kernels release the GIL; a spike shorter than a sample can be missed). Unlike an RSS
    high-water mark it does not depend on what the allocator kept from earlier steps."""
    import threading

    if _heap_in_use() is None:
        fn()
        return None
    gc.collect()
    base = peak = _heap_in_use()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _heap_in_use())
            time.sleep(0.0002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(peak, _heap_in_use()) - base


def child(model_name: str, variant: str, bs: int, pinned: str) -> dict:
    """Runs in a fresh process: one measurement."""

    import torch

    import clat
    from clat.config.schema import AttackConfig
    from clat.methods.clat import ClatConfig
    from clat.methods import CLAT, PGDAT
    from clat.methods.clat import reselection_chunk

    dev = C.device()
    model = C.build_model(model_name)
    layers = clat.find_layers(model)
    x, y, data = C.real_images(bs)
    x, y = x.to(dev), y.to(dev)
    attack = AttackConfig()
    if variant == "full":
        method, selection = PGDAT(attack), None
    else:
        method = CLAT(attack, ClatConfig(layers=[pinned], recompute=variant == "clat_recompute"), layers, k=1,
                      chunk_size=reselection_chunk(bs))  # as a run's default
        selection = [pinned]
    xs, ys, _ = C.real_images(CRIT_N, seed=1)
    xs, ys = xs.to(dev), ys.to(dev)
    out: dict = {"model": model_name, "variant": variant, "batch_size": bs, "data": data}
    cuda = dev.type == "cuda"

    if variant == "clat_selection":
        # the measured event is the selection itself (criticality + freezing); the pinned layer
        # still decides what is kept, but the criticality of every layer is computed as CLAT does.
        from clat.methods.base import EpochContext

        model, _ = C.as_shipped(model)  # the memory format a run holds it in
        before, cuda_before = _begin_peak(cuda)
        t0 = time.perf_counter()
        ctx = EpochContext(0, 0, lambda n: (xs[:n], ys[:n]), torch.Generator().manual_seed(0))
        method.on_epoch_start(model, ctx)
        C.sync()
        out["seconds"] = time.perf_counter() - t0
        after = _maxrss_bytes()
        out.update({"maxrss_before": before, "maxrss_after": after, "peak_increase": after - before,
                    "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                    "total_params": sum(p.numel() for p in model.parameters()), "criticality_batch": CRIT_N})
        if cuda:
            out["cuda_peak_increase"] = torch.cuda.max_memory_allocated() - cuda_before
        # steady state, as for the steps below: a second selection (a later re-selection) after returning freed
        # memory and resetting the peak-RSS counter
        def reselect():
            method.selected = []  # a pinned CLAT selects once; forget it so that the criticality runs again
            method.on_epoch_start(model, ctx)

        out["steady_peak_increase"] = None if cuda else _rss_steady(reselect)[0]
        out["in_use_peak"] = in_use_peak(reselect)
        return out

    trainer = C.Trainer(method, model, selection=selection)
    before, cuda_before = _begin_peak(cuda)
    t0 = time.perf_counter()
    loss, _ = trainer.method.loss(model, x, y)
    trainer.opt.zero_grad(set_to_none=True)
    loss.backward()
    trainer.method.after_backward(model)
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    trainer.opt.step()
    C.sync()
    out["seconds"] = time.perf_counter() - t0
    after = _maxrss_bytes()
    opt_bytes = trainer.stage.optimizer_state_bytes()
    out.update({
        "maxrss_before": before, "maxrss_after": after, "peak_increase": after - before,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "grad_bytes": grad_bytes, "optimizer_state_bytes": opt_bytes,
        "selected": [l.name for l in getattr(trainer.method, "selected", [])],
    })
    if cuda:
        out["cuda_peak_increase"] = torch.cuda.max_memory_allocated() - cuda_before
        out["cuda_peak"] = torch.cuda.max_memory_allocated()
    # Steady state: a second step, after returning freed memory and resetting the peak-RSS
    # counter, so that one-time allocations of the first step (kernel caches, lazily created
    # state) are not counted. Peak RSS during the step minus RSS before it.
    out["steady_peak_increase"] = None
    if not cuda:
        out["steady_peak_increase"], base = _rss_steady(lambda: trainer.step(x, y))
        if out["steady_peak_increase"] is not None:
            out["steady_rss_before"] = base
        out["in_use_peak"] = in_use_peak(lambda: trainer.step(x, y))  # a third step: live heap bytes
    else:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
        trainer.step(x, y)
        torch.cuda.synchronize()
        out["steady_cuda_peak_increase"] = torch.cuda.max_memory_allocated() - cuda_before
    return out


def run_child(model_name: str, variant: str, bs: int, pinned: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", model_name, variant, str(bs), pinned]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"child {' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, model_name, variant, bs, pinned = sys.argv
        print(json.dumps(child(model_name, variant, int(bs), pinned)))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny_cnn only: a smoke test (< 1 min)")
    ap.add_argument("--models", nargs="+", choices=list(SETTINGS), help="default: resnet18 small_cnn (--quick: tiny_cnn)")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per variant (default 3)")
    ap.add_argument("--no-selection", action="store_true", help="skip the clat_selection variant")
    args = ap.parse_args()
    models = args.models or (["tiny_cnn"] if args.quick else ["resnet18", "small_cnn"])
    variants = [v for v in VARIANTS if not (args.no_selection and v == "clat_selection")]
    info = C.env_info()
    C.header("Memory: CLAT vs full fine-tuning (PGD-AT on all parameters)", info,
             "peak = increase of ru_maxrss over one training step, each in a fresh process; medians of interleaved repeats")
    results = {}
    for name in models:
        bs, pinned = SETTINGS[name]
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.repeats):
            k = r % len(variants)
            for v in variants[k:] + variants[:k]:
                res = run_child(name, v, bs, pinned)
                runs[v].append(res)
                C.log(f"  {name} repeat {r + 1}/{args.repeats} {v}: +{C.human_bytes(res['peak_increase'])} in {res['seconds']:.1f}s")
        agg = {}
        for v, rs in runs.items():
            first = rs[0]
            agg[v] = {
                **{k: first[k] for k in ("trainable_params", "total_params", "param_bytes", "grad_bytes", "optimizer_state_bytes",
                                         "selected") if k in first},
                "peak_increase_median": C.median(r["peak_increase"] for r in rs),
                "peak_increase_all": [r["peak_increase"] for r in rs],
                "maxrss_before_median": C.median(r["maxrss_before"] for r in rs),
                "step_seconds_median": C.median(r["seconds"] for r in rs),
            }
            if "cuda_peak_increase" in first:
                agg[v]["cuda_peak_increase_median"] = C.median(r["cuda_peak_increase"] for r in rs)
            for key in ("steady_peak_increase", "steady_cuda_peak_increase", "in_use_peak"):
                vals = [r[key] for r in rs if r.get(key) is not None]
                if vals:
                    agg[v][key + "_median"] = C.median(vals)
        f, c = agg["full"], agg["clat"]
        agg["reduction"] = {
            "trainable_params": 1 - c["trainable_params"] / f["trainable_params"],
            "grad_bytes": 1 - c["grad_bytes"] / f["grad_bytes"],
            "optimizer_state_bytes": 1 - c["optimizer_state_bytes"] / f["optimizer_state_bytes"],
            "peak_increase": 1 - c["peak_increase_median"] / f["peak_increase_median"] if f["peak_increase_median"] else None,
            "steady_peak_increase": (1 - c["steady_peak_increase_median"] / f["steady_peak_increase_median"])
            if f.get("steady_peak_increase_median") and c.get("steady_peak_increase_median") is not None else None,
        }
        sel = agg.get("clat_selection", {})
        key = "in_use_peak_median" if "in_use_peak_median" in c else "steady_peak_increase_median"
        fs, cs, ss = f.get(key), c.get(key), sel.get(key)
        agg["targets"] = {  # issue 25: live-heap peaks of a later step or selection (RSS high-water marks without glibc)
            "measure": key.removesuffix("_median"),
            "clat_step_over_full_step": cs / fs if fs and cs is not None else None,
            "clat_step_le_0.7_full": (cs <= 0.7 * fs) if fs and cs is not None else None,
            "clat_recompute_step_over_full_step": agg["clat_recompute"][key] / fs if fs and key in agg.get("clat_recompute", {}) else None,
            "reselection_over_clat_step": ss / cs if cs and ss is not None else None,
            "reselection_le_clat_step": (ss <= cs) if cs and ss is not None else None,
        }
        agg["batch_size"] = bs
        agg["pinned_layer"] = pinned
        agg["runs"] = runs
        results[name] = agg

    for name, agg in results.items():
        f, c = agg["full"], agg["clat"]
        red = agg["reduction"]
        cuda = "cuda_peak_increase_median" in f
        rows = [
            ["trainable parameters", f"{f['trainable_params']:,}", f"{c['trainable_params']:,}", f"{100 * red['trainable_params']:.1f}%"],
            ["gradient bytes", C.human_bytes(f["grad_bytes"]), C.human_bytes(c["grad_bytes"]), f"{100 * red['grad_bytes']:.1f}%"],
            ["SGD momentum state bytes", C.human_bytes(f["optimizer_state_bytes"]), C.human_bytes(c["optimizer_state_bytes"]),
             f"{100 * red['optimizer_state_bytes']:.1f}%"],
            ["peak step memory (1st step, maxrss increase)", C.human_bytes(f["peak_increase_median"]),
             C.human_bytes(c["peak_increase_median"]),
             f"{100 * red['peak_increase']:.1f}%" if red["peak_increase"] is not None else "-"],
            ["steady-state step peak (2nd step, RSS high-water - RSS before)",
             C.human_bytes(f["steady_peak_increase_median"]) if "steady_peak_increase_median" in f else "-",
             C.human_bytes(c["steady_peak_increase_median"]) if "steady_peak_increase_median" in c else "-",
             f"{100 * red['steady_peak_increase']:.1f}%" if red["steady_peak_increase"] is not None else "-"],
            ["live heap peak (3rd step, mallinfo2 sampled)",
             C.human_bytes(f["in_use_peak_median"]) if "in_use_peak_median" in f else "-",
             C.human_bytes(c["in_use_peak_median"]) if "in_use_peak_median" in c else "-",
             f"{100 * (1 - c['in_use_peak_median'] / f['in_use_peak_median']):.1f}%"
             if f.get("in_use_peak_median") and "in_use_peak_median" in c else "-"],
            ["process maxrss before the step", C.human_bytes(f["maxrss_before_median"]), C.human_bytes(c["maxrss_before_median"]), ""],
        ]
        if cuda:
            rows.append(["CUDA peak allocated over the step", C.human_bytes(f["cuda_peak_increase_median"]),
                         C.human_bytes(c["cuda_peak_increase_median"]), ""])
            if "steady_cuda_peak_increase_median" in f:
                rows.append(["CUDA peak allocated, 2nd step", C.human_bytes(f["steady_cuda_peak_increase_median"]),
                             C.human_bytes(c["steady_cuda_peak_increase_median"]), ""])
        print(C.table(["", "full PGD-AT", f"CLAT ({agg['pinned_layer']})", "reduction"], rows,
                      f"{name}, batch {agg['batch_size']} (target: ~95% fewer trainable parameters, paper Table 6)"))
        if "clat_selection" in agg:
            s = agg["clat_selection"]
            print(f"  one CLAT re-selection (criticality on {CRIT_N} images, every 10 epochs): maxrss increase "
                  f"{C.human_bytes(s['peak_increase_median'])}, {s['step_seconds_median']:.1f}s"
                  + (f"; steady (2nd selection) {C.human_bytes(s['steady_peak_increase_median'])}"
                     if "steady_peak_increase_median" in s else "")
                  + (f"; live heap peak (3rd) {C.human_bytes(s['in_use_peak_median'])}" if "in_use_peak_median" in s else ""))
        t = agg["targets"]
        if t["clat_step_over_full_step"] is not None:
            print(f"  target CLAT step peak <= 0.7x full PGD-AT's ({t['measure']}): {t['clat_step_over_full_step']:.2f}x -> "
                  f"{'MET' if t['clat_step_le_0.7_full'] else 'NOT MET'}")
        if t["clat_recompute_step_over_full_step"] is not None:
            r = agg["clat_recompute"]
            print(f"  with clat.recompute=true: CLAT step peak {t['clat_recompute_step_over_full_step']:.2f}x full PGD-AT's -> "
                  f"{'MET' if t['clat_recompute_step_over_full_step'] <= 0.7 else 'NOT MET'} (first step {r['step_seconds_median']:.1f}s "
                  f"vs "
                  f"{c['step_seconds_median']:.1f}s without)")
        if t["reselection_over_clat_step"] is not None:
            print(f"  target re-selection peak <= CLAT step peak ({t['measure']}): {t['reselection_over_clat_step']:.2f}x -> "
                  f"{'MET' if t['reselection_le_clat_step'] else 'NOT MET'}")
        print()
    C.finish(info)
    path = C.write_json("memory" + ("_quick" if args.quick else ""),
                        {"benchmark": "memory", "quick": args.quick, "env": info, "results": results})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
