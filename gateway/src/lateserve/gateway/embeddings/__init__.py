"""POST /v1/embeddings: one vector per input (OpenAI / vLLM embeddings API)."""
