#!/usr/bin/env bash
# A second Python environment in which diffusers' examples/text_to_image/train_text_to_image.py runs on
# this machine, so benchmarks/train_throughput.py can run it next to `t2i train` as a peer.
#
# The example needs torchvision; PyPI's torchvision wheels are CUDA builds that load only next to a
# CUDA build of torch (which also runs on a CPU). This environment therefore has torch's CUDA build and
# the matching torchvision, and the project's other packages at the versions .venv has; both trainers
# are then measured on the same torch build. It is a benchmark's environment, not the product's.
#
#   bash benchmarks/peer_env.sh [.peer-venv]
#   .peer-venv/bin/python benchmarks/train_throughput.py --startup-only --example /path/to/diffusers-checkout
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.peer-venv}
[ -x .venv/bin/pip ] || { echo "run the README's set-up first (.venv is missing)" >&2; exit 2; }
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
# the same diffusers, transformers, accelerate, ... as the product's environment; torch is the peer's own
.venv/bin/pip freeze --exclude-editable | grep -v -E '^(torch|torchvision|triton|nvidia-)' > "$pins"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "torch==2.14.*" "torchvision==0.29.*"
"$venv/bin/pip" install -q --disable-pip-version-check -c "$pins" -e . datasets tensorboard
"$venv/bin/python" -c "import torch, torchvision.transforms; print('peer environment:', '$venv', 'torch', torch.__version__, 'torchvision', torchvision.__version__)"
