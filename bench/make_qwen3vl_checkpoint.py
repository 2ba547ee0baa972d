"""Write the vision benchmark model: a random-weight Qwen3-VL ColQwen3 checkpoint (Tomoro layout) of the
real Qwen3-VL-2B widths and reduced depth.

Widths are Qwen3-VL-2B's: text hidden 2048, 16 heads / 8 KV heads, head_dim 128 (a size vLLM's CPU attention
accepts), MLP 6144, M-RoPE sections [24, 20, 20] interleaved, rope_theta 5e6; vision hidden 1024,
16 heads (head_dim 64), MLP 4096, patch 16, temporal 2, merge 2, a 48x48 learned position grid, output
2048. Depth is cut: 2 text layers (of 28) and 2 vision blocks (of 24) with DeepStack after both (the
real model has three DeepStack mergers, after blocks 5, 11 and 17). Head: Tomoro's
`embedding_proj_layer` [320, 2048] with a bias; the bias is written as zeros because vLLM's ColQwen3
drops a checkpoint's projection bias (vl-families.md §0.2): with zeros both servers compute the same
function, so their vectors can be compared. Layout: Tomoro's (`ColQwen3`, `vlm.model.*`, `vlm.lm_head`).

Tokenizer: the test fixtures' Qwen2-style byte-level BPE with the 14 real Qwen special tokens
(`<|im_start|>`, `<|vision_start|>`, `<|image_pad|>`, ...) after its small vocabulary (so their ids
are 512-525, not Qwen's 151643+; the embedding table has 576 rows, not 151936: the row count does not
change the cost of a forward). Chat template: the fixture's Qwen-VL template.

preprocessor_config.json: Qwen3-VL's (patch 16, merge 2, mean = std = 0.5, min_pixels 65536) with
`max_pixels` 327680 = 320 x 32^2 (at most 320 image tokens per image) instead of the Hub's 16777216 or
Tomoro's 1310720, to keep a CPU benchmark of 8-page requests within minutes; `--max-pixels` changes it.

Weights: seeded N(0, s^2) with s = min(0.2, 1.6/sqrt(fan_in)) for matrices, 1 + 0.1 N for norm weights,
0.05 N for biases, 0.2 N for embeddings (the fixtures' spread rule), written in float32. Deterministic:
the same arguments write the same files.

    .venv/bin/python bench/make_qwen3vl_checkpoint.py .bench/colqwen3-2b-l2 [--max-pixels 327680]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

TEXT = {"hidden": 2048, "layers": 2, "heads": 16, "kv_heads": 8, "head_dim": 128, "intermediate": 6144}
VISION = {"hidden": 1024, "depth": 2, "heads": 16, "intermediate": 4096, "deepstack": [0, 1], "grid": 48}
PATCH, MERGE, TEMPORAL = 16, 2, 2
MROPE_SECTION = [24, 20, 20]
EMBED_DIM = 320
MIN_PIXELS = 65536
MAX_PIXELS = 320 * (PATCH * MERGE) ** 2
SEED = 20261201


def fixture(max_pixels: int = MAX_PIXELS) -> Any:
    """tests.fixtures.colqwen3 with the sizes above (its functions read the module constants at call time),
    so the benchmark model is the test fixtures' Tomoro layout at Qwen3-VL-2B widths."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.fixtures import colqwen3

    sizes = {
        "TEXT_HIDDEN": TEXT["hidden"],
        "TEXT_LAYERS": TEXT["layers"],
        "TEXT_HEADS": TEXT["heads"],
        "TEXT_KV_HEADS": TEXT["kv_heads"],
        "HEAD_DIM": TEXT["head_dim"],
        "TEXT_INTERMEDIATE": TEXT["intermediate"],
        "VISION_HIDDEN": VISION["hidden"],
        "VISION_DEPTH": VISION["depth"],
        "VISION_HEADS": VISION["heads"],
        "VISION_INTERMEDIATE": VISION["intermediate"],
        "DEEPSTACK": VISION["deepstack"],
        "POSITION_GRID": VISION["grid"],
        "PATCH": PATCH,
        "MERGE": MERGE,
        "TEMPORAL": TEMPORAL,
        "MROPE_SECTION": MROPE_SECTION,
        "EMBED_DIM": EMBED_DIM,
        "MIN_PIXELS": MIN_PIXELS,
        "MAX_PIXELS": max_pixels,
    }
    for name, value in sizes.items():
        setattr(colqwen3, name, value)
    return colqwen3


def weights(fx: Any, vocab_size: int, seed: int) -> dict[str, Any]:
    """The fixture's backbone (its spread rule) under Tomoro's `vlm.model.` prefix, then from the same
    generator the lm_head and a projection whose bias is zeros (vLLM's ColQwen3 drops the bias)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    state: dict[str, Any] = {
        f"vlm.model.{k}": v for k, v in fx.qwen3vl_weights(vocab_size, seed, generator=gen).items()
    }
    t = TEXT["hidden"]
    state["vlm.lm_head.weight"] = 0.02 * torch.randn((vocab_size, t), generator=gen, dtype=torch.float32)
    state["embedding_proj_layer.weight"] = (1 / math.sqrt(t)) * torch.randn((EMBED_DIM, t), generator=gen)
    state["embedding_proj_layer.bias"] = torch.zeros(EMBED_DIM)
    return state


def config(fx: Any, ids: dict[str, int]) -> dict[str, Any]:
    """The fixture's Qwen3-VL config (ColQwen3), Tomoro's head fields, no auto_map (vLLM loads it natively)."""
    return {
        **fx._config(["ColQwen3"], "colqwen3", ids),
        "embed_dim": EMBED_DIM,
        "padding_side": "left",
        "initializer_range": 0.02,
    }


def video_preprocessor_config() -> dict[str, Any]:
    """Qwen3-VL's video_preprocessor_config.json (the Hub's values). lateserve serves no video; vLLM's
    Qwen3VLProcessor refuses to load without it ("Unrecognized video processor")."""
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "do_sample_frames": True,
        "fps": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "max_frames": 768,
        "merge_size": MERGE,
        "min_frames": 4,
        "patch_size": PATCH,
        "processor_class": "Qwen3VLProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"longest_edge": 25165824, "shortest_edge": 4096},
        "temporal_patch_size": TEMPORAL,
        "video_processor_type": "Qwen3VLVideoProcessor",
    }


def write_checkpoint(out_dir: Path, *, max_pixels: int = MAX_PIXELS, seed: int = SEED) -> Path:
    from safetensors.torch import save_file

    fx = fixture(max_pixels)
    ids = fx._token_ids()
    out_dir.mkdir(parents=True, exist_ok=True)
    fx._write_json(out_dir / "config.json", config(fx, ids))
    fx._write_json(out_dir / "tokenizer_config.json", fx._tokenizer_config(ids, None))
    fx._write_json(out_dir / "preprocessor_config.json", fx.preprocessor_config())
    fx._write_json(out_dir / "video_preprocessor_config.json", video_preprocessor_config())
    fx.bpe_tokenizer().save(str(out_dir / "tokenizer.json"), pretty=True)
    state = weights(fx, fx._vocab_size(ids), seed)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"), {"format": "pt"})
    return out_dir


def describe() -> str:
    return (
        f"ColQwen3 (Tomoro layout), Qwen3-VL-2B widths: text hidden {TEXT['hidden']} x {TEXT['layers']} layers "
        f"({TEXT['heads']} heads / {TEXT['kv_heads']} KV, head_dim {TEXT['head_dim']}, MLP {TEXT['intermediate']}); "
        f"vision hidden {VISION['hidden']} x {VISION['depth']} blocks ({VISION['heads']} heads, MLP "
        f"{VISION['intermediate']}), DeepStack after blocks {VISION['deepstack']}; projection {EMBED_DIM}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, nargs="?", default=ROOT / ".bench/colqwen3-2b-l2")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS)
    args = p.parse_args()
    write_checkpoint(args.out, max_pixels=args.max_pixels)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out} ({size / 1e6:.0f} MB): {describe()}")


if __name__ == "__main__":
    main()
