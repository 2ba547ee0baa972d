"""vLLM's PoolingCompletionRequest / PoolingChatRequest in one schema, plus lateserve extensions."""

from __future__ import annotations

from pydantic import Field

from lateserve.gateway.common.protocol import CompletionOrChatFields, EncodingFields, Int32, PoolingBasicFields


class PoolingRequest(PoolingBasicFields, EncodingFields, CompletionOrChatFields):
    """`input` or `messages`, the task, and how to encode the outputs."""

    task: str | None = Field(
        default=None,
        description="token_embed, token_classify, embed or classify; unset: the model's default task.",
    )
    dimensions: Int32 | None = None
    normalize: bool | None = None
    use_activation: bool | None = None
    return_lexical_weights: bool = Field(
        default=False,
        description="lateserve extension: with task token_classify on a sparse model, also return "
        "FlagEmbedding-style lexical weights per input.",
    )
