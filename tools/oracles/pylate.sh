#!/usr/bin/env bash
# Creates the PyLate 1.6.0 oracle venv at $1 (default .refs/pylate); `make refs` calls it.
#
# pip cannot resolve pylate 1.6.0 next to torch 2.13.0 on its own: pylate pins fast-plaid, and every
# fast-plaid wheel pins one exact torch release (pip then falls back to pylate 1.2.0). fast-plaid is
# only needed for PLAID indexes, not for models.ColBERT encoding, so pylate goes in with --no-deps
# after its runtime dependencies (reference/offline-models-and-oracles.md section 3).
# Idempotent: an existing venv is reused, and `.ok` is touched last, only when everything worked.
set -euo pipefail

VENV=${1:-.refs/pylate}
PY=${PY:-python3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CONSTRAINTS="$ROOT/constraints.txt"  # pins torch==2.13.0, the CPU wheel

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

"${PIP[@]}" install -c "$CONSTRAINTS" torch==2.13.0
"${PIP[@]}" install -c "$CONSTRAINTS" \
    "transformers==5.3.0" "sentence-transformers==5.3.0" datasets accelerate pandas \
    "ujson==5.12.0" "ninja==1.11.1.4" "fastkmeans==0.5.0" safetensors tokenizers pillow numpy
"${PIP[@]}" install --no-deps "pylate==1.6.0"

# Fail here, not in a test, when the environment cannot even import what the oracle uses.
HF_HUB_OFFLINE=1 "$VENV/bin/python" -c "from pylate import models, scores; import torch; assert torch.__version__.startswith('2.13.0')"
touch "$VENV/.ok"
