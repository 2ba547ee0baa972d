"""vLLM's EmbeddingCompletionRequest / EmbeddingChatRequest in one schema."""

from __future__ import annotations

from lateserve.gateway.common.protocol import CompletionOrChatFields, EmbedFields, EncodingFields, PoolingBasicFields


class EmbeddingRequest(PoolingBasicFields, EncodingFields, CompletionOrChatFields, EmbedFields):
    """`input` or `messages` to embed, and how to encode the vectors."""
