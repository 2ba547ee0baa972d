"""vLLM's TokenizeCompletionRequest / TokenizeChatRequest and DetokenizeRequest."""

from __future__ import annotations

from typing import Any, Self

from pydantic import Field, model_validator

from lateserve.gateway.common.protocol import ChatMessage, ChatTemplateFields, Int32, OpenAIBaseModel


class TokenizeRequest(ChatTemplateFields):
    """`prompt` (completion form) or `messages` (chat form)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = Field(
        default=None, description="Unset: true for `prompt`, false for `messages` (as vLLM)."
    )
    return_token_strs: bool | None = False
    mm_processor_kwargs: dict[str, Any] | None = Field(
        default=None, description="Answers 400 when set: /tokenize has no image processing."
    )
    tools: list[dict[str, Any]] | None = Field(default=None, description="Refused when set (not honoured).")

    @model_validator(mode="after")
    def _needs_a_form(self) -> Self:
        # As vLLM's request union: `prompt` wins when both are present.
        if self.prompt is None and self.messages is None:
            raise ValueError("Field required: one of 'prompt' or 'messages'")
        return self


class DetokenizeRequest(OpenAIBaseModel):
    """Token ids to decode."""

    model: str | None = None
    tokens: list[Int32]
