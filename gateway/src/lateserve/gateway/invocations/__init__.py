"""POST /invocations (SageMaker): one route that answers as /v1/embeddings, /rerank, /score or /pooling,
chosen by the body's shape, as vLLM does."""
