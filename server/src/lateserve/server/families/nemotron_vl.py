"""Llama-Nemotron-VL: multimodal embeddings (bi-encoder) and multimodal reranking (cross-encoder).

* `LlamaNemotronVLModel` (nvidia/llama-nemotron-embed-vl-1b-v2): SigLIP vision tower, pixel shuffle, `mlp1`,
  bidirectional Llama, pooling from the config (avg: mean over every prompt token), L2-normalised `embed`
  (and `token_embed`, as vLLM's embedding pooler offers both). /score and /rerank: cosine of the two sides'
  embed vectors (bi-encoder).
* `LlamaNemotronVLForSequenceClassification` (nvidia/llama-nemotron-rerank-vl-1b-v2): the same backbone under
  `model.*` plus a `score` head without bias; the logit is divided by the config's `temperature` (1 by
  default); the engine applies the sigmoid unless `use_activation` is false. /score and /rerank build one
  prompt per pair (cross-encoder).

Prompts are vLLM's (`internvl.prompts`): a text as is with the tokenizer's BOS; a multimodal item as one
`<image>` per image then its texts joined by "\\n"; a chat through the chat template (`--chat-template
examples/pooling/embed/template/nemotron_embed_vl.jinja` gives `bos + "query: "/"passage: " + "<image> " * n +
text`); a reranker pair through the score template (`--chat-template
examples/pooling/score/template/nemotron-vl-rerank.jinja`) rendered with messages
`[{"role": "query", "content": q}, {"role": "document", "content": d}]` where a multimodal side's content is
`"<image>" * n + text`, then tokenized with BOS. Without --chat-template the reranker builds NVIDIA's own
prompt, which is what that template renders: `("<image> " if the document has an image) +
"question:{q} \\n \\n passage:{d}"` (config `prompt_template`). Each `<image>` becomes `<img>` +
`<IMG_CONTEXT>` x (tiles x tokens per tile) + `</img>`.

Images are decoded under the server's media policy and tiled in the server process (`internvl.tiling`:
Pillow + numpy, NVIDIA's area-aware grid choice, row-major tiles, thumbnail last); tile size and bounds come
from processor_config.json (`max_input_tiles`, `min_input_tiles`, `use_thumbnail`, `dynamic_image_size`),
overridable by --mm-processor-kwargs and per-request `mm_processor_kwargs`. The worker runs
`internvl.runner` (transformers' SiglipVisionModel and LlamaModel). `--trust-remote-code` is accepted; no
remote code is run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from collections.abc import Sequence as Seq
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from lateserve.server import media
from lateserve.server.domain import (
    EmbeddingMode,
    EncodeOptions,
    ImagePart,
    InvalidArgument,
    Item,
    MediaPayload,
    Modality,
    ModelKind,
    ModelLoadError,
    ModelSpec,
    MultiModalItem,
    RenderedChat,
    Role,
    Sequence,
    Task,
    Tensor,
    TextItem,
    TokenItem,
    truncation_cuts_image,
)
from lateserve.server.families import loading
from lateserve.server.families.base import Family
from lateserve.server.families.colbert import BertProcessor
from lateserve.server.families.internvl.config import VLConfig
from lateserve.server.families.internvl.prompts import (
    IMAGE,
    IMG_CONTEXT,
    compact_placeholders,
    expand_context,
    raw_prompt,
)
from lateserve.server.families.internvl.tiling import TilingSettings, tile_image
from lateserve.server.families.tokenizer import TextTokenizer

if TYPE_CHECKING:
    from lateserve.server.families.internvl.runner import NemotronVLRunner

EMBED_ARCH = "LlamaNemotronVLModel"
RERANK_ARCH = "LlamaNemotronVLForSequenceClassification"
PROCESSOR_CONFIG = "processor_config.json"
EMBED_TASKS = frozenset({Task.EMBED, Task.TOKEN_EMBED})
RERANK_TASKS = frozenset({Task.CLASSIFY})
PROMPT_V1 = "question:{query} \n \n passage:{passage}"
"""NVIDIA's reranker prompt (`prompt_template` "v1"), the text nemotron-vl-rerank.jinja renders."""


def rerank_prompt(config: Mapping[str, Any]) -> str:
    """config.json `prompt_template`: a template with {query} and {passage}, else (absent, "v1") NVIDIA's v1."""
    value = config.get("prompt_template")
    if isinstance(value, str) and "{query}" in value and "{passage}" in value:
        return value
    return PROMPT_V1


class NemotronVLFamily(Family):
    """Both Llama-Nemotron-VL architectures: the architecture picks the head and the scoring kind."""

    architectures = (EMBED_ARCH, RERANK_ARCH)

    @cached_property
    def architecture(self) -> str:
        declared = self.source.config.get("architectures") or []
        return next((a for a in declared if a in self.architectures), self.architectures[0])

    @property
    def reranker(self) -> bool:
        return self.architecture == RERANK_ARCH

    @cached_property
    def config(self) -> VLConfig:
        return VLConfig.from_dict(self.source.config)

    @cached_property
    def _max_model_len(self) -> int:
        return loading.max_model_len(self.source, self.config.max_positions)

    def spec(self) -> ModelSpec:
        modalities = frozenset({Modality.TEXT, Modality.IMAGE})
        hidden = self.config.hidden_size
        if self.reranker:
            return ModelSpec(
                architecture=self.architecture,
                kind=ModelKind.CROSS_ENCODER,
                tasks=RERANK_TASKS,
                default_task=Task.CLASSIFY,
                token_dim=0,
                embed_dim=0,
                max_model_len=self._max_model_len,
                num_labels=self.config.num_labels,
                modalities=modalities,
            )
        return ModelSpec(
            architecture=self.architecture,
            kind=ModelKind.BI_ENCODER,
            tasks=EMBED_TASKS,
            default_task=Task.EMBED,
            token_dim=hidden,
            embed_dim=hidden,
            max_model_len=self._max_model_len,
            modalities=modalities,
        )

    def processor(self) -> NemotronVLProcessor:
        tokenizer = loading.load_tokenizer(self.source.path, trust_remote_code=self.source.trust_remote_code)
        context_id = tokenizer.token_to_id(IMG_CONTEXT)
        configured = self.config.img_context_token_id
        if context_id is None or (configured is not None and configured != context_id):
            raise ModelLoadError(
                f"{self.source.path}: the tokenizer's {IMG_CONTEXT} id ({context_id}) is not config.json "
                f"img_context_token_id ({configured})"
            )
        processor_config = self.source.read_json(PROCESSOR_CONFIG)
        try:
            settings = TilingSettings.from_config(
                self.config.image_size, processor_config, self.source.mm_processor_kwargs, fallback=self.source.config
            )
        except ValueError as exc:
            raise ModelLoadError(f"{self.source.path}: image processor settings: {exc}") from exc
        return NemotronVLProcessor(
            tokenizer,
            architecture=self.architecture,
            vocab_size=int(self.config.llm.get("vocab_size") or len(tokenizer)),
            max_model_len=self._max_model_len,
            context_id=context_id,
            config=self.config,
            settings=settings,
            processor_config=processor_config,
            base_kwargs=self.source.mm_processor_kwargs,
            media_policy=self.source.media,
            chat_template=self.source.chat_template,
            pair_prompt=rerank_prompt(self.source.config) if self.reranker else None,
            fallback=self.source.config,
        )

    def runner(self, device: str, dtype: str) -> NemotronVLRunner:
        from lateserve.server.families.internvl.runner import Head, NemotronVLRunner

        head = Head(tasks=RERANK_TASKS, classifier=True) if self.reranker else Head(tasks=EMBED_TASKS)
        return NemotronVLRunner(self.source, architecture=self.architecture, head=head, device=device, dtype=dtype)


class NemotronVLProcessor(BertProcessor):
    """Text, token and tokenizer routes are BertProcessor's (raw mode: the tokenizer adds its BOS); image
    items, rendered chats with images and reranker pairs are built here."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        *,
        architecture: str,
        vocab_size: int,
        max_model_len: int,
        context_id: int,
        config: VLConfig,
        settings: TilingSettings,
        processor_config: Mapping[str, Any] | None,
        base_kwargs: Mapping[str, Any],
        media_policy: media.MediaPolicy,
        chat_template: str | None = None,
        pair_prompt: str | None = None,
        fallback: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            tokenizer,
            architecture=architecture,
            vocab_size=vocab_size,
            max_model_len=max_model_len,
            colbert=None,
            chat_template=chat_template,
        )
        self._context_id = context_id
        self._config = config
        self._settings = settings
        self._processor_config = dict(processor_config or {})
        self._base_kwargs = dict(base_kwargs)
        self._settings_cache: dict[str, TilingSettings] = {}
        self._media = media_policy
        self._pair_prompt = pair_prompt
        self._fallback = {k: v for k, v in (fallback or {}).items() if not isinstance(v, Mapping | list)}

    # --- single inputs ----------------------------------------------------------------------------

    def encode(self, item: Item, options: EncodeOptions, role: Role) -> Sequence:
        self._check_mode(options)
        if isinstance(item, MultiModalItem):
            text, images = raw_prompt(item.parts)
            return self._with_images(text, [(f"content[{k}].image_url", p) for k, p in images], options)
        if isinstance(item, RenderedChat) and item.images:
            places = [(f"images[{j}].image_url", p) for j, p in enumerate(item.images)]
            try:
                return self._with_images(item.text, places, options)
            except InvalidArgument as exc:
                if exc.field is None:
                    exc.message = f"the chat template's placeholders do not match the images: {exc.message}"
                    exc.args = (exc.message,)
                raise
        seq = super().encode(item, options, role)
        self._check_no_context(seq.ids)
        return seq

    def encode_many(self, items: Seq[Item], options: EncodeOptions, role: Role) -> list[Sequence]:
        if not all(isinstance(i, TextItem | TokenItem) for i in items):
            return [self.encode(item, options, role) for item in items]
        self._check_mode(options)
        sequences = super().encode_many(items, options, role)
        for seq in sequences:
            self._check_no_context(seq.ids)
        return sequences

    # --- cross-encoder pairs ------------------------------------------------------------------------

    def encode_pair(self, query: Item, document: Item, options: EncodeOptions) -> Sequence:
        """One reranker prompt: the score template (--chat-template) with messages [query, document], else
        NVIDIA's prompt; images of both sides in order (query first), each behind one `<image>`."""
        if self._pair_prompt is None:
            return super().encode_pair(query, document, options)
        self._check_mode(options)
        q_text, q_images = self._pair_side(query, "query")
        d_text, d_images = self._pair_side(document, "document")
        if self._chat.configured:
            messages = [{"role": "query", "content": q_text}, {"role": "document", "content": d_text}]
            text = self.render_chat(messages, False)
        else:
            if q_images:
                raise InvalidArgument(
                    f"{self._architecture} reads images from documents only; the query has {len(q_images)}",
                    field="query",
                )
            prefix = IMAGE + " " if IMAGE in d_text else ""
            body = self._pair_prompt.replace("{query}", q_text.replace(IMAGE, ""))
            text = prefix + body.replace("{passage}", d_text.replace(IMAGE, ""))
        if not q_images + d_images:
            seq = super().encode(TextItem(text), options, "input")
            self._check_no_context(seq.ids)
            return seq
        places = [("query", p) for p in q_images] + [("input", p) for p in d_images]
        return self._with_images(text, places, options)

    @staticmethod
    def _pair_side(item: Item, side: str) -> tuple[str, list[ImagePart]]:
        if isinstance(item, TextItem):
            return item.text, []
        if isinstance(item, MultiModalItem):
            text, images = raw_prompt(item.parts)
            return text, [p for _, p in images]
        raise InvalidArgument("a reranker pair needs text or content parts; token ids cannot be paired", field=side)

    # --- images -------------------------------------------------------------------------------------

    def _check_mode(self, options: EncodeOptions) -> None:
        if options.embedding_mode not in (EmbeddingMode.RAW, EmbeddingMode.AUTO):
            raise InvalidArgument(
                f"embedding_mode {options.embedding_mode.value!r} is not available for {self._architecture}",
                field="embedding_mode",
            )

    def _check_no_context(self, ids: Seq[int]) -> None:
        if self._context_id in ids:
            raise InvalidArgument(f"text input contains the image token {IMG_CONTEXT} but carries no image")

    def _with_images(self, text: str, images: Seq[tuple[str, ImagePart]], options: EncodeOptions) -> Sequence:
        """Tile the images, tokenize `text` with one context token per image, expand, attach the tiles."""
        settings = self._request_settings(options)
        prepared: list[tuple[np.ndarray, bytes]] = []
        for where, part in images:
            image = media.load_image(part.url, self._media, where)
            prepared.append((tile_image(image, settings), self._digest(image, settings)))
        compact = compact_placeholders(text, len(images))
        ids = self._tokenizer.encode(compact, add_special_tokens=options.add_special_tokens).ids
        per_tile = self._config.tokens_per_tile
        ids, offsets = expand_context(ids, self._context_id, [len(t) * per_tile for t, _ in prepared])
        limit = options.truncate_prompt_tokens
        if limit is not None and limit != -1 and len(ids) > limit:
            raise truncation_cuts_image(limit, len(ids))
        payloads = tuple(
            MediaPayload(
                modality=Modality.IMAGE,
                arrays=(("tiles", Tensor.from_numpy(tiles, "uint8")),),
                offset=offset,
                length=len(tiles) * per_tile,
                digest=digest,
                cost=len(tiles) * self._config.patches_per_tile,
            )
            for (tiles, digest), offset in zip(prepared, offsets, strict=True)
        )
        return Sequence(ids=tuple(ids), prompt_tokens=len(ids), media=payloads)

    def _request_settings(self, options: EncodeOptions) -> TilingSettings:
        """The server's settings, or the request's mm_processor_kwargs over --mm-processor-kwargs (vLLM's merge)."""
        if not options.mm_processor_kwargs:
            return self._settings
        merged = {**self._base_kwargs, **dict(options.mm_processor_kwargs)}
        key = json.dumps(merged, sort_keys=True, default=str)
        settings = self._settings_cache.get(key)
        if settings is None:
            try:
                settings = TilingSettings.from_config(
                    self._config.image_size, self._processor_config, merged, fallback=self._fallback
                )
            except (ValueError, TypeError) as exc:
                raise InvalidArgument(str(exc), field="mm_processor_kwargs") from exc
            if len(self._settings_cache) < 64:
                self._settings_cache[key] = settings
        return settings

    @staticmethod
    def _digest(image: Any, settings: TilingSettings) -> bytes:
        digest = hashlib.blake2b(digest_size=32, person=b"lateserve-nvl")
        digest.update(media.image_digest(image))
        digest.update(repr(settings).encode())
        return digest.digest()
