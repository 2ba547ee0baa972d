"""vLLM's EmbeddingCompletionRequest / EmbeddingChatRequest in one schema."""

from __future__ import annotations

from lateserve.gateway.common.protocol import CompletionOrChatFields, EncodingFields, Int32, PoolingBasicFields


class EmbeddingRequest(PoolingBasicFields, EncodingFields, CompletionOrChatFields):
    """`input` or `messages` to embed, and how to encode the vectors."""

    dimensions: Int32 | None = None
    normalize: bool | None = None
    use_activation: bool | None = None
