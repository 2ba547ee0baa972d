"""Worker side of ColQwen3.5: transformers' `Qwen3_5Model` (hybrid gated delta-net + full attention text model,
Qwen3-VL style vision tower without DeepStack) under `QwenVLRunner`'s batching, strict loading and head.

What differs from Qwen3-VL is only the backbone, its config and its checkpoint layout (`QWEN3_5_LAYOUT`:
`visual.*`, `language_model.*`, projection `custom_text_proj.{weight,bias}`, `mtp.*` skipped).

Attention direction. `Head.bidirectional` (the family reads config.json `is_causal`, see
`colqwen3_5.is_causal`) applies to the full-attention layers only: when set, `text_config.is_causal = False`
makes transformers build a padding-only mask for them, and `self_attn.is_causal = False` on each of them
covers the unpadded case where that mask is skipped and SDPA would read the module's flag (vl-families §0.4).
The gated delta-net layers are recurrent and causal by construction (a causal depthwise conv1d, then the
delta rule scanned left to right); neither transformers nor vLLM has a bidirectional form of them, so a
"bidirectional" ColQwen3.5 has bidirectional full-attention layers over causal linear-attention layers.

Padding. A batch is right-padded. transformers hands the linear-attention layers the 2D padding mask
(`create_recurrent_attention_mask`), which zeroes the pad positions' inputs; since the conv and the scan only
look backwards, pads after an item's last token cannot reach its real tokens, and the full-attention layers
mask pads as keys. So a padded batch gives each item exactly its own single-input result (up to float
rounding of the chunked scan); tests/parity/test_colqwen3_5_transformers.py checks it. (Left padding would
be exact too only because zeroed inputs leave the zero initial state unchanged; right padding does not
depend on that.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lateserve.server.domain import ModelLoadError
from lateserve.server.families.qwen_vl.runner import _TOKEN_IDS, QwenVLRunner
from lateserve.server.families.qwen_vl.weights import QWEN3_5_LAYOUT

if TYPE_CHECKING:
    import torch
    from transformers import Qwen3_5Config


def qwen3_5_config(raw: Mapping[str, Any]) -> Qwen3_5Config:
    """transformers' Qwen3_5Config from a ColQwen3.5 config.json (top-level text/vision configs, as the
    checkpoint saved from colpali's `ColQwen3_5(Qwen3_5Model)` has them)."""
    from transformers import Qwen3_5Config

    text, vision = raw.get("text_config"), raw.get("vision_config")
    if not isinstance(text, Mapping) or not isinstance(vision, Mapping):
        raise ModelLoadError("config.json needs text_config and vision_config objects (a Qwen3.5 backbone)")
    kwargs: dict[str, Any] = {k: int(raw[k]) for k in _TOKEN_IDS if raw.get(k) is not None}
    try:
        return Qwen3_5Config(text_config=dict(text), vision_config=dict(vision), **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"config.json is not a valid Qwen3.5 configuration: {exc}") from exc


class Qwen3_5Runner(QwenVLRunner):
    """One ColQwen3.5 replica: Qwen3_5Model in `dtype`, the projection (with its bias) in float32."""

    layout = QWEN3_5_LAYOUT

    @staticmethod
    def backbone_config(raw: Mapping[str, Any]) -> Any:
        return qwen3_5_config(raw)

    @staticmethod
    def build_backbone(config: Any) -> torch.nn.Module:
        from transformers import Qwen3_5Model

        return Qwen3_5Model(config)
