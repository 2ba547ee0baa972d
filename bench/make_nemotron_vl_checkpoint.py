"""Random-weight Llama-Nemotron-VL checkpoints at llama-nemotron-{embed,rerank}-vl-1b-v2 widths, reduced depth.

The on-disk layouts are exactly those of tests/fixtures/nemotron_vl.py (which mirrors NVIDIA's two Hub
repositories): this module sets that fixture's size constants to realistic values and calls its writers, so
the layout, tokenizer and seeded spread-rule weights come from one place.

| part | here | 1b-v2 (vl-families.md §3) |
|---|---|---|
| language (bidirectional Llama) | hidden 2048, **2 layers**, 32 / 8 KV heads, head_dim 64, MLP 8192 | 16 layers |
| vision (SigLIP) | hidden 1152, **2 layers**, 16 heads, MLP 4304, 512 px tiles, 16 px patches | 27 layers |
| tiles | 512 px, pixel shuffle 0.5 -> 256 tokens a tile, max_input_tiles 6 + thumbnail | the same |
| vocabulary | the fixtures' byte-level BPE + the Llama-3 / InternVL specials (~0.6k rows) | 128k rows |

    .venv/bin/python bench/make_nemotron_vl_checkpoint.py [--out-dir .bench]
        -> .bench/nemotron-rerank-vl-l2 and .bench/nemotron-embed-vl-l2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"

SIZES = {
    "LLM_HIDDEN": 2048,
    "LLM_LAYERS": 2,
    "LLM_HEADS": 32,
    "LLM_KV_HEADS": 8,
    "HEAD_DIM": 64,
    "LLM_INTERMEDIATE": 8192,
    "VIT_HIDDEN": 1152,
    "VIT_LAYERS": 2,
    "VIT_HEADS": 16,
    "VIT_INTERMEDIATE": 4304,
    "TILE": 512,
    "PATCH": 16,
    "MAX_TILES": 6,
    "TEMPERATURE": 1.0,
}


def fixture() -> Any:
    """tests.fixtures.nemotron_vl with the sizes above (its functions read the module constants at call time)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.fixtures import nemotron_vl

    for name, value in SIZES.items():
        setattr(nemotron_vl, name, value)
    nemotron_vl.TOKENS_PER_TILE = int((nemotron_vl.TILE // nemotron_vl.PATCH) ** 2 * nemotron_vl.DOWNSAMPLE**2)
    return nemotron_vl


def describe() -> str:
    s = SIZES
    return (
        f"Llama-Nemotron-VL random weights: Llama hidden {s['LLM_HIDDEN']} x {s['LLM_LAYERS']} layers "
        f"({s['LLM_HEADS']}/{s['LLM_KV_HEADS']} heads, MLP {s['LLM_INTERMEDIATE']}), SigLIP hidden {s['VIT_HIDDEN']} x "
        f"{s['VIT_LAYERS']} layers, {s['TILE']} px tiles / {s['PATCH']} px patches, "
        f"max {s['MAX_TILES']} tiles + thumbnail"
    )


def write_checkpoints(out_dir: Path = BENCH) -> tuple[Path, Path]:
    fx = fixture()
    rerank = fx.write_nemotron_rerank_vl(out_dir / "nemotron-rerank-vl-l2")
    embed = fx.write_nemotron_embed_vl(out_dir / "nemotron-embed-vl-l2")
    return rerank, embed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=BENCH)
    args = p.parse_args()
    for path in write_checkpoints(args.out_dir):
        size = sum(f.stat().st_size for f in path.iterdir()) / 1e6
        print(f"{path}: {size:.0f} MB")
    print(describe())


if __name__ == "__main__":
    main()
