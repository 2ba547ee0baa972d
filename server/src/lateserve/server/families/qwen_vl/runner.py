"""Worker side of the Qwen3-VL late-interaction models: transformers' `Qwen3VLModel`, loaded strictly, plus
the layout's head (projection with bias, optional Matryoshka truncation, or none), L2 norm per token.

Everything between the prepared inputs and `last_hidden_state` is transformers' own code: patch embedding,
learned position-grid interpolation, 2D vision rotary, per-image vision attention, DeepStack injection and
M-RoPE positions (`Qwen3VLModel.get_rope_index`, fed `mm_token_type_ids` = 1 on each image's pad run, as
the Qwen3-VL processor returns it). A batch is right-padded; the vision tower attends within each image
and the text attention mask hides the pads, so items do not see each other.

Bidirectional models (NVIDIA's Nemotron-ColEmbed): `text_config.is_causal = False`, so transformers builds a
padding-only mask, AND `self_attn.is_causal = False` on every text layer, because with no padding that mask
is skipped and SDPA would otherwise take `is_causal` from the module, which Qwen3-VL sets to True
(vl-families §0.4).
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from lateserve.server.domain import (
    ItemOutputs,
    Modality,
    ModelLoadError,
    Sequence,
    Task,
    UnsupportedTask,
    WorkItem,
)
from lateserve.server.families import loading
from lateserve.server.families.base import ModelRunner, ModelSource
from lateserve.server.families.batching import pad_batch
from lateserve.server.families.qwen_vl.weights import QWEN3_VL_LAYOUT, Layout, split_checkpoint

if TYPE_CHECKING:
    import torch
    from transformers import Qwen3VLConfig

_TOKEN_IDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


@dataclass(frozen=True, slots=True)
class Head:
    """What follows the backbone: `dim` outputs per token from a projection (`projected`), keeping the
    first `dim` rows of a wider one when `truncate` (Ops), or the hidden state itself."""

    dim: int
    projected: bool
    truncate: bool = False
    bidirectional: bool = False


def backbone_config(raw: Mapping[str, Any]) -> Qwen3VLConfig:
    """transformers' Qwen3VLConfig from a ColQwen3-family config.json (top-level text/vision configs as
    vLLM's ColQwen3Config reads them; a ColPali-style `vlm_config` nesting is accepted too)."""
    from transformers import Qwen3VLConfig

    base = raw.get("vlm_config") if isinstance(raw.get("vlm_config"), Mapping) else raw
    assert base is not None
    text, vision = base.get("text_config"), base.get("vision_config")
    if not isinstance(text, Mapping) or not isinstance(vision, Mapping):
        raise ModelLoadError("config.json needs text_config and vision_config objects (a Qwen3-VL backbone)")
    kwargs: dict[str, Any] = {k: int(base[k]) for k in _TOKEN_IDS if base.get(k) is not None}
    try:
        return Qwen3VLConfig(text_config=dict(text), vision_config=dict(vision), **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"config.json is not a valid Qwen3-VL configuration: {exc}") from exc


class QwenVLRunner(ModelRunner):
    """One replica: Qwen3VLModel in `dtype`, the head in float32.

    A Qwen-VL backbone of another generation (ColQwen3.5's Qwen3_5Model, `runner_3_5`) subclasses this and
    overrides `layout`, `backbone_config` and `build_backbone`; batching, loading and the head are shared."""

    layout: Layout = QWEN3_VL_LAYOUT

    @staticmethod
    def backbone_config(raw: Mapping[str, Any]) -> Any:
        return backbone_config(raw)

    @staticmethod
    def build_backbone(config: Any) -> torch.nn.Module:
        from transformers import Qwen3VLModel

        return Qwen3VLModel(config)

    def __init__(self, source: ModelSource, *, architecture: str, head: Head, device: str, dtype: str) -> None:
        import torch

        if dtype not in ("float32", "float16", "bfloat16"):
            raise ModelLoadError(f"unsupported dtype {dtype!r}; use float32, float16 or bfloat16")
        config = self.backbone_config(source.config)
        config._attn_implementation = "sdpa"
        text: Any = config.text_config
        vision: Any = config.vision_config
        # Built directly in the serving dtype: transformers would otherwise take each sub-config's `dtype`
        # from config.json (bfloat16 on the Hub) and round float32 weights while loading them.
        for sub in (config, text, vision):
            sub.dtype = getattr(torch, dtype)
        text.use_cache = False
        if head.bidirectional:
            text.is_causal = False
        with loading.skip_weight_init():
            backbone: Any = self.build_backbone(config)
        if head.bidirectional:
            for layer in backbone.language_model.layers:
                attention = getattr(layer, "self_attn", None)  # hybrid models: only the full-attention layers
                if attention is not None:
                    attention.is_causal = False

        what = f"{architecture} checkpoint {source.path}"
        split = split_checkpoint(loading.load_safetensors(source.path), self.layout)
        state: dict[str, torch.Tensor] = {f"backbone.{k}": v for k, v in split.backbone.items()}
        names = {f"backbone.{k}": v for k, v in split.origin.items() if not k.startswith("proj.")}
        modules: dict[str, torch.nn.Module] = {"backbone": backbone}
        hidden = int(text.hidden_size)
        if head.projected:
            weight = split.projection.get("weight")
            if weight is None:
                raise ModelLoadError(
                    f"{what} does not match the model; missing weights: the projection "
                    "(custom_text_proj.weight or embedding_proj_layer.weight)"
                )
            rows = int(weight.shape[0])
            if rows != head.dim and not (head.truncate and rows > head.dim):
                raise ModelLoadError(
                    f"{what}: {split.origin['proj.weight']} has shape {list(weight.shape)}, "
                    f"expected [{head.dim}, {hidden}] (the configured projection dim)"
                )
            bias = split.projection.get("bias")
            modules["proj"] = torch.nn.Linear(hidden, rows, bias=bias is not None)
            state["proj.weight"] = weight
            if bias is not None:
                state["proj.bias"] = bias
        else:
            for part, value in split.projection.items():  # a projection on a model that has none: unexpected
                state[f"proj.{part}"] = value
        names.update({k: v for k, v in split.origin.items() if k.startswith("proj.")})
        model = torch.nn.ModuleDict(modules)
        loading.load_state_dict_strict(model, state, what=what, names=names)

        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.head = head
        self.image_token_id = int(config.image_token_id)
        self.pad_id = int(text.pad_token_id or 0)
        model.to(self.device).eval()
        from lateserve.server.families import acceleration  # imports torch: worker side only

        if acceleration.pack_linears_in_place(backbone, self.dtype, self.device):
            # The patch embedding's Conv3d (kernel = stride) is one GEMM over the flattened patches.
            backbone.visual.patch_embed = acceleration.PatchConvAsLinear(backbone.visual.patch_embed.proj, self.dtype)
        self.backbone = backbone
        self.proj: torch.nn.Linear | None = modules.get("proj")  # type: ignore[assignment]

    def forward(self, batch: Seq[WorkItem]) -> list[ItemOutputs]:
        import torch
        import torch.nn.functional as F

        for item in batch:
            if item.tasks - {Task.TOKEN_EMBED}:
                raise UnsupportedTask(f"this model only computes token_embed, not {sorted(item.tasks)}")
        if not batch:
            return []
        ids, mask, lengths = pad_batch(batch, self.pad_id)
        if ids.shape[1] == 0:
            return [{Task.TOKEN_EMBED: np.zeros((0, self.head.dim), dtype=np.float32)} for _ in batch]
        mm_types = torch.zeros_like(ids)
        pixels: list[torch.Tensor] = []
        grids: list[torch.Tensor] = []
        for row, item in enumerate(batch):
            for media in item.sequence.media:
                self._check_media(item.sequence, media.modality, media.offset, media.length)
                mm_types[row, media.offset : media.offset + media.length] = 1
                pixels.append(torch.from_numpy(np.array(media.array("pixel_values").to_numpy(), dtype=np.float32)))
                grids.append(torch.from_numpy(np.array(media.array("grid_thw").to_numpy(), dtype=np.int64)))
        strays = int(((ids == self.image_token_id) & (mm_types == 0) & (mask == 1)).sum())
        if strays:
            raise ValueError(f"{strays} image placeholder token(s) without an image in the batch")
        inputs: dict[str, torch.Tensor] = {
            "input_ids": ids.to(self.device),
            "attention_mask": mask.to(self.device),
        }
        if pixels:
            inputs["pixel_values"] = torch.cat(pixels).to(self.device)
            inputs["image_grid_thw"] = torch.cat([g.reshape(-1, 3) for g in grids]).to(self.device)
            inputs["mm_token_type_ids"] = mm_types.to(self.device)
        with torch.inference_mode():
            hidden = self.backbone(**inputs).last_hidden_state.float()
            vectors = self.proj(hidden) if self.proj is not None else hidden
            vectors = vectors[..., : self.head.dim]
            outputs: list[ItemOutputs] = []
            for row, item in enumerate(batch):
                rows = vectors[row, : lengths[row]]
                if item.sequence.keep is not None:
                    rows = rows[list(item.sequence.keep)]
                if item.normalize:
                    rows = F.normalize(rows, p=2, dim=-1)
                outputs.append({Task.TOKEN_EMBED: np.array(rows.cpu().numpy(), dtype=np.float32)})
        return outputs

    def _check_media(self, seq: Sequence, modality: Modality, offset: int, length: int) -> None:
        if modality is not Modality.IMAGE:
            raise ValueError(f"unsupported media modality {modality.value!r}")
        span = seq.ids[offset : offset + length]
        if length <= 0 or len(span) != length or any(t != self.image_token_id for t in span):
            raise ValueError(f"image placeholder span [{offset}, {offset + length}) does not hold image pad tokens")

    def warmup(self) -> None:
        self.forward([WorkItem(Sequence(ids=(self.pad_id, self.pad_id)), frozenset({Task.TOKEN_EMBED}))])
