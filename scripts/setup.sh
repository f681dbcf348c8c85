#!/usr/bin/env bash
# Creates .venv and installs t2i-sprint with its dev tools. Safe to re-run (fast when done).
# On a machine without an NVIDIA GPU it pins the CPU build of torch first, because the
# package's own loose `torch` requirement would otherwise pull a multi-GB CUDA build.
#   bash scripts/setup.sh        the package (what `t2i` needs)
#   bash scripts/setup.sh test   also Debian's chromium, which the report test renders pages with, and
#                                .venv-compat (scripts/compat_env.sh), where the compat tests run other tools
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "test" ] && ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing chromium (for the report rendering test)..." >&2
        export DEBIAN_FRONTEND=noninteractive
        { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } >/dev/null 2>&1 \
            || echo "could not install chromium; the report rendering test will be skipped" >&2
    else
        echo "chromium not found and cannot be installed here; the report rendering test will be skipped" >&2
    fi
fi
if [ "${1:-}" = "test" ]; then
    bash scripts/compat_env.sh || true  # on failure it leaves the reason for the tests (skip or fail)
fi
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
