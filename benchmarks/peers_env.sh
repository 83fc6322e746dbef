#!/usr/bin/env bash
# Create benchmarks/.venv-peers: clat plus the peer implementations that benchmarks/peers.py
# compares against (ART, torchattacks). The peers are NOT dependencies of clat.
#
#   bash benchmarks/peers_env.sh
#   benchmarks/.venv-peers/bin/python benchmarks/peers.py
#
# torch is pinned to the version clat's Makefile installs (override: TORCH="torch==X.Y.Z");
# it goes in with the first install, so no later step can swap it. torchattacks declares torchvision as a
# dependency but does not need it for PGD: it is installed with --no-deps. clat itself is
# installed editable with --no-deps, then only the two packages it imports at load time
# (PyYAML, safetensors) are added, so that nothing else can change torch. pip then reports
# that clat's other requirements (matplotlib, pyautoattack) are missing: harmless here,
# the benchmarks do not use them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV=benchmarks/.venv-peers
TORCH="${TORCH:-torch==2.13.0}"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install "$TORCH" numpy packaging adversarial-robustness-toolbox
"$VENV/bin/pip" install --no-deps torchattacks
"$VENV/bin/pip" install --no-deps -e .
"$VENV/bin/pip" install pyyaml safetensors
"$VENV/bin/python" -c "import torch, art, torchattacks, clat; print('torch', torch.__version__, '| art', art.__version__, '| torchattacks', torchattacks.__version__, '| clat', clat.__version__)"
