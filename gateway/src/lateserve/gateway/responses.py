"""The JSON answers of every route as pydantic models, for the OpenAPI document (`openapi.py`).

The handlers build these answers as plain dicts (the hot path); tests validate live answers against
these models (tests/integration/test_api_surface_openapi.py), so the document cannot drift from them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lateserve.gateway.common.protocol import ContentPart


class Schema(BaseModel):
    """Base of the response schemas: closed objects."""

    model_config = ConfigDict(extra="forbid")


class ErrorInfo(Schema):
    message: str
    type: str = Field(description="BadRequestError, NotFoundError, UnauthorizedError, RateLimitError, ...")
    param: str | None = Field(description="The offending field for a 400 (e.g. input_tokens, documents[2]).")
    code: int = Field(description="Equal to the HTTP status.")


class ErrorResponse(Schema):
    """vLLM's error envelope, on every failure of every route."""

    error: ErrorInfo


class RerankUsage(Schema):
    prompt_tokens: int
    total_tokens: int


class UsageInfo(Schema):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0
    prompt_tokens_details: None = None
    completion_tokens_details: None = None


class RerankDocument(Schema):
    text: str | None
    multi_modal: list[ContentPart] | None


class RerankResult(Schema):
    index: int
    document: RerankDocument
    relevance_score: float


class RerankResponse(Schema):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]


class SimilarityMap(Schema):
    image_index: int
    height: int
    width: int
    query_tokens: list[str]
    data: list[list[list[float]]]


class ScoreData(Schema):
    index: int
    object: Literal["score"]
    score: float
    similarity_maps: list[SimilarityMap] | None = Field(default=None, description="Only when asked for.")


class ScoreResponse(Schema):
    id: str
    object: Literal["list"]
    created: int
    model: str
    data: list[ScoreData]
    usage: UsageInfo


class LexicalWeight(Schema):
    token_id: int
    token: str
    weight: float


class PoolingData(Schema):
    index: int
    object: Literal["pooling"]
    data: list[list[float]] | list[float] | str = Field(
        description="Nested float lists (encoding_format float) or base64 of the flattened bytes."
    )
    lexical_weights: list[LexicalWeight] | None = Field(default=None, description="Only when asked for.")


class PoolingResponse(Schema):
    id: str
    object: Literal["list"]
    created: int
    model: str
    data: list[PoolingData]
    usage: UsageInfo


class EmbeddingData(Schema):
    index: int
    object: Literal["embedding"]
    embedding: list[float] | str


class EmbeddingResponse(Schema):
    id: str
    object: Literal["list"]
    created: int
    model: str
    data: list[EmbeddingData]
    usage: UsageInfo


class BytesItem(Schema):
    index: int
    embed_dtype: str
    endianness: str
    start: int
    end: int
    shape: list[int]


class BytesMetadata(Schema):
    """The `metadata` header of encoding_format "bytes" (JSON)."""

    id: str
    created: int
    model: str
    data: list[BytesItem]
    usage: RerankUsage


class TokenizeResponse(Schema):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None


class DetokenizeResponse(Schema):
    prompt: str


class ModelCard(Schema):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: None
    max_model_len: int


class ModelList(Schema):
    object: Literal["list"]
    data: list[ModelCard]


class VersionResponse(Schema):
    version: str
