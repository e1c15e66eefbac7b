#!/usr/bin/env bash
# Create (or reuse) .venv and install psp-fl into it. Sourced by the Makefile targets.
# On a machine without torch this installs torch 2.13.0 first: on the CPU machines we use that is a
# wheel already on disk, while a bare 'torch' requirement would pull a multi-GB CUDA build.
# GPU users: create .venv with your own CUDA torch build first; it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]"
