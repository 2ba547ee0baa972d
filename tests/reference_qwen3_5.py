"""Independent plain-transformers reference for ColQwen3.5 in vLLM's raw mode. Shares no code with lateserve.

The prompt, image and head steps are the ColQwen3 reference's (tests/reference_qwen3vl.py: AutoTokenizer,
vLLM's placeholder-first prompt, `Qwen2VLImageProcessorPil` from preprocessor_config.json, transparent images
onto white, `F.linear` with the projection's bias, `F.normalize`, one input at a time, no padding); the
backbone is transformers' `Qwen3_5Model` built from config.json with eager attention, loaded strictly from
the unprefixed `visual.*` / `language_model.*` weights (the `mtp.*` head left out).

Bidirectional checkpoints (`is_causal: false`) are run as NVIDIA runs its bidirectional Qwen3-VL: the config
keeps transformers' causal default, every full-attention layer gets `self_attn.is_causal = False`, and the
model is given an explicit all-zero 4D mask with the M-RoPE positions computed beforehand
(`get_rope_index`). The gated delta-net layers have no direction setting: they are always causal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen3_5Config, Qwen3_5Model
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from tests.reference_qwen3vl import Qwen3VLReference, decode_image, maxsim

__all__ = ["Qwen3_5Reference", "decode_image", "maxsim"]


class Qwen3_5Reference(Qwen3VLReference):
    """The Qwen3-VL reference's prompt/image/head methods over a Qwen3_5Model (its own __init__)."""

    def __init__(self, path: Path, **processor_overrides: Any) -> None:
        raw = json.loads((path / "config.json").read_text())
        self.architecture = raw["architectures"][0]
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        preprocessor = json.loads((path / "preprocessor_config.json").read_text())
        keep = ("size", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
        keep += ("min_pixels", "max_pixels")
        settings = {k: v for k, v in preprocessor.items() if k in keep} | processor_overrides
        self.image_processor = Qwen2VLImageProcessorPil(**settings)
        ids = {k: raw[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
        config = Qwen3_5Config(text_config=raw["text_config"], vision_config=raw["vision_config"], **ids)
        config._attn_implementation = "eager"
        for sub in (config, config.text_config, config.vision_config):
            sub.dtype = torch.float32  # config.json says bfloat16
        self.model = Qwen3_5Model(config).eval()
        self.image_token_id = ids["image_token_id"]

        state = load_file(str(path / "model.safetensors"))
        backbone = {k: v for k, v in state.items() if k.startswith(("visual.", "language_model."))}
        result = self.model.load_state_dict(backbone, strict=True)
        assert not result.missing_keys and not result.unexpected_keys, result
        self.weight = state["custom_text_proj.weight"].float()
        self.bias = state["custom_text_proj.bias"].float()
        self.dims = None
        self.bidirectional = raw.get("is_causal") is False
        self.full_attention_layers = 0
        for layer in self.model.language_model.layers:
            if hasattr(layer, "self_attn"):
                self.full_attention_layers += 1
                if self.bidirectional:
                    layer.self_attn.is_causal = False
        assert 0 < self.full_attention_layers < len(self.model.language_model.layers)
