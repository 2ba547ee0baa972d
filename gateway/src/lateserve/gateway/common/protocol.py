"""Request fields shared by vLLM's pooling routes (`PoolingBasicRequestMixin` and friends), in
vLLM's names and defaults. Unknown fields are accepted and ignored, as vLLM's `extra="allow"`.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

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
    priority: int = 0
    embedding_mode: Literal["query", "document", "raw"] | None = Field(
        default=None,
        description="lateserve extension: late-interaction encoding. 'raw' (vLLM's behaviour) embeds the text "
        "as tokenized; 'query'/'document' apply ColBERT's markers, query expansion and skiplist.",
    )


class EncodingFields(OpenAIBaseModel):
    """vLLM's EncodingRequestMixin: how float outputs are written into the JSON."""

    encoding_format: Literal["float", "base64"] = "float"
    embed_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    endianness: Literal["native", "big", "little"] = "native"


class CompletionOrChatFields(OpenAIBaseModel):
    """`input` (completion form) or `messages` (chat form) and their tokenization flags."""

    input: str | list[str] | list[Int32] | list[list[Int32]] | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = Field(
        default=None, description="Unset: true for `input`, false for `messages` (as vLLM)."
    )
    add_generation_prompt: bool = False
    continue_final_message: bool = False

    @model_validator(mode="after")
    def _needs_a_form(self) -> Self:
        # vLLM resolves a union of the two request shapes: `input` wins when both are present.
        if self.input is None and self.messages is None:
            raise ValueError("Field required: one of 'input' or 'messages'")
        return self

    @property
    def is_chat(self) -> bool:
        """True when the chat form (`messages`) is used."""
        return self.input is None
