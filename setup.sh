#!/usr/bin/env bash
# Set up ditkit in ./.venv on a fresh machine: the CPU build of PyTorch first (a plain `torch`
# requirement would pull a multi-GB CUDA build), natten built against it, then ditkit[dev].
# Idempotent: rerunning only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
# natten's build needs torch: no build isolation, or pip fetches a CUDA torch to build it
python -c "import natten" 2>/dev/null || python -m pip install -q --no-build-isolation "natten>=0.21"
python -m pip install -q -e ".[dev]"
echo "ditkit set up in $(pwd)/.venv ($(python -c 'import torch; print("torch", torch.__version__)'))"
