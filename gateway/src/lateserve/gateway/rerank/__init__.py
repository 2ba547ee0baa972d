"""POST /rerank, /v1/rerank (Jina-style, deprecated alias) and /v2/rerank (Cohere v2 style)."""
