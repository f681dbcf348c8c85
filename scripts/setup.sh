#!/usr/bin/env bash
# Creates .venv and installs t2i-sprint with its dev tools. Safe to re-run (fast when done).
# On a machine without an NVIDIA GPU it pins the CPU build of torch first, because the
# package's own loose `torch` requirement would otherwise pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
stamp=.venv/.t2i-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then exit 0; fi
python -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q "torch==2.13.*"
fi
python -m pip install -q -e ".[dev]"
touch "$stamp"
