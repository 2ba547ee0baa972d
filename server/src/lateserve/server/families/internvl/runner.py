"""Worker side of the Llama-Nemotron-VL models: transformers' `SiglipVisionModel` and `LlamaModel`, the pixel
shuffle and `mlp1` projector, pooling, and the reranker's `score` head; loaded strictly.

Forward, as NVIDIA's `LlamaNemotronVLModel` runs it (vl-families.md §3.2):

1. tiles (uint8 `[tiles, S, S, 3]` from `tiling`) -> `/255`, `(x - 0.5) / 0.5` in float32 (torchvision's
   `ToTensor` + `Normalize`), cast to the serving dtype;
2. SigLIP -> `last_hidden_state` (after `post_layernorm`; another `select_layer` takes that encoder
   layer's output) `[tiles, P, C]` -> pixel shuffle (`pixel_shuffle`) -> `mlp1` = LayerNorm(4C), Linear,
   GELU, Linear -> `[tiles, P * r^2, H]`;
3. the language model's token embeddings with each image's `<IMG_CONTEXT>` run replaced by its tiles'
   features in order;
4. `LlamaModel` made bidirectional: `config.is_causal = False` (padding-only mask) AND `self_attn.is_causal
   = False` on every layer (with no padding transformers skips the mask and SDPA would read the module flag,
   vl-families §0.4); positions `arange` (the batch is right-padded, so each row's are its own);
5. pooling over the final-normed states (avg over the attended tokens, cls, last), in float32; embed
   vectors L2-normalised when asked; the reranker's logit is `score(pooled) / temperature` (float32 head,
   no bias), returned raw (the engine applies the sigmoid).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lateserve.server.domain import ItemOutputs, Modality, ModelLoadError, Sequence, Task, UnsupportedTask, WorkItem
from lateserve.server.families import loading
from lateserve.server.families.base import ModelRunner, ModelSource
from lateserve.server.families.batching import pad_batch
from lateserve.server.families.internvl.config import VLConfig
from lateserve.server.families.internvl.weights import split_checkpoint

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, slots=True)
class Head:
    """What follows the backbone: the tasks served and, for a reranker, the classifier."""

    tasks: frozenset[Task]
    classifier: bool = False


def pixel_shuffle(x: torch.Tensor, ratio: float, ps_version: str) -> torch.Tensor:
    """`[n, side, side, c]` -> `[n, side*r, side*r, c/r^2]` as NVIDIA's `pixel_shuffle` (InternVL's): fold
    columns into channels, swap the axes, fold rows into channels, and (ps_version other than "v1") swap
    the axes back."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * ratio), int(c / ratio))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(h * ratio), int(w * ratio), int(c / (ratio * ratio)))
    if ps_version != "v1":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


class NemotronVLRunner(ModelRunner):
    """One replica in `dtype`; pooling and the score head in float32."""

    def __init__(self, source: ModelSource, *, architecture: str, head: Head, device: str, dtype: str) -> None:
        import torch
        from transformers import LlamaConfig, LlamaModel, SiglipVisionConfig, SiglipVisionModel

        if dtype not in ("float32", "float16", "bfloat16"):
            raise ModelLoadError(f"unsupported dtype {dtype!r}; use float32, float16 or bfloat16")
        cfg = VLConfig.from_dict(source.config)
        torch_dtype = getattr(torch, dtype)
        try:
            vision_config = SiglipVisionConfig(**{**cfg.vision, "vision_use_head": False})
            llm_settings = {k: v for k, v in cfg.llm.items() if k not in ("architectures", "auto_map", "model_type")}
            llm_config = LlamaConfig(**llm_settings)
        except Exception as exc:
            raise ModelLoadError(f"config.json is not a valid Llama-Nemotron-VL configuration: {exc}") from exc
        for sub in (vision_config, llm_config):
            sub._attn_implementation = "sdpa"
            sub.dtype = torch_dtype
        llm_config.use_cache = False
        llm_config.is_causal = False
        hidden, vit = cfg.hidden_size, cfg.vision_hidden_size
        merged = round(vit / cfg.downsample_ratio**2)
        with loading.skip_weight_init():
            vision = SiglipVisionModel(vision_config)
            language = LlamaModel(llm_config)
            mlp1 = torch.nn.Sequential(
                torch.nn.LayerNorm(merged),
                torch.nn.Linear(merged, hidden),
                torch.nn.GELU(),
                torch.nn.Linear(hidden, hidden),
            )
        for layer in language.layers:
            layer.self_attn.is_causal = False  # type: ignore[union-attr]
        modules: dict[str, torch.nn.Module] = {"vision": vision, "language": language, "mlp1": mlp1}
        if head.classifier:
            modules["score"] = torch.nn.Linear(hidden, cfg.num_labels, bias=False)
        model = torch.nn.ModuleDict(modules)
        split = split_checkpoint(loading.load_safetensors(source.path))
        loading.load_state_dict_strict(
            model, split.state, what=f"{architecture} checkpoint {source.path}", names=split.origin
        )
        self.device = torch.device(device)
        self.dtype = torch_dtype
        model.to(self.device)
        for name in ("vision", "language", "mlp1"):
            modules[name].to(torch_dtype)
        model.eval()
        from lateserve.server.families import acceleration  # imports torch: worker side only

        for name in ("vision", "language", "mlp1"):
            acceleration.pack_linears_in_place(modules[name], torch_dtype, self.device)
        self.cfg = cfg
        self.head = head
        self.vision = vision
        self.language = language
        self.mlp1 = mlp1
        self.score: torch.nn.Linear | None = modules.get("score")  # type: ignore[assignment]
        if self.score is not None:
            self.score.float()
        self.context_id = cfg.img_context_token_id
        pad = llm_config.pad_token_id
        self.pad_id = int(pad) if isinstance(pad, int) else 0

    # --- vision ---------------------------------------------------------------------------------

    def image_features(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 `[tiles, S, S, 3]` -> `[tiles, tokens per tile, hidden]` in the serving dtype."""
        import torch

        pixels = tiles.permute(0, 3, 1, 2).to(torch.float32).div(255)
        pixels = ((pixels - 0.5) / 0.5).to(self.dtype)
        if self.cfg.select_layer == -1:
            states = self.vision(pixel_values=pixels).last_hidden_state
        else:
            states = self.vision(pixel_values=pixels, output_hidden_states=True).hidden_states[self.cfg.select_layer]
        n, patches, channels = states.shape
        side = round(patches**0.5)
        shuffled = pixel_shuffle(
            states.reshape(n, side, side, channels), self.cfg.downsample_ratio, self.cfg.ps_version
        )
        features: torch.Tensor = self.mlp1(shuffled.reshape(n, -1, shuffled.shape[-1]))
        return features

    # --- forward --------------------------------------------------------------------------------

    def forward(self, batch: Seq[WorkItem]) -> list[ItemOutputs]:
        import torch
        import torch.nn.functional as F

        for item in batch:
            if item.tasks - self.head.tasks:
                names = sorted(t.value for t in self.head.tasks)
                raise UnsupportedTask(f"this model computes {', '.join(names)}, not {sorted(item.tasks)}")
        if not batch:
            return []
        ids, mask, lengths = pad_batch(batch, self.pad_id)
        if ids.shape[1] == 0:
            raise ValueError("empty input")
        spans: list[tuple[int, int, int]] = []
        tiles: list[np.ndarray] = []
        for row, item in enumerate(batch):
            for media in item.sequence.media:
                self._check_media(item.sequence, media.modality, media.offset, media.length)
                tiles.append(np.asarray(media.array("tiles").to_numpy()))
                spans.append((row, media.offset, media.length))
        if self.context_id is not None:
            covered = torch.zeros_like(ids, dtype=torch.bool)
            for row, offset, length in spans:
                covered[row, offset : offset + length] = True
            strays = int(((ids == self.context_id) & ~covered & (mask == 1)).sum())
            if strays:
                raise ValueError(f"{strays} <IMG_CONTEXT> token(s) without an image in the batch")
        with torch.inference_mode():
            ids, mask = ids.to(self.device), mask.to(self.device)
            embeds = self.language.embed_tokens(ids)
            if tiles:
                features = self.image_features(torch.from_numpy(np.concatenate(tiles)).to(self.device))
                flat = features.reshape(-1, features.shape[-1])
                start = 0
                for row, offset, length in spans:
                    if start + length > flat.shape[0]:
                        raise ValueError("image placeholder runs are longer than the images' features")
                    embeds[row, offset : offset + length] = flat[start : start + length].to(embeds.dtype)
                    start += length
                if start != flat.shape[0]:
                    raise ValueError("image placeholder runs do not match the images' features")
            hidden = self.language(inputs_embeds=embeds, attention_mask=mask).last_hidden_state.float()
            outputs: list[ItemOutputs] = []
            for row, item in enumerate(batch):
                states = hidden[row, : lengths[row]]
                pooled = self._pool(states)
                out: ItemOutputs = {}
                if Task.EMBED in item.tasks:
                    vector = F.normalize(pooled, p=2, dim=-1) if item.normalize else pooled
                    out[Task.EMBED] = np.array(vector.cpu().numpy(), dtype=np.float32)
                if Task.TOKEN_EMBED in item.tasks:
                    rows = F.normalize(states, p=2, dim=-1) if item.normalize else states
                    out[Task.TOKEN_EMBED] = np.array(rows.cpu().numpy(), dtype=np.float32)
                if Task.CLASSIFY in item.tasks:
                    assert self.score is not None
                    logits = self.score(pooled) / self.cfg.temperature
                    out[Task.CLASSIFY] = np.array(logits.cpu().numpy(), dtype=np.float32)
                outputs.append(out)
        return outputs

    def _pool(self, states: torch.Tensor) -> torch.Tensor:
        """One row's `[length, hidden]` float32 states (padding already cut off) -> `[hidden]`."""
        if self.cfg.pooling == "cls":
            return states[0]
        if self.cfg.pooling == "last":
            return states[-1]
        return states.mean(dim=0)

    def _check_media(self, seq: Sequence, modality: Modality, offset: int, length: int) -> None:
        if modality is not Modality.IMAGE:
            raise ValueError(f"unsupported media modality {modality.value!r}")
        span = seq.ids[offset : offset + length]
        if length <= 0 or len(span) != length or (self.context_id is not None and set(span) != {self.context_id}):
            raise ValueError(f"image span [{offset}, {offset + length}) does not hold <IMG_CONTEXT> tokens")

    def warmup(self) -> None:
        task = Task.CLASSIFY if self.head.classifier else Task.EMBED
        self.forward([WorkItem(Sequence(ids=(self.pad_id, self.pad_id)), frozenset({task}))])
