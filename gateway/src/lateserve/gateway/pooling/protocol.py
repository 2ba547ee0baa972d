"""vLLM's PoolingCompletionRequest / PoolingChatRequest in one schema, plus lateserve extensions."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lateserve.gateway.common.protocol import (
    ClassifyFields,
    CompletionOrChatFields,
    EmbedFields,
    EncodingFields,
    Int32,
    PoolingBasicFields,
)


class PoolingRequest(PoolingBasicFields, EncodingFields, CompletionOrChatFields, EmbedFields, ClassifyFields):
    """`input` or `messages`, the task, and how to encode the outputs."""

    task: str | None = Field(
        default=None,
        description="token_embed, token_classify, embed or classify; unset: the model's default task.",
    )
    input_type: Literal["query", "document"] | None = Field(
        default=None,
        description="vLLM's newest spelling of the query/document switch on /pooling: an alias of "
        "`embedding_mode` 'query'/'document'. Both given and different: 400 on input_type.",
    )
    return_lexical_weights: bool = Field(
        default=False,
        description="lateserve extension: with task token_classify on a sparse model, also return "
        "FlagEmbedding-style lexical weights per input.",
    )
    pool_factor: Int32 | None = Field(
        default=None,
        description="lateserve extension (token_embed on late-interaction models): hierarchical token pooling "
        "of each input's vectors into at most max(n // pool_factor, 1) cluster means, as colpali-engine's "
        "HierarchicalTokenPooler. Unset or 1: no pooling.",
    )
    mask_non_image_embeddings: bool = Field(
        default=False,
        description="lateserve extension (token_embed on late-interaction models that read images): return "
        "only the image tokens' vectors of each input with images (colpali-engine's mask_non_image_embeddings); "
        "inputs without images are returned whole. Applied before pool_factor.",
    )
