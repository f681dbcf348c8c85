#!/usr/bin/env bash
# Creates .venv and installs t2i-sprint with its dev tools. Safe to re-run (fast when done).
# On a machine without an NVIDIA GPU it pins the CPU build of torch first, because the
# package's own loose `torch` requirement would otherwise pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.t2i-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then exit 0; fi
pip_install() {  # pip's notes about this machine's local mirrors are noise; errors still show
    .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
echo "setting up .venv (first run: about 2 minutes)..." >&2
pip_install --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
    pip_install "torch==2.13.*"
fi
pip_install -e ".[dev]"
touch "$stamp"
