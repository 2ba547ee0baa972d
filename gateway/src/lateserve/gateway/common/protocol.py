"""Request fields shared by vLLM's pooling routes (`PoolingBasicRequestMixin` and friends), in
vLLM's names and defaults. Unknown fields are accepted and ignored, as vLLM's `extra="allow"`; every
field vLLM itself accepts is declared, and the ones lateserve does not honour are refused with 400
when set (common.translate.refuse_unhonoured), never dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Every integer that goes into an int32 proto field: the wire limit, not a business rule.
Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]


class OpenAIBaseModel(BaseModel):
    """Base of every request schema: unknown fields are kept and ignored."""

    model_config = ConfigDict(extra="allow")


class TextPart(OpenAIBaseModel):
    """`{"type": "text", "text": ...}`."""

    type: Literal["text"]
    text: str


class ImageUrl(OpenAIBaseModel):
    """`{"url": "data:image/png;base64,..."}` (or http(s) where the server allows it)."""

    url: str


class ImageUrlPart(OpenAIBaseModel):
    """`{"type": "image_url", "image_url": {"url": ...}}`."""

    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImageUrlPart, Field(discriminator="type")]


class MultiModalInput(OpenAIBaseModel):
    """A multimodal score/rerank item: `{"content": [parts]}`."""

    content: list[ContentPart]


class TextDocument(OpenAIBaseModel):
    """A Cohere v1 document object, `{"text": ...}` plus any other fields (`rank_fields` picks which are read);
    a text document. An object with `content` is a MultiModalInput instead."""

    text: str


# A query or document of /score and /rerank: a string or {"content": [parts]}.
ScoreInput = str | MultiModalInput
ScoreInputs = ScoreInput | list[ScoreInput]


class ChatMessage(OpenAIBaseModel):
    """A chat message; custom roles ("query", "document") are allowed."""

    role: str
    content: str | list[ContentPart] | None = None


class PoolingBasicFields(OpenAIBaseModel):
    """vLLM's PoolingBasicRequestMixin plus lateserve's `embedding_mode` extension."""

    model: str | None = None
    user: str | None = None
    truncate_prompt_tokens: Int32 | None = None
    truncation_side: Literal["left", "right"] | None = None
    request_id: str | None = None
    priority: int = Field(default=0, description="Refused unless 0: lateserve has no priority scheduling.")
    mm_processor_kwargs: dict[str, Any] | None = Field(
        default=None, description='Image processor settings for this request, e.g. {"max_pixels": 1310720}.'
    )
    cache_salt: str | None = Field(default=None, description="Refused when set: lateserve has no prefix cache.")
    embedding_mode: Literal["query", "document", "raw"] | None = Field(
        default=None,
        description="lateserve extension: late-interaction encoding. 'raw' (vLLM's behaviour) embeds the text "
        "as tokenized; 'query'/'document' apply ColBERT's markers, query expansion and skiplist.",
    )


class EncodingFields(OpenAIBaseModel):
    """vLLM's EncodingRequestMixin: how float outputs are written into the JSON."""

    encoding_format: Literal["float", "base64", "bytes", "bytes_only"] = Field(
        default="float",
        description="float: nested JSON lists; base64: each item's flattened bytes in base64; bytes: an "
        "application/octet-stream body of every item's bytes in a row, with a `metadata` header (JSON: id, "
        "created, model, data [{index, embed_dtype, endianness, start, end, shape}], usage); bytes_only: "
        "the same body without the header.",
    )
    embed_dtype: Literal["float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2"] = Field(
        default="float32",
        description="Element type of base64 / bytes output (fp8 as torch's float8_e4m3fn / float8_e5m2).",
    )
    endianness: Literal["native", "big", "little"] = "native"


class ChatTemplateFields(OpenAIBaseModel):
    """vLLM's ChatRequestMixin rendering fields; unset ones stay None so only what the client set is
    sent (ChatOptions), and the route's defaults stay the server's."""

    add_generation_prompt: bool | None = Field(
        default=None, description="Unset: false for /pooling and /v1/embeddings, true for /tokenize (as vLLM)."
    )
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = Field(
        default=None, description="Refused when set, as vLLM without --trust-request-chat-template."
    )


class CompletionOrChatFields(ChatTemplateFields):
    """`input` (completion form) or `messages` (chat form) and their tokenization flags."""

    input: str | list[str] | list[Int32] | list[list[Int32]] | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = Field(
        default=None, description="Unset: true for `input`, false for `messages` (as vLLM)."
    )
    media_io_kwargs: dict[str, Any] | None = Field(default=None, description="Refused when set (not honoured).")

    @model_validator(mode="after")
    def _needs_a_form(self) -> Self:
        # Both forms at once are sent as they are: the server answers 400 (field messages).
        if self.input is None and self.messages is None:
            raise ValueError("Field required: one of 'input' or 'messages'")
        return self

    @property
    def is_chat(self) -> bool:
        """True when only the chat form (`messages`) is used."""
        return self.input is None


class EmbedFields(OpenAIBaseModel):
    """vLLM's EmbedRequestMixin; the server reads `normalize` and its newer name `use_activation`."""

    dimensions: Int32 | None = None
    normalize: bool | None = None
    use_activation: bool | None = None


class ClassifyFields(OpenAIBaseModel):
    """vLLM's ClassifyRequestMixin, plus older vLLM's spellings of use_activation (refused when set)."""

    use_activation: bool | None = None
    softmax: bool | None = Field(default=None, description="Older vLLM's name of use_activation: refused.")
    activation: bool | None = Field(default=None, description="Older vLLM's name of use_activation: refused.")


class ScoringFields(PoolingBasicFields, ClassifyFields):
    """vLLM's ScoringRequestMixin (/score and /rerank), plus lateserve's `score_mode`."""

    score_mode: str | None = Field(
        default=None, description="lateserve extension: score mode for models with several (BGE-M3)."
    )
    max_tokens_per_query: Int32 = Field(
        default=0,
        description="vLLM: cut each query's text to its first max_tokens_per_query tokens (special tokens not "
        "counted) before scoring; 0: no per-query truncation.",
    )
    max_tokens_per_doc: Int32 = Field(
        default=0,
        description="Cohere v2 / vLLM: cut each document's text to its first max_tokens_per_doc tokens (special "
        "tokens not counted) before scoring; 0: no per-document truncation.",
    )
