#!/usr/bin/env bash
# Download the wheels that `import ditkit` and benchmarks/gpu_check.py need on an offline GPU
# machine whose image already has torch, numpy, PyYAML, safetensors, Pillow, tqdm, pytest,
# onnx, onnxscript and onnxruntime (the image these checks were prepared for: Python 3.12,
# torch 2.11 + CUDA 13). Only pydantic and its helpers are missing there.
#
#   bash benchmarks/fetch_gpu_wheels.sh [PYTHON_VERSION] [DEST]     # defaults: 3.12 benchmarks/wheels
#
# Run it where PyPI is reachable; DEST is git-ignored. Bring DEST along with the working tree
# and install there with
#   python3 -m pip install --no-index --no-deps --find-links benchmarks/wheels \
#       --target /tmp/site benchmarks/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD
# Add EXTRA="name==version ..." to fetch more (e.g. a package the image lacks).
set -euo pipefail
PYVER="${1:-3.12}"
DEST="${2:-$(dirname "$0")/wheels}"
mkdir -p "$DEST"
# pure-Python wheels (any platform)
PURE="pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0"
# compiled: pydantic-core for CPython $PYVER on manylinux x86-64 (the version pydantic pins)
BINARY="pydantic-core==2.50.5"
PIP="${PIP:-python3 -m pip}"
$PIP download --no-deps --only-binary=:all: --dest "$DEST" $PURE ${EXTRA:-}
$PIP download --no-deps --only-binary=:all: --dest "$DEST" --python-version "$PYVER" \
    --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 $BINARY
du -sh "$DEST"
ls -1 "$DEST"
