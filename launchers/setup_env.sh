#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install dsgrow into it.
#
# Idempotent: a second call with unchanged setup.py returns in about a second. Order matters:
# DeepSpeed ships as a source package whose setup imports torch, so torch goes in first and
# DeepSpeed is installed without build isolation (an isolated build would fetch the newest
# torch, with gigabytes of CUDA wheels, just to read its version).
#   DSGROW_TORCH   torch requirement to install (default torch==2.13.0; a CPU wheel where the
#                  machine provides one, the CUDA build from PyPI elsewhere)
#   DSGROW_VENV    venv location (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DSGROW_VENV:-.venv}
TORCH_REQ=${DSGROW_TORCH:-torch==2.13.0}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.dsgrow-installed"
want="$(cat setup.py launchers/setup_env.sh | sha256sum | cut -d' ' -f1) $TORCH_REQ"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip setuptools wheel
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  pip install "$TORCH_REQ"
fi
pip install --no-build-isolation "deepspeed>=0.16,<0.20"
pip install -e ".[dev]"
echo "$want" > "$stamp"
