"""vLLM's RerankRequest. `return_documents`, `rank_fields` and other Jina/Cohere fields are accepted
and ignored (vLLM always returns documents)."""

from __future__ import annotations

from pydantic import Field

from lateserve.gateway.common.protocol import Int32, ScoreInput, ScoreInputs, ScoringFields


class RerankRequest(ScoringFields):
    """One query ranked against documents."""

    query: ScoreInput
    documents: ScoreInputs
    top_n: Int32 = Field(default=0, description="Return the best top_n; 0 (or >= len(documents)) returns all.")
