"""vLLM's RerankRequest. `return_documents` and other Jina/Cohere fields are accepted and ignored
(vLLM always returns documents). Cohere v1's document objects `{"text": ...}` are text documents;
`rank_fields` names the object fields read, in order."""

from __future__ import annotations

from pydantic import Field

from lateserve.gateway.common.protocol import Int32, MultiModalInput, ScoreInput, ScoringFields, TextDocument

# A rerank document: a string, {"content": [parts]} (multimodal) or Cohere v1's {"text": ..., ...}.
RerankDocument = str | MultiModalInput | TextDocument


class RerankRequest(ScoringFields):
    """One query ranked against documents."""

    query: ScoreInput
    documents: RerankDocument | list[RerankDocument]
    top_n: Int32 = Field(default=0, description="Return the best top_n; 0 (or >= len(documents)) returns all.")
    rank_fields: list[str] | None = Field(
        default=None,
        description='Cohere v1: the fields of document objects to rank on, in order; unset or ["text"]: the '
        "`text` field; several: one `field: value` line each (fields a document lacks are skipped).",
    )
