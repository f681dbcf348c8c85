#!/usr/bin/env bash
# Creates .venv-compat: a second environment with the tools users already run on what this project
# writes, at the versions they pin: Optimum's ONNX Runtime pipelines (optimum[onnxruntime], which
# requires transformers < 4.58, so transformers 4.57) and the diffusers that resolves beside it.
# Tests marked `compat` run code there in a subprocess (tests/compat_worker.py, no code of ours).
# Safe to re-run (fast when done). First run: about a minute and 1.3 GB.
# When it cannot be built, it says why in a file the tests read:
#   .venv-compat/UNAVAILABLE  the package registry cannot be reached: the compat tests are skipped
#   .venv-compat/FAILED       anything else (a resolution conflict, an import error): they fail
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-compat
stamp=$VENV/.t2i-compat-installed
if [ -f "$stamp" ] && [ "$stamp" -nt scripts/compat_env.sh ]; then exit 0; fi
give_up() {  # give_up FILE REASON
    mkdir -p "$VENV" && echo "$2" > "$VENV/$1"
    echo "compat env not built: $2 (tests marked compat will be $( [ "$1" = FAILED ] && echo failed || echo skipped ))" >&2
    exit 1
}
PY=${PYTHON:-python3}
rm -f "$VENV/UNAVAILABLE" "$VENV/FAILED" "$stamp"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV" || give_up FAILED "python -m venv failed"
echo "setting up $VENV (transformers 4.x + Optimum ONNX Runtime; first run: about a minute)..." >&2
log=$VENV/install.log
pip=("$VENV/bin/python" -m pip --disable-pip-version-check --timeout 60 --retries 2)
# torch==2.13.* keeps the CPU build on a machine without a GPU (a loose torch pulls a multi-GB CUDA
# build); the others are what users of Optimum's ONNX Runtime pipelines get today.
if ! "${pip[@]}" install -q "torch==2.13.*" "optimum[onnxruntime]==2.1.*" "optimum-onnx==0.1.*" \
        "transformers==4.57.*" "diffusers" "safetensors" "pillow" "numpy" > "$log" 2>&1; then
    if ! timeout 120 "${pip[@]}" index versions optimum >> "$log" 2>&1; then
        give_up UNAVAILABLE "the package registry cannot be reached (see $log)"
    fi
    give_up FAILED "pip install failed: $(grep -m1 -E '^ERROR' "$log" || tail -n1 "$log") (see $log)"
fi
"$VENV/bin/python" -c "import optimum.onnxruntime, diffusers, transformers" >> "$log" 2>&1 \
    || give_up FAILED "the installed packages do not import (see $log)"
touch "$stamp"
