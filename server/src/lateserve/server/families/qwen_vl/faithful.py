"""Faithful (reference) prompts of the Qwen-VL late-interaction models: embedding_mode "query" / "document".

vLLM encodes a ColQwen input as is (`prompts.raw_prompt`); the models were trained with their processors'
prompts, which vLLM does not build (vl-families §0.1, §2). These are those prompts, per architecture:

* colpali-engine 0.3.18 `ColQwen3Processor` (and `ColQwen3_5Processor`, architecture `ColQwen3_5`):
  - query: `"" + q + "<|endoftext|>" * 10` (process_queries: query_prefix, text, 10 augmentation tokens);
  - image document: `<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.`
    `<|im_end|><|endoftext|>` (process_images; the pad expanded to the image's token count);
  - text document: the text as is (process_texts).
* Tomoro (`ColQwen3`): colpali's, except that the query is `q.strip()` and an image document may carry a
  text, written as `" " + text` before `<|im_end|>`.
* OpenSearch (`OpsColQwen3Model`): query `"Query: " + q + "<|endoftext|>" * 10`; image document colpali's
  with `<|im_start|>assistant\n` inserted before the final `<|endoftext|>`; text document colpali's.
* NVIDIA (`Qwen3VLNemotronEmbedModel`): its processor's prompts are not documented, so faithful modes are
  refused (400 on embedding_mode).

* Text documents: no reference processor above has a text-document prompt of its own. colpali-engine's
  `process_texts` (its one text path without the query augmentation) tokenizes the text as is, and that is
  what lateserve does; it is the same as raw mode.
* Image documents hold exactly one image (the references take one image per document) and, except for
  Tomoro's optional text, no text parts. Images are decoded and prepared as in raw mode (bit-identical to
  transformers' Qwen2VLImageProcessorPil). One known difference: the media layer composites a transparent
  image onto white (as transformers' convert_to_rgb, and so Qwen3VLProcessor, does), while colpali's
  process_images calls `Image.convert("RGB")` first, which drops the alpha band; opaque images agree.
* Queries are text only; token ids need embedding_mode "raw". A chat (`messages`, the only way /pooling
  carries an image over HTTP) of exactly one message with an image is taken as that message's content
  parts, whatever its role: the reference prompt replaces the chat template. The engine renders chats
  before the mode is applied and hands a text-only chat over as its rendered text, so a text-only chat in
  a faithful mode is encoded from the template's text; send text as `input` instead.
* Ops's query prefix comes from a port of its Hub processor; MTEB's copy adds nothing (vl-families §2,
  conflict noted there). Tomoro's `strip()` and document text come from a copy of its remote processor.

ColQwen3.5 (architecture `ColQwen3_5`) reuses the ColQwen3 processor and gets colpali's ColQwen3_5 variant
through this table. Torch-free: this runs in the server process.
"""

from __future__ import annotations

from dataclasses import dataclass

from lateserve.server.domain import (
    ChatItem,
    EmbeddingMode,
    ImagePart,
    InvalidArgument,
    Item,
    MultiModalItem,
    Part,
    RenderedChat,
    TextItem,
    TextPart,
)
from lateserve.server.families.qwen_vl.prompts import IMAGE_PLACEHOLDER

ENDOFTEXT = "<|endoftext|>"
AUGMENTATION_TOKENS = 10
"""colpali-engine's process_queries appends its query_augmentation_token ten times."""

IM_START_USER = "<|im_start|>user\n"
DESCRIBE = "Describe the image."
IM_END = "<|im_end|>"
ASSISTANT = "<|im_start|>assistant\n"

COLPALI_IMAGE_PROMPT = IM_START_USER + IMAGE_PLACEHOLDER + DESCRIBE + IM_END + ENDOFTEXT
"""colpali-engine 0.3.18 ColQwen3Processor.visual_prompt_prefix (ColQwen3_5Processor has the same)."""

TOMORO, OPS, NEMOTRON, COLQWEN3_5 = "ColQwen3", "OpsColQwen3Model", "Qwen3VLNemotronEmbedModel", "ColQwen3_5"


@dataclass(frozen=True, slots=True)
class FaithfulPrompts:
    """How one reference processor writes queries and image documents."""

    reference: str
    """Whose processor this is, for messages and docs."""
    query_prefix: str = ""
    query_suffix: str = ENDOFTEXT * AUGMENTATION_TOKENS
    strip_query: bool = False
    before_document_text: str = IM_START_USER + IMAGE_PLACEHOLDER + DESCRIBE
    """The image document up to where a document text would go."""
    after_document_text: str = IM_END + ENDOFTEXT
    document_text: bool = False
    """Whether an image document may carry text (Tomoro: `" " + text` before `<|im_end|>`)."""

    def query(self, text: str) -> str:
        return self.query_prefix + (text.strip() if self.strip_query else text) + self.query_suffix

    def image_document(self, text: str | None) -> str:
        """One image (one unexpanded placeholder) and, where the reference takes one, its text."""
        middle = f" {text}" if text is not None and self.document_text else ""
        return self.before_document_text + middle + self.after_document_text


COLPALI = FaithfulPrompts("colpali-engine's ColQwen3/ColQwen3_5 processor")
TOMORO_PROMPTS = FaithfulPrompts("Tomoro's ColQwen3 processor", strip_query=True, document_text=True)
OPS_PROMPTS = FaithfulPrompts(
    "OpenSearch's Ops-ColQwen3 processor", query_prefix="Query: ", after_document_text=IM_END + ASSISTANT + ENDOFTEXT
)

FAITHFUL_PROMPTS: dict[str, FaithfulPrompts] = {TOMORO: TOMORO_PROMPTS, OPS: OPS_PROMPTS, COLQWEN3_5: COLPALI}
"""By architecture (config.json `architectures`)."""

REFUSED: dict[str, str] = {
    NEMOTRON: "NVIDIA's processor prompts for this model (query/passage prefixes, the text around the image) "
    "are not public"
}
"""Architectures whose reference prompts are unknown, and why faithful modes are refused for them."""


def faithful_prompts(architecture: str) -> FaithfulPrompts | None:
    """The architecture's reference prompts, or None (faithful modes then answer 400 on embedding_mode)."""
    return FAITHFUL_PROMPTS.get(architecture)


def refusal(architecture: str, mode: EmbeddingMode) -> InvalidArgument:
    """The 400 for a faithful mode on an architecture without reference prompts."""
    why = REFUSED.get(architecture, "lateserve knows no reference prompts for it")
    return InvalidArgument(
        f"embedding_mode {mode.value!r} is not available for {architecture}: {why}; it serves 'raw' "
        "(vLLM's prompts) only",
        field="embedding_mode",
    )


@dataclass(frozen=True, slots=True)
class FaithfulPrompt:
    """An item as the reference writes it: text with one unexpanded placeholder per image, and the images
    with the request field each came from."""

    text: str
    images: tuple[tuple[str, ImagePart], ...] = ()


@dataclass(frozen=True, slots=True)
class PartsChat(RenderedChat):
    """A rendered chat that keeps its messages, so faithful modes can rebuild the reference prompt from the
    content parts; raw mode uses it as the RenderedChat it is."""

    chat: ChatItem | None = None


def build(prompts: FaithfulPrompts, item: Item, mode: EmbeddingMode) -> FaithfulPrompt:
    """The reference prompt of `item` as a query (mode QUERY) or a document (DOCUMENT).

    Raises InvalidArgument naming embedding_mode for what the reference cannot encode: images in a query,
    several images or (except Tomoro) text beside the image in a document, chats and token ids.
    """
    if mode not in (EmbeddingMode.QUERY, EmbeddingMode.DOCUMENT):
        raise InvalidArgument(f"unsupported embedding_mode {mode.value!r}", field="embedding_mode")
    where = "content[{k}].image_url"
    if isinstance(item, TextItem):
        parts: tuple[Part, ...] = (TextPart(item.text),)
    elif isinstance(item, MultiModalItem):
        parts = item.parts
    elif isinstance(item, PartsChat) and item.chat is not None and len(item.chat.messages) == 1:
        parts, where = item.chat.messages[0].parts, "images[{j}].image_url"
    elif isinstance(item, PartsChat | ChatItem):
        raise InvalidArgument(
            f"embedding_mode {mode.value!r} takes a chat of one message, whose content parts are encoded with "
            f"{prompts.reference}'s prompt; send one message, or use embedding_mode 'raw'",
            field="embedding_mode",
        )
    else:
        raise InvalidArgument(
            f"embedding_mode {mode.value!r} builds {prompts.reference}'s prompt from text or content parts; "
            "token ids need embedding_mode 'raw'",
            field="embedding_mode",
        )
    texts = [p.text for p in parts if isinstance(p, TextPart)]
    images = [(k, p) for k, p in enumerate(parts) if isinstance(p, ImagePart)]
    if mode is EmbeddingMode.QUERY:
        if images:
            raise InvalidArgument(
                f"embedding_mode 'query' encodes text queries ({prompts.reference} has no image query); "
                "send the image as a document, or use embedding_mode 'raw'",
                field="embedding_mode",
            )
        return FaithfulPrompt(prompts.query("\n".join(texts)))
    if not images:
        return FaithfulPrompt("\n".join(texts))  # process_texts: the text as is
    if len(images) > 1:
        raise InvalidArgument(
            f"embedding_mode 'document' encodes one image per document, as {prompts.reference} does; "
            f"this one has {len(images)}: send them as separate documents, or use embedding_mode 'raw'",
            field="embedding_mode",
        )
    if texts and not prompts.document_text:
        raise InvalidArgument(
            f"embedding_mode 'document' encodes an image document as the image alone, as {prompts.reference} "
            "does; send the text as its own document, or use embedding_mode 'raw'",
            field="embedding_mode",
        )
    k, part = images[0]
    text = "\n".join(texts) if texts else None
    return FaithfulPrompt(prompts.image_document(text), ((where.format(k=k, j=0), part),))
