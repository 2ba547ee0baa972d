"""POST /pooling: raw pooled outputs (token vectors, token scores, vectors, label scores)."""
