"""config.json of the Llama-Nemotron-VL checkpoints, read without torch (the server process needs the
token counts and the head; the worker builds the modules from the same object).

Read as NVIDIA's `LlamaNemotronVLConfig` and vLLM's `LlamaNemotronVLConfig.verify_and_update_model_config`
read it (vllm-spec 1.7):

* `vision_config`: a SigLIP vision config (`image_size`, `patch_size`, widths); `llm_config` (or
  `text_config`): a Llama config, made bidirectional;
* `downsample_ratio` (0.5), `ps_version` ("v2": the final permute of the pixel shuffle; "v1" skips it),
  `select_layer` (-1: SigLIP's `last_hidden_state`, after `post_layernorm`), `force_image_size` (the tile
  size; else the vision config's `image_size`), `img_context_token_id`;
* `pooling` (top level, else in `llm_config`; default "avg"): "avg" (mean over every prompt token), "cls"
  (first), "last" (last); anything else is refused as vLLM refuses it;
* reranker: `num_labels` / `id2label` (top level, else in `llm_config`; default 1) and `temperature` (default 1),
  the logit being divided by it as NVIDIA's head does.

Tokens per tile: `(tile // patch)^2 * downsample_ratio^2` (256 for 512 px tiles of 16 px patches at 0.5).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lateserve.server.domain import ModelLoadError

POOLING = {"avg": "avg", "mean": "avg", "cls": "cls", "last": "last"}


def _mapping(config: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    for key in keys:
        value = config.get(key)
        if isinstance(value, Mapping):
            return dict(value)
    raise ModelLoadError(f"config.json has no {' or '.join(keys)} object: not a Llama-Nemotron-VL checkpoint")


def _labels(config: Mapping[str, Any]) -> int:
    id2label = config.get("id2label")
    if isinstance(id2label, Mapping) and id2label:
        return len(id2label)
    value = config.get("num_labels")
    return int(value) if isinstance(value, int) and value > 0 else 0


@dataclass(frozen=True)
class VLConfig:
    """What the processor and the runner need of config.json."""

    llm: dict[str, Any]
    vision: dict[str, Any]
    image_size: int
    patch_size: int
    downsample_ratio: float
    ps_version: str
    select_layer: int
    img_context_token_id: int | None
    pooling: str
    num_labels: int
    temperature: float

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> VLConfig:
        llm = _mapping(config, "llm_config", "text_config")
        vision = _mapping(config, "vision_config")
        patch = int(vision.get("patch_size") or 14)
        size = int(config.get("force_image_size") or vision.get("image_size") or 0)
        if size <= 0 or size % patch:
            raise ModelLoadError(f"config.json: tile size {size} is not a multiple of the patch size {patch}")
        vision_size = int(vision.get("image_size") or size)
        if vision_size != size:
            raise ModelLoadError(
                f"config.json: force_image_size {size} differs from vision_config.image_size {vision_size}; "
                "the vision tower's position embeddings fit only its own size"
            )
        ratio = float(config.get("downsample_ratio", 0.5))
        side = size // patch
        if not 0 < ratio <= 1 or (side * ratio) != int(side * ratio) or (1 / ratio) != int(1 / ratio):
            raise ModelLoadError(f"config.json: downsample_ratio {ratio} does not divide the {side}x{side} patch grid")
        raw_pool = config.get("pooling", llm.get("pooling", "avg"))
        pooling = POOLING.get(str(raw_pool))
        if pooling is None:
            raise ModelLoadError(f"pool_type {raw_pool!r} not supported (avg, cls, last)")
        context = config.get("img_context_token_id")
        labels = _labels(config) or _labels(llm) or 1
        temperature = float(config.get("temperature", llm.get("temperature", 1.0)) or 1.0)
        return cls(
            llm=llm,
            vision=vision,
            image_size=size,
            patch_size=patch,
            downsample_ratio=ratio,
            ps_version=str(config.get("ps_version") or "v2"),
            select_layer=int(config.get("select_layer", -1)),
            img_context_token_id=int(context) if context is not None else None,
            pooling=pooling,
            num_labels=labels,
            temperature=temperature,
        )

    @property
    def hidden_size(self) -> int:
        return int(self.llm["hidden_size"])

    @property
    def vision_hidden_size(self) -> int:
        return int(self.vision["hidden_size"])

    @property
    def patches_per_tile(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens_per_tile(self) -> int:
        return round(self.patches_per_tile * self.downsample_ratio**2)

    @property
    def max_positions(self) -> int:
        return int(self.llm.get("max_position_embeddings") or 131072)
