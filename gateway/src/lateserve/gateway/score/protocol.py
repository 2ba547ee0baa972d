"""vLLM's ScoreRequest: four spellings of one (queries, documents) pair, resolved here."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator

from lateserve.gateway.common.protocol import ScoreInputs, ScoringFields

# The spellings vLLM accepts, in the order its request union tries them.
SPELLINGS = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2"))


class ScoreRequest(ScoringFields):
    """Queries and documents to pair 1:1, 1:N or N:N (the server pairs them)."""

    queries: ScoreInputs | None = None
    documents: ScoreInputs | None = None
    items: ScoreInputs | None = None
    data_1: ScoreInputs | None = None
    data_2: ScoreInputs | None = None
    text_1: ScoreInputs | None = None
    text_2: ScoreInputs | None = None
    return_similarity_maps: bool | None = Field(
        default=None,
        description="lateserve extension, late-interaction models with image documents: per pair, each query "
        "token's similarity over each document image's token grid (`similarity_maps`).",
    )

    @model_validator(mode="after")
    def _one_spelling(self) -> Self:
        self.pair()
        return self

    def pair(self) -> tuple[ScoreInputs, ScoreInputs]:
        """(queries, documents) from the first complete spelling."""
        for first, second in SPELLINGS:
            left, right = getattr(self, first), getattr(self, second)
            if left is not None and right is not None:
                return left, right
        raise ValueError("Field required: one of queries/documents, queries/items, data_1/data_2 or text_1/text_2")
