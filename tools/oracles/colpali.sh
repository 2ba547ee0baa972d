#!/usr/bin/env bash
# Creates the colpali-engine 0.3.18 oracle venv at $1 (default .refs/colpali); `make refs` calls it.
# tests/oracles/colpali_oracle.py runs in it: ColQwen3 / ColQwen3_5 models and processors encode text
# queries (process_queries) and image documents (process_images) the way the ColQwen models were trained.
#
# Pins and pitfalls (reference/offline-models-and-oracles.md section 3):
# * colpali-engine imports transformers' torchvision-backed Qwen2-VL image processor at import time, and
#   the only torchvision that imports here is the on-disk pair torch 2.14.1 + torchvision 0.29.1 (a
#   CUDA build that runs on the CPU; it pulls the nvidia-* runtime wheels, which also lie on disk).
#   The project's constraints.txt (torch==2.13.0) is therefore NOT used in this venv; its own pins are.
# * colpali-engine 0.3.18 declares torch<2.14.0, so it goes in with --no-deps after its runtime
#   dependencies (numpy, peft, pillow, requests, scipy, torch, torchvision, transformers).
# * transformers is pinned to the main venv's 5.24.0, so the oracle and lateserve's raw-mode reference
#   run the same Qwen3-VL code.
# Idempotent: an existing venv is reused, and `.ok` is touched last, only when everything worked.
# Size and time from nothing on the 2-core machine (all wheels local): 5.8 GB, about 80 s.
set -euo pipefail

VENV=${1:-.refs/colpali}
PY=${PY:-python3}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
CONSTRAINTS="$VENV/constraints-colpali.txt"
printf 'torch==2.14.1\ntorchvision==0.29.1\ntransformers==5.24.0\n' >"$CONSTRAINTS"

"${PIP[@]}" install -c "$CONSTRAINTS" torch==2.14.1 torchvision==0.29.1
"${PIP[@]}" install -c "$CONSTRAINTS" \
    "transformers==5.24.0" "peft>=0.18,<0.21" safetensors tokenizers pillow numpy scipy requests
"${PIP[@]}" install --no-deps "colpali-engine==0.3.18"

# Fail here, not in a test, when the environment cannot even import what the oracle uses.
HF_HUB_OFFLINE=1 "$VENV/bin/python" -c "
import torch, torchvision, transformers
from colpali_engine.models import ColQwen3, ColQwen3Processor
assert torch.__version__.startswith('2.14.1'), torch.__version__
assert transformers.__version__ == '5.24.0', transformers.__version__
"
touch "$VENV/.ok"
