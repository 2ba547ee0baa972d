"""Independent reference for the Llama-Nemotron-VL models, assembled from transformers parts the way NVIDIA's
published code runs them (vl-families.md §3). Shares no code with lateserve.

* tokenizer: `AutoTokenizer` (transformers' fast tokenizer from tokenizer.json); chat prompts rendered with
  transformers' own `apply_chat_template`;
* images: decoded with Pillow (transparency onto white, as vLLM's loader), then NVIDIA's `dynamic_preprocess`
  written out here with PIL: area-aware grid choice over the target ratios, resize, `crop` of each tile in
  row-major order, thumbnail last; each tile `ToTensor` (/255) and `Normalize(0.5, 0.5)` done with torch;
* prompt: each `<image>` replaced by the full `<img>` + `<IMG_CONTEXT>` x (tiles x tokens per tile) + `</img>`
  string before tokenizing (vLLM's embed processor and NVIDIA's processor do that);
* model: `SiglipVisionModel` (no head) -> `last_hidden_state` -> NVIDIA's `pixel_shuffle` (view, permute,
  view, permute for ps_version v2) -> `mlp1` (LayerNorm, Linear, GELU, Linear); `LlamaModel` with every
  `self_attn.is_causal = False`, eager attention and an explicit padding-only 4D mask, positions `arange`;
  the image features replace the embeddings at `img_context_token_id` in order (`input_embeds[selected] =`);
* head: avg pooling over the attended tokens; embed: `F.normalize`; reranker: `score(pooled) / temperature`.
  One input at a time (no padding). Weights loaded strictly from safetensors with the layout's prefixes.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaModel, SiglipVisionConfig, SiglipVisionModel

Part = str | bytes
"""A text part (str) or an encoded image file (bytes)."""


def decode_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def nvidia_target_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    return sorted(target_ratios, key=lambda x: x[0] * x[1])


def nvidia_closest_aspect_ratio(
    aspect_ratio: float, target_ratios: list[tuple[int, int]], width: int, height: int, image_size: int
) -> tuple[int, int]:
    best_factor = float("-inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        factor_based_on_area_n_ratio = min((ratio[0] * ratio[1] * image_size * image_size) / area, 0.6) * min(
            target_aspect_ratio / aspect_ratio, aspect_ratio / target_aspect_ratio
        )
        if factor_based_on_area_n_ratio > best_factor:
            best_factor = factor_based_on_area_n_ratio
            best_ratio = ratio
    return best_ratio


def nvidia_dynamic_preprocess(
    image: Image.Image, min_num: int = 1, max_num: int = 6, image_size: int = 512, use_thumbnail: bool = True
) -> list[Image.Image]:
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height
    ratios = nvidia_target_ratios(min_num, max_num)
    target = nvidia_closest_aspect_ratio(aspect_ratio, ratios, orig_width, orig_height, image_size)
    target_width = image_size * target[0]
    target_height = image_size * target[1]
    blocks = target[0] * target[1]
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size,
        )
        processed_images.append(resized_img.crop(box))
    if use_thumbnail and len(processed_images) != 1:
        processed_images.append(image.resize((image_size, image_size)))
    return processed_images


def to_pixel_values(tiles: Sequence[Image.Image]) -> torch.Tensor:
    """ToTensor + Normalize(0.5, 0.5) per tile, stacked."""
    out = []
    for tile in tiles:
        x = torch.from_numpy(np.array(tile.convert("RGB"), copy=True)).permute(2, 0, 1).contiguous()
        x = x.to(torch.float32).div(255)
        out.append((x - torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1)) / torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1))
    return torch.stack(out)


def nvidia_pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5, ps_version: str = "v2") -> torch.Tensor:
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    if ps_version != "v1":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


class NemotronVLReference:
    def __init__(self, path: Path, *, max_num: int | None = None) -> None:
        raw = json.loads((path / "config.json").read_text())
        processor = json.loads((path / "processor_config.json").read_text())
        self.architecture = raw["architectures"][0]
        self.reranker = self.architecture == "LlamaNemotronVLForSequenceClassification"
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        self.image_size = int(raw["force_image_size"])
        self.max_num = max_num or int(processor["max_input_tiles"])
        self.use_thumbnail = bool(processor["use_thumbnail"])
        self.downsample_ratio = float(raw["downsample_ratio"])
        self.ps_version = raw["ps_version"]
        vision_cfg = SiglipVisionConfig(**raw["vision_config"], vision_use_head=False)
        vision_cfg._attn_implementation = "eager"
        patch = vision_cfg.patch_size
        self.num_image_token = int((self.image_size // patch) ** 2 * self.downsample_ratio**2)
        llm = {k: v for k, v in raw["llm_config"].items() if k not in ("architectures", "model_type", "pooling")}
        llm_cfg = LlamaConfig(**llm)
        llm_cfg._attn_implementation = "eager"
        for cfg in (vision_cfg, llm_cfg):
            cfg.dtype = torch.float32
        self.vision_model = SiglipVisionModel(vision_cfg).eval()
        self.language_model = LlamaModel(llm_cfg).eval()
        for layer in self.language_model.layers:
            layer.self_attn.is_causal = False
        vit_hidden = vision_cfg.hidden_size * int(1 / self.downsample_ratio) ** 2
        hidden = llm_cfg.hidden_size
        self.mlp1 = torch.nn.Sequential(
            torch.nn.LayerNorm(vit_hidden),
            torch.nn.Linear(vit_hidden, hidden),
            torch.nn.GELU(),
            torch.nn.Linear(hidden, hidden),
        ).eval()
        self.img_context_token_id = int(raw["img_context_token_id"])
        self.temperature = float(raw.get("temperature", 1.0))

        state = load_file(str(path / "model.safetensors"))
        if self.reranker:
            self.score = state.pop("score.weight").float()
            state = {k.removeprefix("model."): v for k, v in state.items()}
        vision = {}
        for k, v in state.items():
            if k.startswith("vision_model.vision_model."):
                vision[k[len("vision_model.vision_model.") :]] = v
            elif k.startswith("vision_model."):
                vision[k[len("vision_model.") :]] = v
        language = {k[len("language_model.") :]: v for k, v in state.items() if k.startswith("language_model.")}
        mlp = {k[len("mlp1.") :]: v for k, v in state.items() if k.startswith("mlp1.")}
        assert len(vision) + len(language) + len(mlp) == len(state), sorted(state)
        for module, part in ((self.vision_model, vision), (self.language_model, language), (self.mlp1, mlp)):
            result = module.load_state_dict(part, strict=True)
            assert not result.missing_keys and not result.unexpected_keys, result

    # --- prompts ---------------------------------------------------------------------------------

    def tiles(self, image: Image.Image) -> list[Image.Image]:
        return nvidia_dynamic_preprocess(
            image, 1, self.max_num, image_size=self.image_size, use_thumbnail=self.use_thumbnail
        )

    def expand(self, text: str, images: Sequence[Image.Image]) -> str:
        for image in images:
            n = len(self.tiles(image))
            text = text.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (self.num_image_token * n) + "</img>", 1)
        return text

    def raw_ids(self, parts: Sequence[Part]) -> tuple[list[int], list[Image.Image]]:
        """vLLM's prompt for an item: one `<image>` per image first, then the texts joined by "\\n"; with BOS."""
        images = [decode_image(p) for p in parts if isinstance(p, bytes)]
        texts = [p for p in parts if isinstance(p, str)]
        text = "<image>" * len(images) + "\n".join(texts)
        return list(self.tokenizer(self.expand(text, images))["input_ids"]), images

    def chat_ids(self, template: str, role: str, parts: Sequence[Part]) -> tuple[list[int], list[Image.Image]]:
        """A one-message chat through `template` (transformers' apply_chat_template), no added specials."""
        images = [decode_image(p) for p in parts if isinstance(p, bytes)]
        content = [{"type": "image"} if isinstance(p, bytes) else {"type": "text", "text": p} for p in parts]
        text = self.tokenizer.apply_chat_template(
            [{"role": role, "content": content}], chat_template=template, tokenize=False
        )
        ids = self.tokenizer(self.expand(text, images), add_special_tokens=False)["input_ids"]
        return list(ids), images

    def rerank_ids(self, query: str, document: Sequence[Part]) -> tuple[list[int], list[Image.Image]]:
        """NVIDIA's reranker prompt: "<image> " if the document has an image, then "question:q \\n \\n passage:d"."""
        images = [decode_image(p) for p in document if isinstance(p, bytes)]
        text = "\n".join(p for p in document if isinstance(p, str))
        prompt = ("<image> " if images else "") + f"question:{query} \n \n passage:{text}"
        return list(self.tokenizer(self.expand(prompt, images))["input_ids"]), images

    # --- model -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def hidden(self, ids: list[int], images: Sequence[Image.Image]) -> torch.Tensor:
        input_ids = torch.tensor([ids])
        input_embeds = self.language_model.embed_tokens(input_ids)
        if images:
            pixel_values = torch.cat([to_pixel_values(self.tiles(image)) for image in images])
            vit_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
            h = w = int(vit_embeds.shape[1] ** 0.5)
            vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], h, w, -1)
            vit_embeds = nvidia_pixel_shuffle(vit_embeds, self.downsample_ratio, self.ps_version)
            vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], -1, vit_embeds.shape[-1])
            vit_embeds = self.mlp1(vit_embeds)
            b, n, c = input_embeds.shape
            flat = input_embeds.reshape(b * n, c)
            selected = input_ids.reshape(b * n) == self.img_context_token_id
            assert int(selected.sum()) == vit_embeds.shape[0] * vit_embeds.shape[1]
            flat[selected] = vit_embeds.reshape(-1, c)
            input_embeds = flat.reshape(b, n, c)
        mask = torch.zeros((1, 1, len(ids), len(ids)), dtype=torch.float32)  # padding-only, and no padding
        position_ids = torch.arange(len(ids)).unsqueeze(0)
        out = self.language_model(inputs_embeds=input_embeds, attention_mask=mask, position_ids=position_ids)
        hidden: torch.Tensor = out.last_hidden_state[0].float()
        return hidden

    def pooled(self, ids: list[int], images: Sequence[Image.Image]) -> torch.Tensor:
        hidden = self.hidden(ids, images)
        attention = torch.ones(hidden.shape[0], 1)
        return (hidden * attention).sum(0) / attention.sum()

    def embedding(self, ids: list[int], images: Sequence[Image.Image]) -> np.ndarray:
        return F.normalize(self.pooled(ids, images), dim=-1).numpy()

    def embed(self, parts: Sequence[Part]) -> np.ndarray:
        return self.embedding(*self.raw_ids(parts))

    def logit(self, ids: list[int], images: Sequence[Image.Image]) -> float:
        return float((self.pooled(ids, images) @ self.score.T)[0] / self.temperature)

    def rerank_score(self, query: str, document: Sequence[Part], *, activation: bool = True) -> float:
        logit = self.logit(*self.rerank_ids(query, document))
        return float(torch.sigmoid(torch.tensor(logit))) if activation else logit


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def chat_template_text(path: Path) -> str:
    return path.read_text(encoding="utf-8")
