#!/usr/bin/env bash
# Creates the FlagEmbedding 1.4.2 oracle venv (BGE-M3 dense / sparse / colbert reference) at $1.
# Idempotent: an existing venv is reused and the pins re-applied; `$1/.ok` is touched last.
#   PY=python3 bash tools/oracles/flagembedding.sh .refs/flagembedding
# Pins (see shared/reference/offline-models-and-oracles.md §3): FlagEmbedding imports
# transformers.modeling_attn_mask_utils, gone in transformers 5, so transformers<5;
# datasets==4.0.0 because newer datasets need a newer huggingface-hub than transformers 4 allows.
set -euo pipefail

dest=${1:?usage: flagembedding.sh VENV_DIR}
py=${PY:-python3}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
constraints="$root/constraints.txt"  # torch==2.13.0 (CPU wheel)

rm -f "$dest/.ok"
[ -x "$dest/bin/python" ] || "$py" -m venv "$dest"
pip=("$dest/bin/python" -m pip --disable-pip-version-check install -q -c "$constraints")
"${pip[@]}" torch==2.13.0
"${pip[@]}" FlagEmbedding==1.4.2 "transformers<5" "datasets==4.0.0" "sentence-transformers<5.2" \
	safetensors tokenizers numpy
# Smoke test: the import that fails with transformers 5, and the CPU torch the pin asked for.
HF_HUB_OFFLINE=1 "$dest/bin/python" -c \
	"from FlagEmbedding import BGEM3FlagModel; import torch; assert torch.__version__.startswith('2.13.0')"
touch "$dest/.ok"
