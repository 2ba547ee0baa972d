"""ColQwen3.5 late-interaction family (`ColQwen3_5`, e.g. athrael-soju/colqwen3.5-4.5B): Qwen3.5 backbone, text
and image inputs, one L2-normalised vector per token (image pads included), MaxSim in float32.

It is ColQwen3 with another backbone (vllm-spec 1.5), so everything but the worker is ColQwen3's:

* processor: `QwenVLProcessor` unchanged: raw mode (the default) with vLLM's prompts (`qwen_vl.prompts`),
  Qwen2-VL image preparation in the server process, image tokens counted in the batch budget
  (`MediaPayload.cost`); colpali's `ColQwen3_5Processor` is its ColQwen3 processor, and vLLM forces
  `Qwen3VLProcessor` for both (any faithful mode is that processor's, chosen by the architecture name);
* projection dim: config `embed_dim`/`dims`/`dim`/`projection_dim`/`colbert_dim` (first truthy, vLLM's order;
  colpali's checkpoints say `dim`), else the projection weight's rows;
* head: `custom_text_proj` (or `embedding_proj_layer`) **with its bias** (vLLM fixed the bias drop for
  ColQwen3.5 in PR #46108), then L2 norm;
* attention: `is_causal` from config.json honoured for the full-attention layers (bidirectional when false,
  as PR #46108 serves it); the gated delta-net layers stay causal (`qwen_vl.runner_3_5` explains why and
  how padding is exact);
* weights (`qwen_vl.weights.QWEN3_5_LAYOUT`): `visual.*`, `language_model.*`, the projection; `mtp.*` and
  `lm_head.*` skipped; anything else is an error naming it.

The worker runs `qwen_vl.runner_3_5` on transformers' `Qwen3_5Model`.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any

from lateserve.server.domain import ModelLoadError
from lateserve.server.families import loading
from lateserve.server.families.colqwen3 import DIM_KEYS, ColQwen3Family
from lateserve.server.families.qwen_vl.weights import QWEN3_5_LAYOUT, split_checkpoint

if TYPE_CHECKING:
    from lateserve.server.families.qwen_vl.runner import Head
    from lateserve.server.families.qwen_vl.runner_3_5 import Qwen3_5Runner

COLQWEN3_5 = "ColQwen3_5"


def is_causal(config: Mapping[str, Any]) -> bool:
    """The full-attention layers' direction: config.json `is_causal` (top level, as vLLM's ColQwen3_5Config
    reads it), else `text_config.is_causal`; causal when neither says, as Qwen3.5 itself is."""
    if config.get("is_causal") is not None:
        return bool(config["is_causal"])
    text = config.get("text_config")
    if isinstance(text, Mapping) and text.get("is_causal") is not None:
        return bool(text["is_causal"])
    return True


class ColQwen3_5Family(ColQwen3Family):
    """`ColQwen3_5`: ColQwen3's processor and head rules on a Qwen3.5 backbone."""

    architectures = (COLQWEN3_5,)  # type: ignore[assignment]  # ColQwen3Family infers a 3-tuple

    @cached_property
    def _token_dim(self) -> int:
        configured = next((self.source.config[k] for k in DIM_KEYS if self.source.config.get(k)), None)
        if configured is not None:
            return int(configured)
        shapes = split_checkpoint(loading.read_safetensors_shapes(self.source.path), QWEN3_5_LAYOUT).projection
        if "weight" not in shapes:
            raise ModelLoadError(
                f"{COLQWEN3_5} checkpoint {self.source.path} has no projection "
                "(custom_text_proj.weight or embedding_proj_layer.weight) and config.json names no dim"
            )
        return int(shapes["weight"][0])

    @cached_property
    def bidirectional(self) -> bool:
        return not is_causal(self.source.config)

    def head(self) -> Head:
        from lateserve.server.families.qwen_vl.runner import Head

        return Head(dim=self._token_dim, projected=True, bidirectional=self.bidirectional)

    def runner(self, device: str, dtype: str) -> Qwen3_5Runner:
        from lateserve.server.families.qwen_vl.runner_3_5 import Qwen3_5Runner

        return Qwen3_5Runner(self.source, architecture=self.architecture, head=self.head(), device=device, dtype=dtype)
