"""Independent plain-transformers reference for the ColQwen3 family in vLLM's raw mode. Shares no code with
lateserve.

* prompt: `"<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"` per image, all first, then the text
  parts joined by "\\n" (vllm-spec 3.2.4), tokenized by `AutoTokenizer`; n from the image processor's grid;
* images: decoded with Pillow, transparent ones composited onto white (vLLM's loader), then
  `Qwen2VLImageProcessorPil` configured from preprocessor_config.json;
* model: `Qwen3VLModel` built from config.json's text/vision configs with eager attention, weights loaded
  from safetensors by stripping the layout's prefix (strict: every backbone weight used);
  `mm_token_type_ids` = 1 on image pads; one input at a time (no padding);
* head: `F.linear(h, W, b)` with the checkpoint's projection and bias (Ops: the full wide projection, then
  `[..., :dims]`), then `F.normalize`; Nemotron: no projection, and bidirectional text attention done
  NVIDIA's way (`self_attn.is_causal = False` on every layer and an explicit padding-only 4D mask, the M-RoPE
  positions computed with `get_rope_index` beforehand because the model cannot derive them from a 4D mask).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen3VLConfig, Qwen3VLModel
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

Part = str | bytes
"""A text part (str) or an encoded image file (bytes)."""

_LAYOUT_PREFIX = {"ColQwen3": "vlm.model.", "OpsColQwen3Model": "", "Qwen3VLNemotronEmbedModel": "model."}
_HEAD = {"ColQwen3": "embedding_proj_layer", "OpsColQwen3Model": "custom_text_proj"}


def decode_image(data: bytes) -> Image.Image:
    """As vLLM's loader: transparent images onto white, everything else convert("RGB")."""
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


class Qwen3VLReference:
    def __init__(self, path: Path, **processor_overrides: Any) -> None:
        raw = json.loads((path / "config.json").read_text())
        self.architecture = raw["architectures"][0]
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        preprocessor = json.loads((path / "preprocessor_config.json").read_text())
        keep = (
            "size",
            "patch_size",
            "temporal_patch_size",
            "merge_size",
            "image_mean",
            "image_std",
            "min_pixels",
            "max_pixels",
        )
        settings = {k: v for k, v in preprocessor.items() if k in keep} | processor_overrides
        self.image_processor = Qwen2VLImageProcessorPil(**settings)
        ids = {k: raw[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
        config = Qwen3VLConfig(text_config=raw["text_config"], vision_config=raw["vision_config"], **ids)
        config._attn_implementation = "eager"
        for sub in (config, config.text_config, config.vision_config):
            sub.dtype = torch.float32  # config.json says bfloat16, which transformers would build in
        self.model = Qwen3VLModel(config).eval()
        self.image_token_id = ids["image_token_id"]

        state = load_file(str(path / "model.safetensors"))
        prefix = _LAYOUT_PREFIX[self.architecture]
        backbone = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix + "visual.")}
        backbone |= {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix + "language_model.")}
        result = self.model.load_state_dict(backbone, strict=True)
        assert not result.missing_keys and not result.unexpected_keys, result
        head = _HEAD.get(self.architecture)
        self.weight = state[f"{head}.weight"].float() if head else None
        self.bias = state[f"{head}.bias"].float() if head and f"{head}.bias" in state else None
        self.dims = raw.get("embed_dim") or raw.get("dims")
        self.bidirectional = self.architecture == "Qwen3VLNemotronEmbedModel"
        if self.bidirectional:
            for layer in self.model.language_model.layers:
                layer.self_attn.is_causal = False

    def prompt(self, parts: Sequence[Part]) -> tuple[list[int], list[Image.Image]]:
        """vLLM's raw prompt ids and the decoded images."""
        images = [decode_image(p) for p in parts if isinstance(p, bytes)]
        texts = [p for p in parts if isinstance(p, str)]
        grids = self._process(images)[1] if images else torch.zeros((0, 3), dtype=torch.long)
        merge = self.image_processor.merge_size
        text = ""
        for grid in grids:
            text += "<|vision_start|>" + "<|image_pad|>" * (int(grid.prod()) // (merge * merge)) + "<|vision_end|>"
        text += "\n".join(texts)
        return list(self.tokenizer(text)["input_ids"]), images

    def chat_ids(self, messages: list[dict[str, Any]], images: Sequence[bytes]) -> tuple[list[int], list[Image.Image]]:
        """The chat template's prompt, each single image pad expanded to the image's token count."""
        decoded = [decode_image(b) for b in images]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        grids = self._process(decoded)[1]
        merge = self.image_processor.merge_size
        pieces = text.split("<|image_pad|>")
        assert len(pieces) == len(decoded) + 1
        out = pieces[0]
        for grid, piece in zip(grids, pieces[1:], strict=True):
            out += "<|image_pad|>" * (int(grid.prod()) // (merge * merge)) + piece
        return list(self.tokenizer(out)["input_ids"]), decoded

    def _process(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.image_processor(list(images), return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    @torch.inference_mode()
    def vectors(self, parts: Sequence[Part], *, normalize: bool = True) -> np.ndarray:
        ids, images = self.prompt(parts)
        return self.vectors_for(ids, images, normalize=normalize)

    @torch.inference_mode()
    def vectors_for(self, ids: list[int], images: Sequence[Image.Image], *, normalize: bool = True) -> np.ndarray:
        input_ids = torch.tensor([ids])
        mask2d = torch.ones_like(input_ids)
        kwargs: dict[str, Any] = {}
        if images:
            pixel_values, grids = self._process(images)
            mm = (input_ids == self.image_token_id).long()
            kwargs = {"pixel_values": pixel_values, "image_grid_thw": grids, "mm_token_type_ids": mm}
        if self.bidirectional:
            if images:
                position_ids, _ = self.model.get_rope_index(
                    input_ids, kwargs["mm_token_type_ids"], kwargs["image_grid_thw"], attention_mask=mask2d
                )
            else:
                position_ids = torch.arange(len(ids)).view(1, 1, -1).expand(3, 1, -1)
            mask = torch.zeros((1, 1, len(ids), len(ids)), dtype=torch.float32)  # padding-only, and no padding
            hidden = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, **kwargs)
        else:
            hidden = self.model(input_ids=input_ids, attention_mask=mask2d, **kwargs)
        h = hidden.last_hidden_state[0].float()
        if self.weight is not None:
            h = F.linear(h, self.weight, self.bias)
            if self.dims:
                h = h[..., : int(self.dims)]
        return (F.normalize(h, p=2, dim=-1) if normalize else h).numpy()


def maxsim(q: np.ndarray, d: np.ndarray) -> float:
    """vLLM's compute_maxsim_score in float32."""
    return float((q.astype(np.float32) @ d.astype(np.float32).T).max(axis=1).sum())
