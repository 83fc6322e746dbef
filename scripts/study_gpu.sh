#!/usr/bin/env bash
# More seeds of the study (scripts/study.py) on one GPU: one worker process per arm, all at once. A step of the
# study's 0.7M-parameter ResNet is launch-bound on a GPU, so nine processes share one GPU well. Every worker
# runs `scripts/study.py --seeds SEEDS --arms ARM --no-report` and writes into study/ like the CPU run does
# (each result records its device); render docs/results.md afterwards with `python scripts/study.py --report`.
#
#   bash scripts/study_gpu.sh 3 4 5            # the seeds; HOURS=0.12 bounds each worker (default 1)
#
# Settings (environment): PY (python), HOURS, ARMS (default: every arm of scripts/study_settings.py), LOGS (worker logs),
# STUDY_ARGS (passed to every worker, e.g. "--smoke DIR") with STUDY_DIR (the study/ folder it writes, to pack).
#
# With $OUT set (a lent device machine), what the workers wrote under study/ (results, attack chunks, trained
# but unevaluated weights in study/partial/) and the logs are packed into $OUT/study.tgz.00, .01, ... every
# 30 s and at the end, so a run cut short still returns every finished piece: `cat study.tgz.* | tar xz` in
# your checkout. (A device's copy of study/ is reset from the working tree at each call: fetch before the next.)
# Measured on one H100 (seed 3, study/logs/gpu_seed3/): training an arm takes 24-50 s, PGD-20x5 11 s, and an
# AutoAttack chunk of 250 images about 185 s with nine workers sharing the GPU. Expects the CIFAR-10 copy of the CPU study
# (../shared/data, or ./shared/data, linked to ../shared) and, where pyautoattack is not installed,
# .whl/site/pyautoattack.
set -u
[ $# -ge 1 ] || { echo "usage: bash scripts/study_gpu.sh SEED [SEED ...]" >&2; exit 2; }
PY=${PY:-python3}
HOURS=${HOURS:-1}
LOGS=${LOGS:-runs/study_gpu_logs}
STUDY_DIR=${STUDY_DIR:-study}
STUDY_ARGS=${STUDY_ARGS:-}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
[ -d .whl/site ] && export PYTHONPATH="$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import clat" 2>/dev/null || $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 \
  || export PYTHONPATH="$PWD/src:${PYTHONPATH:-}"
[ -e ../shared ] || ln -s "$PWD/shared" ../shared 2>/dev/null || true
mkdir -p "$LOGS" && touch "$LOGS/.start"  # pack() returns what is newer than this
$PY -c "import torch, clat, pyautoattack; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" || exit 1
ARMS=${ARMS:-$($PY -c "import sys; sys.path.insert(0, 'scripts'); import study_settings; print(' '.join(study_settings.ARMS))")} || exit 1
# the items every arm shares (pretraining, λ, ...) must be done first, or nine workers would all run them
$PY scripts/study.py $STUDY_ARGS --seeds "$@" --arms ${ARMS%% *} --no-report --check-shared || exit 1

pack() {  # in parts of 15 MiB (a returned file may not exceed 16 MiB): cat study.tgz.* | tar xz
  [ -n "${OUT:-}" ] || return 0
  local next=$LOGS/.pack
  mkdir -p "$next" && rm -f "$next/"*
  find "$STUDY_DIR" "$LOGS" -type f -newer "$LOGS/.start" ! -path "*/.pack/*" -print0 \
    | tar czf - --null -T - 2>/dev/null | split -b 15m -d - "$next/study.tgz." \
    && rm -f "$OUT/study.tgz."* && mv "$next/"* "$OUT/"
}
if [ -n "${OUT:-}" ]; then (while sleep 30; do pack; done) & PACKER=$!; fi

t0=$SECONDS
pids=()
for arm in $ARMS; do
  $PY scripts/study.py $STUDY_ARGS --hours "$HOURS" --seeds "$@" --arms "$arm" --no-report >"$LOGS/$arm.log" 2>&1 &
  pids+=($!)
done
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
[ -n "${PACKER:-}" ] && kill "$PACKER" 2>/dev/null
pack
echo "== all workers ended in $((SECONDS - t0)) s (failures: $fail)"
for arm in $ARMS; do echo "-- $arm"; grep -v ": epoch " "$LOGS/$arm.log" | tail -n 4; done
exit $fail
