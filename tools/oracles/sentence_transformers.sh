#!/usr/bin/env bash
# Creates the Sentence-Transformers 6.2.0 oracle venv at $1 (default .refs/sentence_transformers);
# `make refs` calls it. tests/oracles/sentence_transformers_oracle.py runs in it: SentenceTransformer.encode
# for bi-encoder checkpoints and CrossEncoder.predict for cross-encoders.
#
# Pins: sentence-transformers 6.2.0 with transformers 5.24.0 install next to torch 2.13.0 (CPU wheel) and
# load Sentence-Transformers layouts offline (reference/offline-models-and-oracles.md section 3).
# Idempotent: an existing venv is reused, and `.ok` is touched last, only when everything worked.
set -euo pipefail

VENV=${1:-.refs/sentence_transformers}
PY=${PY:-python3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CONSTRAINTS="$ROOT/constraints.txt"  # pins torch==2.13.0, the CPU wheel

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

"${PIP[@]}" install -c "$CONSTRAINTS" torch==2.13.0
"${PIP[@]}" install -c "$CONSTRAINTS" \
    "transformers==5.24.0" "sentence-transformers==6.2.0" safetensors tokenizers numpy

# Fail here, not in a test, when the environment cannot even import what the oracle uses.
HF_HUB_OFFLINE=1 "$VENV/bin/python" -c "
import sentence_transformers, torch, transformers
from sentence_transformers import CrossEncoder, SentenceTransformer
assert torch.__version__.startswith('2.13.0'), torch.__version__
assert sentence_transformers.__version__ == '6.2.0', sentence_transformers.__version__
assert transformers.__version__ == '5.24.0', transformers.__version__
"
touch "$VENV/.ok"
