"""ColQwen3 late-interaction family (Qwen3-VL backbone): text and image inputs, one vector per token.

Three layouts, one model (vllm-spec 1.4; weights mapped in `qwen_vl.weights`):

* `ColQwen3` (TomoroAI/tomoro-colqwen3-embed-*): `vlm.model.*` backbone, `embedding_proj_layer` head,
  dim from config `embed_dim`;
* `OpsColQwen3Model` (OpenSearch-AI/Ops-Colqwen3-*): unprefixed backbone, `custom_text_proj` head, dim
  from config `dims`; a projection wider than `dims` keeps its first `dims` outputs, as the reference's
  Matryoshka truncation `proj(h)[..., :dims]` does;
* `Qwen3VLNemotronEmbedModel` (nvidia/nemotron-colembed-vl-*): `model.*` backbone, no projection (the
  normalised last hidden states are the vectors), and bidirectional text attention as NVIDIA's code runs
  it. vLLM serves this architecture causally; lateserve follows the model's own code.

Raw mode (the default) uses vLLM's prompts (`qwen_vl.prompts`): a text is tokenized as is; an image item
is one `<|vision_start|><|image_pad|>…<|vision_end|>` per image, all first, then its text parts joined by
"\\n"; a chat is rendered with the model's template and each image pad expanded to the image's token count.

Faithful modes (embedding_mode "query" / "document", and /score and /rerank under
--scoring-embedding-mode faithful) build the reference processors' prompts instead (`qwen_vl.faithful`):
queries with the query prefix and ten `<|endoftext|>` augmentation tokens, image documents inside
"<|im_start|>user\\n…Describe the image.<|im_end|>…", the variant chosen by the architecture; Nemotron's
prompts are not public, so it refuses them (400 on embedding_mode).

Projection bias: the Tomoro and Ops heads are `nn.Linear(hidden, dim)` with a bias in the reference code,
and lateserve loads that bias when the checkpoint has it. vLLM's ColQwen3 builds the layer with
`bias=False` and silently skips the checkpoint's bias (it fixed the same bug for ColQwen3.5 only), so its
ColQwen3 vectors differ from the reference models' and from lateserve's by that bias.

The processor runs in the server process without torch: images are fetched and decoded under the
server's media policy and prepared by `qwen_vl.image_processor` (pixel values, grid); the worker runs
`qwen_vl.runner` on transformers' Qwen3VLModel.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from collections.abc import Sequence as Seq
from dataclasses import replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from lateserve.server import media
from lateserve.server.domain import (
    ChatItem,
    EmbeddingMode,
    EncodeOptions,
    ImagePart,
    InvalidArgument,
    Item,
    MediaPayload,
    Modality,
    ModelLoadError,
    ModelSpec,
    MultiModalItem,
    RenderedChat,
    Role,
    Sequence,
    Tensor,
    TextItem,
    TokenItem,
    truncation_cuts_image,
)
from lateserve.server.families import loading
from lateserve.server.families.base import Family
from lateserve.server.families.colbert import BertProcessor
from lateserve.server.families.qwen_vl import faithful
from lateserve.server.families.qwen_vl.faithful import FaithfulPrompts
from lateserve.server.families.qwen_vl.image_processor import PreparedImage, QwenVisionSettings, preprocess
from lateserve.server.families.qwen_vl.prompts import IMAGE_PAD, expand_image_pads, raw_prompt
from lateserve.server.families.qwen_vl.weights import split_checkpoint
from lateserve.server.families.tokenizer import TextTokenizer

if TYPE_CHECKING:
    from PIL import Image

    from lateserve.server.families.qwen_vl.runner import Head, QwenVLRunner

DIM_KEYS = ("embed_dim", "dims", "dim", "projection_dim", "colbert_dim")
"""Where the projection width is configured, in vLLM's order (first truthy wins)."""

TOMORO, OPS, NEMOTRON = "ColQwen3", "OpsColQwen3Model", "Qwen3VLNemotronEmbedModel"
PREPROCESSOR_CONFIG = "preprocessor_config.json"


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The Qwen3-VL text config (top level, or inside a ColPali-style `vlm_config`)."""
    base = config.get("vlm_config") if isinstance(config.get("vlm_config"), Mapping) else config
    text = base.get("text_config") if isinstance(base, Mapping) else None
    if not isinstance(text, Mapping):
        raise ModelLoadError("config.json has no text_config: not a Qwen3-VL checkpoint")
    return text


class ColQwen3Family(Family):
    """The three ColQwen3 layouts; the architecture picks the head and the attention direction."""

    architectures = (TOMORO, OPS, NEMOTRON)

    @cached_property
    def architecture(self) -> str:
        declared = self.source.config.get("architectures") or []
        return next((a for a in declared if a in self.architectures), self.architectures[0])

    @cached_property
    def _hidden(self) -> int:
        return int(text_config(self.source.config)["hidden_size"])

    @cached_property
    def _token_dim(self) -> int:
        if self.architecture == NEMOTRON:
            return self._hidden
        configured = next((self.source.config[k] for k in DIM_KEYS if self.source.config.get(k)), None)
        if configured is not None:
            return int(configured)
        shapes = split_checkpoint(loading.read_safetensors_shapes(self.source.path)).projection
        if "weight" not in shapes:
            raise ModelLoadError(
                f"{self.architecture} checkpoint {self.source.path} has no projection "
                "(custom_text_proj.weight or embedding_proj_layer.weight) and config.json names no dim"
            )
        return int(shapes["weight"][0])

    @cached_property
    def _max_model_len(self) -> int:
        positions = int(text_config(self.source.config).get("max_position_embeddings") or 128000)
        return loading.max_model_len(self.source, positions)

    def spec(self) -> ModelSpec:
        spec = ModelSpec.late_interaction(self.architecture, self._token_dim, self._max_model_len)
        return replace(spec, modalities=frozenset({Modality.TEXT, Modality.IMAGE}))

    def head(self) -> Head:
        from lateserve.server.families.qwen_vl.runner import Head

        if self.architecture == NEMOTRON:
            return Head(dim=self._hidden, projected=False, bidirectional=True)
        return Head(dim=self._token_dim, projected=True, truncate=self.architecture == OPS)

    def processor(self) -> QwenVLProcessor:
        tokenizer = loading.load_tokenizer(self.source.path, trust_remote_code=self.source.trust_remote_code)
        text = text_config(self.source.config)
        pad_id = tokenizer.token_to_id(IMAGE_PAD)
        configured = self.source.config.get("image_token_id")
        if pad_id is None or (configured is not None and int(configured) != pad_id):
            raise ModelLoadError(
                f"{self.source.path}: the tokenizer's {IMAGE_PAD} id ({pad_id}) is not config.json "
                f"image_token_id ({configured})"
            )
        preprocessor = self.source.read_json(PREPROCESSOR_CONFIG)
        try:
            settings = QwenVisionSettings.from_config(preprocessor, self.source.mm_processor_kwargs)
        except ValueError as exc:
            raise ModelLoadError(f"{self.source.path}: image processor settings: {exc}") from exc
        return QwenVLProcessor(
            tokenizer,
            architecture=self.architecture,
            vocab_size=int(text.get("vocab_size") or len(tokenizer)),
            max_model_len=self._max_model_len,
            image_pad_id=pad_id,
            preprocessor_config=preprocessor,
            base_kwargs=self.source.mm_processor_kwargs,
            settings=settings,
            media_policy=self.source.media,
            chat_template=self.source.chat_template,
        )

    def runner(self, device: str, dtype: str) -> QwenVLRunner:
        from lateserve.server.families.qwen_vl.runner import QwenVLRunner

        return QwenVLRunner(self.source, architecture=self.architecture, head=self.head(), device=device, dtype=dtype)


class QwenVLProcessor(BertProcessor):
    """Raw-mode tokenization plus image preparation. Text, token and tokenizer routes are BertProcessor's
    (Qwen's tokenizer adds no special tokens); image items and rendered chats are built here.

    Faithful modes use `faithful_prompts`, by default the architecture's entry in
    `qwen_vl.faithful.FAITHFUL_PROMPTS` (so ColQwen3.5, passing architecture "ColQwen3_5", gets
    colpali-engine's ColQwen3_5 prompts); None refuses them."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        *,
        architecture: str,
        vocab_size: int,
        max_model_len: int,
        image_pad_id: int,
        preprocessor_config: Mapping[str, Any] | None,
        base_kwargs: Mapping[str, Any],
        settings: QwenVisionSettings,
        media_policy: media.MediaPolicy,
        chat_template: str | None = None,
        faithful_prompts: FaithfulPrompts | str | None = "architecture",
    ) -> None:
        super().__init__(
            tokenizer,
            architecture=architecture,
            vocab_size=vocab_size,
            max_model_len=max_model_len,
            colbert=None,
            chat_template=chat_template,
        )
        self._image_pad_id = image_pad_id
        self._preprocessor_config = dict(preprocessor_config or {})
        self._base_kwargs = dict(base_kwargs)
        self._settings = settings
        self._settings_cache: dict[str, QwenVisionSettings] = {}
        self._media = media_policy
        self._faithful = (
            faithful.faithful_prompts(architecture) if isinstance(faithful_prompts, str) else faithful_prompts
        )

    def encode(self, item: Item, options: EncodeOptions, role: Role) -> Sequence:
        if options.embedding_mode in (EmbeddingMode.QUERY, EmbeddingMode.DOCUMENT):
            return self._encode_faithful(item, options)
        self._check_mode(options)
        if isinstance(item, MultiModalItem):
            text, images = raw_prompt(item.parts)
            return self._with_images(
                text, [(f"content[{k}].image_url", p) for k, p in images], options, pads_in_text=False
            )
        if isinstance(item, RenderedChat) and item.images:
            places = [(f"images[{j}].image_url", p) for j, p in enumerate(item.images)]
            return self._with_images(item.text, places, options, pads_in_text=True)
        seq = super().encode(item, options, role)
        self._check_no_pads(seq.ids)
        return seq

    def encode_many(self, items: Seq[Item], options: EncodeOptions, role: Role) -> list[Sequence]:
        faithful_mode = options.embedding_mode in (EmbeddingMode.QUERY, EmbeddingMode.DOCUMENT)
        if faithful_mode or not all(isinstance(i, TextItem | TokenItem) for i in items):
            return [self.encode(item, options, role) for item in items]
        self._check_mode(options)
        sequences = super().encode_many(items, options, role)
        for seq in sequences:
            self._check_no_pads(seq.ids)
        return sequences

    def _check_mode(self, options: EncodeOptions) -> None:
        if options.embedding_mode not in (EmbeddingMode.RAW, EmbeddingMode.AUTO):
            raise InvalidArgument(
                f"embedding_mode {options.embedding_mode.value!r} is not available for {self._architecture}; "
                "it serves 'raw' (vLLM's prompts) only",
                field="embedding_mode",
            )

    def render(self, chat: ChatItem) -> RenderedChat:
        """The chat template's prompt, keeping the messages for faithful modes (`faithful.PartsChat`)."""
        rendered = super().render(chat)
        return faithful.PartsChat(rendered.text, rendered.images, chat=chat)

    def _encode_faithful(self, item: Item, options: EncodeOptions) -> Sequence:
        """The reference processor's prompt (`qwen_vl.faithful`), images prepared as in raw mode.

        The tokenizer's own special tokens are added as the references add them (Qwen's adds none);
        truncate_prompt_tokens cuts text as in raw mode and refuses to cut an image."""
        mode = options.embedding_mode
        if self._faithful is None:
            raise faithful.refusal(self._architecture, mode)
        prompt = faithful.build(self._faithful, item, mode)
        options = replace(options, add_special_tokens=True)
        if prompt.images:
            return self._with_images(prompt.text, list(prompt.images), options, pads_in_text=False)
        limit = options.truncate_prompt_tokens
        if limit == -1:
            limit = self._max_model_len
        ids = self._encode_text(prompt.text, True, limit, options.truncation_side)
        self._check_no_pads(ids)
        return Sequence(ids=tuple(ids), prompt_tokens=len(ids))

    def _check_no_pads(self, ids: Seq[int]) -> None:
        if self._image_pad_id in ids:
            raise InvalidArgument(f"text input contains the image placeholder {IMAGE_PAD} but carries no image")

    def _with_images(
        self,
        text: str,
        images: list[tuple[str, ImagePart]],
        options: EncodeOptions,
        *,
        pads_in_text: bool,
    ) -> Sequence:
        """Tokenize `text` (one pad per image), prepare the images, expand the pads, attach the payloads."""
        settings = self._request_settings(options)
        prepared: list[tuple[PreparedImage, bytes]] = []
        for where, part in images:
            image = media.load_image(part.url, self._media, where)
            prepared.append((self._prepare(image, settings, where), self._digest(image, settings)))
        ids = self._tokenizer.encode(text, add_special_tokens=options.add_special_tokens).ids
        try:
            ids, offsets = expand_image_pads(ids, self._image_pad_id, [p.num_tokens for p, _ in prepared])
        except InvalidArgument as exc:
            if pads_in_text:
                exc.message = f"the chat template's placeholders do not match the images: {exc.message}"
                exc.args = (exc.message,)
            raise
        limit = options.truncate_prompt_tokens
        if limit is not None and limit != -1 and len(ids) > limit:
            raise truncation_cuts_image(limit, len(ids))
        payloads = tuple(
            MediaPayload(
                modality=Modality.IMAGE,
                arrays=(
                    ("pixel_values", Tensor.from_numpy(p.pixel_values, "float32")),
                    ("grid_thw", Tensor.from_numpy(np.asarray([p.grid_thw], dtype=np.int64), "int64")),
                ),
                offset=offset,
                length=p.num_tokens,
                digest=digest,
                cost=p.num_patches,
                token_grid=(p.grid_thw[1] // p.merge_size, p.grid_thw[2] // p.merge_size),
            )
            for (p, digest), offset in zip(prepared, offsets, strict=True)
        )
        return Sequence(ids=tuple(ids), prompt_tokens=len(ids), media=payloads)

    @staticmethod
    def _prepare(image: Image.Image, settings: QwenVisionSettings, where: str) -> PreparedImage:
        try:
            return preprocess(image, settings)
        except ValueError as exc:  # aspect ratio over 200, as transformers refuses it
            raise InvalidArgument(f"image cannot be prepared: {exc}", field=where) from exc

    def _request_settings(self, options: EncodeOptions) -> QwenVisionSettings:
        """The server's settings, or those with the request's mm_processor_kwargs on top (vLLM merges the
        request's over --mm-processor-kwargs)."""
        if not options.mm_processor_kwargs:
            return self._settings
        merged = {**self._base_kwargs, **dict(options.mm_processor_kwargs)}
        key = json.dumps(merged, sort_keys=True, default=str)
        settings = self._settings_cache.get(key)
        if settings is None:
            try:
                settings = QwenVisionSettings.from_config(self._preprocessor_config, merged)
            except (ValueError, TypeError) as exc:
                raise InvalidArgument(str(exc), field="mm_processor_kwargs") from exc
            if len(self._settings_cache) < 64:
                self._settings_cache[key] = settings
        return settings

    @staticmethod
    def _digest(image: Image.Image, settings: QwenVisionSettings) -> bytes:
        """The decoded pixels' digest and every setting that shapes the pixel values and the grid."""
        digest = hashlib.blake2b(digest_size=32, person=b"lateserve-qwenvl")
        digest.update(media.image_digest(image))
        digest.update(repr(settings).encode())
        return digest.digest()
