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
import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TEXT = {"hidden": 2048, "layers": 2, "heads": 16, "kv_heads": 8, "head_dim": 128, "intermediate": 6144}
VISION = {"hidden": 1024, "depth": 2, "heads": 16, "intermediate": 4096, "deepstack": [0, 1], "grid": 48}
PATCH, MERGE, TEMPORAL = 16, 2, 2
MROPE_SECTION = [24, 20, 20]
EMBED_DIM = 320
MIN_PIXELS = 65536
MAX_PIXELS = 320 * (PATCH * MERGE) ** 2
MAX_POSITIONS = 262144
SEED = 20261201


def shapes(vocab_size: int) -> list[tuple[str, tuple[int, ...]]]:
    """Qwen3VLModel's tensors under transformers' names (`visual.*`, `language_model.*`)."""
    v, t, hd = VISION["hidden"], TEXT["hidden"], TEXT["head_dim"]
    out: list[tuple[str, tuple[int, ...]]] = [
        ("visual.patch_embed.proj.weight", (v, 3, TEMPORAL, PATCH, PATCH)),
        ("visual.patch_embed.proj.bias", (v,)),
        ("visual.pos_embed.weight", (VISION["grid"] ** 2, v)),
    ]
    for i in range(VISION["depth"]):
        b = f"visual.blocks.{i}"
        out += [
            (f"{b}.norm1.weight", (v,)),
            (f"{b}.norm1.bias", (v,)),
            (f"{b}.norm2.weight", (v,)),
            (f"{b}.norm2.bias", (v,)),
            (f"{b}.attn.qkv.weight", (3 * v, v)),
            (f"{b}.attn.qkv.bias", (3 * v,)),
            (f"{b}.attn.proj.weight", (v, v)),
            (f"{b}.attn.proj.bias", (v,)),
            (f"{b}.mlp.linear_fc1.weight", (VISION["intermediate"], v)),
            (f"{b}.mlp.linear_fc1.bias", (VISION["intermediate"],)),
            (f"{b}.mlp.linear_fc2.weight", (v, VISION["intermediate"])),
            (f"{b}.mlp.linear_fc2.bias", (v,)),
        ]
    merged = v * MERGE * MERGE
    mergers = [("visual.merger", v)]
    mergers += [(f"visual.deepstack_merger_list.{k}", merged) for k in range(len(VISION["deepstack"]))]
    for prefix, norm in mergers:
        out += [
            (f"{prefix}.norm.weight", (norm,)),
            (f"{prefix}.norm.bias", (norm,)),
            (f"{prefix}.linear_fc1.weight", (merged, merged)),
            (f"{prefix}.linear_fc1.bias", (merged,)),
            (f"{prefix}.linear_fc2.weight", (t, merged)),
            (f"{prefix}.linear_fc2.bias", (t,)),
        ]
    out.append(("language_model.embed_tokens.weight", (vocab_size, t)))
    for i in range(TEXT["layers"]):
        layer = f"language_model.layers.{i}"
        out += [
            (f"{layer}.input_layernorm.weight", (t,)),
            (f"{layer}.self_attn.q_proj.weight", (TEXT["heads"] * hd, t)),
            (f"{layer}.self_attn.k_proj.weight", (TEXT["kv_heads"] * hd, t)),
            (f"{layer}.self_attn.v_proj.weight", (TEXT["kv_heads"] * hd, t)),
            (f"{layer}.self_attn.o_proj.weight", (t, TEXT["heads"] * hd)),
            (f"{layer}.self_attn.q_norm.weight", (hd,)),
            (f"{layer}.self_attn.k_norm.weight", (hd,)),
            (f"{layer}.post_attention_layernorm.weight", (t,)),
            (f"{layer}.mlp.gate_proj.weight", (TEXT["intermediate"], t)),
            (f"{layer}.mlp.up_proj.weight", (TEXT["intermediate"], t)),
            (f"{layer}.mlp.down_proj.weight", (t, TEXT["intermediate"])),
        ]
    out.append(("language_model.norm.weight", (t,)))
    return out


def weights(vocab_size: int, seed: int) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    norms = ("norm.weight", "norm1.weight", "norm2.weight", "layernorm.weight")
    state: dict[str, Any] = {}
    for name, shape in shapes(vocab_size):
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        if name.endswith(norms):
            tensor = 1.0 + 0.1 * noise
        elif name.endswith("bias"):
            tensor = 0.05 * noise
        elif name.endswith(("embed_tokens.weight", "pos_embed.weight")):
            tensor = 0.2 * noise
        else:
            tensor = min(0.2, 1.6 / math.sqrt(math.prod(shape[1:]))) * noise
        state[f"vlm.model.{name}"] = tensor
    t = TEXT["hidden"]
    state["vlm.lm_head.weight"] = 0.02 * torch.randn((vocab_size, t), generator=gen, dtype=torch.float32)
    state["embedding_proj_layer.weight"] = (1 / math.sqrt(t)) * torch.randn((EMBED_DIM, t), generator=gen)
    state["embedding_proj_layer.bias"] = torch.zeros(EMBED_DIM)
    return state


def config(ids: dict[str, int], vocab_size: int) -> dict[str, Any]:
    return {
        "architectures": ["ColQwen3"],
        "model_type": "colqwen3",
        "embed_dim": EMBED_DIM,
        "padding_side": "left",
        "initializer_range": 0.02,
        "dtype": "bfloat16",
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
        "transformers_version": "4.57.1",
        "text_config": {
            "model_type": "qwen3_vl_text",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "dtype": "bfloat16",
            "head_dim": TEXT["head_dim"],
            "hidden_act": "silu",
            "hidden_size": TEXT["hidden"],
            "initializer_range": 0.02,
            "intermediate_size": TEXT["intermediate"],
            "max_position_embeddings": MAX_POSITIONS,
            "num_attention_heads": TEXT["heads"],
            "num_hidden_layers": TEXT["layers"],
            "num_key_value_heads": TEXT["kv_heads"],
            "rms_norm_eps": 1e-6,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": MROPE_SECTION, "rope_type": "default"},
            "rope_theta": 5000000,
            "tie_word_embeddings": False,
            "use_cache": True,
            "vocab_size": vocab_size,
        },
        "vision_config": {
            "model_type": "qwen3_vl",
            "deepstack_visual_indexes": VISION["deepstack"],
            "depth": VISION["depth"],
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": VISION["hidden"],
            "in_channels": 3,
            "initializer_range": 0.02,
            "intermediate_size": VISION["intermediate"],
            "num_heads": VISION["heads"],
            "num_position_embeddings": VISION["grid"] ** 2,
            "out_hidden_size": TEXT["hidden"],
            "patch_size": PATCH,
            "spatial_merge_size": MERGE,
            "temporal_patch_size": TEMPORAL,
        },
    }


def tokenizer_config(ids: dict[str, int]) -> dict[str, Any]:
    from tests.fixtures.colqwen3 import CHAT_TEMPLATE, QWEN_SPECIALS

    decoder = {
        str(ids[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in QWEN_SPECIALS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(QWEN_SPECIALS[1:]),
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": MAX_POSITIONS,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def preprocessor_config(max_pixels: int) -> dict[str, Any]:
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "image_std": [0.5, 0.5, 0.5],
        "max_pixels": max_pixels,
        "merge_size": MERGE,
        "min_pixels": MIN_PIXELS,
        "patch_size": PATCH,
        "processor_class": "Qwen3VLProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"longest_edge": max_pixels, "shortest_edge": MIN_PIXELS},
        "temporal_patch_size": TEMPORAL,
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

    from tests.fixtures.colqwen3 import QWEN_SPECIALS, bpe_tokenizer

    tok = bpe_tokenizer()
    ids = {s: int(tok.token_to_id(s)) for s in QWEN_SPECIALS}
    vocab_size = 64 * math.ceil((max(ids.values()) + 1) / 64)
    out_dir.mkdir(parents=True, exist_ok=True)

    def dump(name: str, data: dict[str, Any]) -> None:
        (out_dir / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    dump("config.json", config(ids, vocab_size))
    dump("tokenizer_config.json", tokenizer_config(ids))
    dump("preprocessor_config.json", preprocessor_config(max_pixels))
    dump("video_preprocessor_config.json", video_preprocessor_config())
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)
    state = weights(vocab_size, seed)
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
