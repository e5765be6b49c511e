#!/usr/bin/env bash
# The host's virtual environment (VENV, default .venv) from uv.lock, exactly: every package at the
# version and hashes the lock pins, vaeserve itself editable, built by the lock's grpcio-tools.
# `make main` and `make test` run it; so does CI through `make test`.
#   PYTHON   a CPython 3.11 (the lock's interpreter, as in the images); default python3
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# What the host installs: everything but the CUDA image's onnxruntime-gpu.
SETS=(--extra train --extra diffusers --extra embed --extra store --extra ray --extra test
      --group build --group peers --group tools)

"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else
  f"vaeserve is locked for CPython 3.11 (uv.lock); {sys.executable} is {sys.version.split()[0]}: set PYTHON=")'
if [ ! -f /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl ]; then
  echo "setup: uv.lock takes torch's CPU build from /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl," \
    "which is not on this machine: put PyTorch's file of that name there (its hash is checked)" >&2
  exit 1
fi
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
# uv itself, at the version and hashes uv.lock records (its tools group), before it reads the lock.
pin=$(mktemp)
trap 'rm -f "$pin"' EXIT
"$VENV/bin/python" scripts/locked.py uv > "$pin"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r "$pin"
export UV_PROJECT_ENVIRONMENT="$VENV"
# vaeserve builds without isolation (pyproject.toml), so the build group goes in first.
"$VENV/bin/uv" sync --quiet --frozen --no-install-project "${SETS[@]}"
"$VENV/bin/uv" sync --quiet --frozen "${SETS[@]}"
"$VENV/bin/python" -c 'import grpc, vaeserve._proto.vae_pb2_grpc as stubs
assert stubs.GRPC_GENERATED_VERSION == grpc.__version__, (stubs.GRPC_GENERATED_VERSION, grpc.__version__)'
echo "setup: $VENV from uv.lock ($("$VENV/bin/uv" pip list --python "$VENV/bin/python" 2>/dev/null | tail -n +3 | wc -l) packages)"
