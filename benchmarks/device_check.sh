#!/usr/bin/env bash
# One-shot GPU check of clat on a lent GPU machine (about 9 minutes). Logs and result JSON go to $W; after every
# step they are packed into $OUT/results.tgz (so a run cut short still returns what it measured).
#
#   1. the whole test suite with CUDA visible (device=auto resolves to the GPU in every CLI test),
#   2. benchmarks/gpu_epoch.py: real `clat.train` epochs of paper configs, fp32 / bf16 / fp16, channels-last,
#   3. benchmarks/clat_vs_pgdat.py and benchmarks/memory.py on the GPU.
#
# Expects, in the repository root: shared/data/cifar-10-batches-py (a CIFAR-10 copy; the JPEG-recovered subset
# is fine) and, where pyautoattack is not installed, .whl/site/pyautoattack (a copy of the package). Uses the
# machine's own torch. Each step has its own time limit, so one slow step cannot hide the others.
set -u
OUT=${OUT:-/tmp/device_check_out}
W=${W:-/tmp/device_check}
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PY:-python3}
[ -d .whl/site ] && export PYTHONPATH="$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$W/install.log" 2>&1 \
  || export PYTHONPATH="$PWD/src:${PYTHONPATH:-}"
[ -e ../shared ] || ln -s "$PWD/shared" ../shared 2>/dev/null || true   # tests look for ../shared/data

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc;
  $PY -c "import torch, clat, pyautoattack; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('clat', clat.__file__)"; } \
  >"$W/env.txt" 2>&1
cat "$W/env.txt"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout --signal=INT --kill-after=15 "$secs" "$@" >"$W/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"
  tail -n 25 "$W/$name.log"
  find benchmarks/results -name "*.json" -newer "$W/env.txt" -exec cp {} "$W/" \;
  tar czf "$OUT/results.tgz" -C "$W" .
}

step pytest "${PYTEST_S:-240}" $PY -m pytest -q -m "" tests -n "${WORKERS:-12}" --timeout 200 -p no:cacheprovider --durations=12 -rfE
step gpu_epoch "${EPOCH_S:-200}" $PY benchmarks/gpu_epoch.py --root shared/data --no-verify --budget-s "${EPOCH_BUDGET_S:-140}"
step clat_vs_pgdat "${CVP_S:-75}" $PY benchmarks/clat_vs_pgdat.py --models resnet18 preact_resnet18 --batch-size 128 --repeats 3
step memory "${MEM_S:-50}" $PY benchmarks/memory.py --models resnet18
ls -la "$W"
