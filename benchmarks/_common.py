"""Shared helpers of the benchmarks: environment record, data, interleaved timing,
FLOP counting, the training step (the loop's own, :class:`clat.training.stage.Stage`), tables, JSON.

Nothing here re-implements clat: a benchmark trains through the Stage that ``clat.train`` uses.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"

# The training hyper-parameters of clat's stages (config.StageConfig), except a
# small lr: timings do not depend on it and random-label steps stay finite.
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4


# --------------------------------------------------------------------------- environment
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git() -> dict:
    def run(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": run("rev-parse", "HEAD"), "dirty_files": len([l for l in run("status", "--porcelain").splitlines() if l.strip()])}


def env_info() -> dict:
    info = {
        "command": " ".join([os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else sys.executable,
                             *[os.path.relpath(a, REPO) if a.endswith(".py") and os.path.isabs(a) else a for a in sys.argv]]),
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "arch": platform.machine(),
            "os_cpu_count": os.cpu_count(),
            "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "mem_total_gib": _mem_total_gib(),
        },
        "cuda": torch.cuda.is_available(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git": _git(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    try:
        import clat

        info["clat"] = getattr(clat, "__version__", "?")
    except ImportError:  # pragma: no cover
        pass
    return info


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def finish(info: dict) -> None:
    """Record the load at the end and how many timings other processes disturbed; warn if any."""
    info["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    c = contention_summary()
    info["contention"] = c
    if c["contended_kept"]:
        print(f"\nWARNING: {c['contended_kept']} of {c['measurements']} timed measurements ran while other processes used "
              f"> {CONTENDED_CORES} cores (up to {c['max_other_cores']:.2f}) even after retries: these timings are unreliable; "
              "rerun on a quiet machine.")
    elif c["retried"]:
        print(f"\nnote: {c['retried']} of {c['measurements']} measurements were disturbed by other processes and repeated.")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def write_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(o):
    if isinstance(o, (torch.Tensor,)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def log(msg: str) -> None:
    """Progress to stderr (the table goes to stdout)."""
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data
def timing_parser(doc: str, models: Sequence[str], default: Sequence[str], repeats: str) -> argparse.ArgumentParser:
    """The options every timing benchmark shares: --quick (tiny_cnn only), --models, --repeats, --min-time."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny_cnn only: a smoke test (< 1 min)")
    ap.add_argument("--models", nargs="+", choices=list(models), help=f"default: {' '.join(default)} (--quick: tiny_cnn)")
    ap.add_argument("--repeats", type=int, help=repeats)
    ap.add_argument("--min-time", type=float, help="seconds per timed measurement at least (short calls are repeated; default 1, --quick "
                                                   "0.5)")
    return ap


def timing_args(ap: argparse.ArgumentParser, default: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parsed options with --min-time's default filled in, and the models to time."""
    args = ap.parse_args()
    if args.min_time is None:
        args.min_time = 0.5 if args.quick else 1.0
    return args, args.models or (["tiny_cnn"] if args.quick else list(default))


def real_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``n`` training images in [0, 1] and labels: the CIFAR-10 subset bundled with clat
    (3,000 images; cycled if more are asked), or uniform noise if it cannot be read."""
    try:
        from clat.data.loader import load_bundled

        xtr, ytr, _, _ = load_bundled()
        idx = torch.arange(n) % len(xtr)
        return xtr[idx].float().div_(255), ytr[idx].clone(), "bundled CIFAR-10 subset"
    except Exception as e:  # noqa: BLE001 - the benchmarks must run even if data loading changes
        log(f"note: bundled CIFAR-10 subset not readable ({type(e).__name__}: {e}); using uniform noise images")
        g = torch.Generator().manual_seed(seed)
        return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g), "uniform noise"


def build_model(name: str, seed: int = 0) -> nn.Module:
    import clat

    torch.manual_seed(seed)
    return clat.create_model(name, 10).to(device()).train()


# --------------------------------------------------------------------------- training step
def as_shipped(model: nn.Module, channels_last: bool | str = "auto") -> tuple[nn.Module, bool]:
    """``model`` in the memory format ``clat train`` resolves ``channels_last`` to on its device (default ``auto``:
    as clat ships, fp32), and whether that is NHWC."""
    from clat.training.stage import resolve_channels_last

    cl = resolve_channels_last(channels_last, next(model.parameters()).device)
    return (model.to(memory_format=torch.channels_last) if cl else model), cl


class Trainer:
    """One method on its own copy of a model, trained by a :class:`clat.training.stage.Stage` (the loop's own set-up
    and step) with SGD at the stage defaults' momentum and weight decay; ``step(x, y)`` is one training step.
    ``channels_last``: the memory format, resolved as ``clat train`` resolves it (default ``auto``: as shipped)."""

    def __init__(self, method, model: nn.Module, *, selection: Sequence[str] | None = None, sample_batch=None,
                 channels_last: bool | str = "auto") -> None:
        from clat.methods.base import EpochContext
        from clat.training.stage import Stage, StepRunner

        self.method = method
        model, cl = as_shipped(model, channels_last)
        self.model = model
        self.stage = Stage(model, method, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                           runner=StepRunner(model, next(model.parameters()).device, channels_last=cl))
        self.opt = self.stage.optimizer
        if selection is not None:
            # Pinned layers: restore a selection (as on resume) so that on_epoch_start only freezes,
            # without spending a criticality run on a selection that is fixed anyway.
            method.load_state_dict({"selected": list(selection), "history": [], "lam": getattr(method, "lam", 0.0)})
        if sample_batch is None:
            def sample_batch(n: int):
                raise RuntimeError("no sample_batch given")
        ctx = EpochContext(epoch=0, stage_epoch=0, sample_batch=sample_batch, generator=torch.Generator().manual_seed(0))
        self.events = self.stage.begin_epoch(ctx)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.stage.step(x, y)


def fresh_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


# --------------------------------------------------------------------------- timing
# Another process busy on the same cores ruins timings: with OpenMP threads spinning at
# barriers, a PyTorch step on 2 cores can run 10-70x slower while a second process computes.
# Each measurement therefore records the CPU time the rest of the machine used meanwhile
# (/proc/stat busy time, steal included, minus this process's own CPU time); a measurement
# during which others used more than CONTENDED_CORES cores on average is repeated (up to
# max_retries times) and, if still contended, kept and flagged.
CONTENDED_CORES = 0.2
_CONTENTION: list[dict] = []


def _machine_busy_s() -> float | None:
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def measure(fn: Callable[[], None], inner: int = 1) -> tuple[float, float | None]:
    """(seconds per call, cores used by other processes meanwhile or None if unknown)."""
    sync()
    b0, c0 = _machine_busy_s(), _own_cpu_s()
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    sync()
    wall = time.perf_counter() - t0
    b1, c1 = _machine_busy_s(), _own_cpu_s()
    other = None if (b0 is None or b1 is None) else max(0.0, (b1 - b0) - (c1 - c0)) / wall
    return wall / inner, other


def interleaved(fns: dict[str, Callable[[], None]], repeats: int, *, warmup: int = 1, min_time: float = 0.0,
                max_retries: int = 2, label: str = "") -> dict[str, list[float]]:
    """Seconds per call of each callable, ``repeats`` rounds, interleaving the variants
    (the order is rotated every round, so drifts and noise hit every variant alike).

    ``warmup`` untimed calls of each variant come first (allocations, oneDNN primitive
    caches). With ``min_time``, each timed measurement repeats the call ``inner`` times
    (the same for every variant) so that the fastest variant's measurement lasts about
    ``min_time`` seconds; the per-call time is reported. A measurement disturbed by
    another busy process is retried (see CONTENDED_CORES).
    """
    names = list(fns)
    warm: dict[str, float] = {}
    for _ in range(warmup):
        for n in names:
            warm[n], other = measure(fns[n])
            busy_note = f"  (other processes: {other:.2f} cores)" if other and other > CONTENDED_CORES else ""
            log(f"  {label} warm-up {n}: {warm[n]:.2f}s" + busy_note)
    inner = max(1, math.ceil(min_time / min(warm.values()))) if (min_time > 0 and warm) else 1
    if inner > 1:
        log(f"  {label} {inner} calls per timed measurement")
    times: dict[str, list[float]] = {n: [] for n in names}
    failed_in_a_row = 0  # measurements still contended after all retries, consecutively
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            retries = max_retries if failed_in_a_row < 2 else 0  # persistently busy machine: stop spending time on retries
            for attempt in range(retries + 1):
                dt, other = measure(fns[n], inner)
                busy = other is not None and other > CONTENDED_CORES
                again = ", retrying" if busy and attempt < retries else ""
                note = f"  (other processes used {other:.2f} cores: contended{again})" if busy else ""
                log(f"  {label} round {r + 1}/{repeats} {n}: {dt:.3f}s per call{note}")
                if not busy:
                    break
                if attempt < retries:
                    time.sleep(2.0)
            failed_in_a_row = failed_in_a_row + 1 if busy else 0
            _CONTENTION.append({"label": label, "variant": n, "round": r, "seconds": dt, "other_cores": other,
                                "contended": busy, "attempts": attempt + 1})
            times[n].append(dt)
    return times


def contention_summary() -> dict:
    kept = [c for c in _CONTENTION if c["contended"]]
    return {"threshold_other_cores": CONTENDED_CORES, "measurements": len(_CONTENTION),
            "retried": sum(c["attempts"] > 1 for c in _CONTENTION), "contended_kept": len(kept),
            "max_other_cores": max((c["other_cores"] or 0.0 for c in _CONTENTION), default=0.0), "detail": _CONTENTION}


def median(v: Iterable[float]) -> float:
    return statistics.median(list(v))


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per-round ratios a/b (the two were timed in the same round)."""
    return [x / y for x, y in zip(a, b)]


def summary(ts: Sequence[float]) -> dict:
    return {"median_s": median(ts), "min_s": min(ts), "max_s": max(ts), "times_s": list(ts)}


# --------------------------------------------------------------------------- FLOPs
def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of matmul/conv ops (forward and backward) run by ``fn``, as counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (BatchNorm, ReLU, element-wise ops
    and the optimizer are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def forward_fraction(model: nn.Module, layer, x: torch.Tensor) -> tuple[float, int, int]:
    """p = FLOPs of a forward pass that stops right after ``layer`` (clat.FeatureExtractor,
    stop_early=True, the pass CLAT's attack runs) / FLOPs of a full forward pass."""
    from clat.layers.capture import FeatureExtractor

    ext = FeatureExtractor(model, [layer])
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            part = count_flops(lambda: ext(x, stop_early=True))
            full = count_flops(lambda: model(x))
    finally:
        model.train(was)
    return part / full, part, full


# --------------------------------------------------------------------------- output
def table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> str:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    right = [all(_numeric(r[i]) for r in cells) for i in range(len(headers))]
    def line(vals):
        return "  ".join(v.rjust(w) if rt else v.ljust(w) for v, w, rt in zip(vals, widths, right))
    out = []
    if title:
        out.append(title)
    out.append(line(headers))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def _numeric(s: str) -> bool:
    s = s.strip().rstrip("%x").replace(",", "")
    try:
        float(s)
        return True
    except ValueError:
        return s in ("-", "")


def _fmt(c: object) -> str:
    if isinstance(c, float):
        return f"{c:.3f}"
    return str(c)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def header(title: str, info: dict, extra: str = "") -> None:
    print(f"== {title} ==")
    m = info["machine"]
    print(f"torch {info['torch']}, {info['torch_num_threads']} threads, {m['cpu']} ({m['os_cpu_count']} CPUs), "
          f"{'CUDA ' + info.get('cuda_device', '') if info['cuda'] else 'no GPU'}, {info['date']}")
    if extra:
        print(extra)
    print()
