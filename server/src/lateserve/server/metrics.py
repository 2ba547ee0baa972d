"""Server-side Prometheus metrics, all named lateserve_*, defined once in the default registry.

The gateway's /metrics exposes the default registry next to its own HTTP metrics when both run
in one process.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

QUEUE_SIZE = Gauge("lateserve_queue_size", "Sequences waiting for a worker")
DROPPED = Gauge("lateserve_queue_dropped", "Sequences dropped from the queue because their caller gave up")
BATCH_TOKENS = Histogram(
    "lateserve_batch_tokens", "Tokens per batch", buckets=(16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384)
)
BATCH_SIZE = Histogram("lateserve_batch_size", "Sequences per batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
WORKER_BATCHES = Counter("lateserve_worker_batches_total", "Batches sent to each worker (load balance)", ["worker"])
LENT_CORE_BATCHES = Counter(
    "lateserve_lent_core_batches_total",
    "Batches a CPU worker computed with more threads than its own: cores lent by idle workers",
)
REQUESTS = Counter("lateserve_grpc_requests_total", "gRPC requests by method and status code", ["method", "code"])
REQUEST_DURATION = Histogram(
    "lateserve_request_duration_seconds",
    "Request time by stage",
    ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
PROMPT_TOKENS = Counter("lateserve_prompt_tokens_total", "Prompt tokens encoded")
FAILURES = Counter("lateserve_request_failures_total", "Failed requests by reason", ["reason"])
WORKERS_READY = Gauge("lateserve_workers_ready", "Worker processes ready to serve")
CACHE_HITS = Counter("lateserve_doc_cache_hits_total", "Document cache hits")
CACHE_MISSES = Counter("lateserve_doc_cache_misses_total", "Document cache misses")
CACHE_BYTES = Gauge("lateserve_doc_cache_bytes", "Bytes of document embeddings held in the cache")
QUEUED_TOKENS = Gauge("lateserve_queued_tokens", "Tokens admitted and not yet finished")
REJECTED = Counter("lateserve_rejected_total", "Requests refused by backpressure", ["bound"])

# Per stage (README "Observability"). Request stages go into REQUEST_DURATION's `stage` label: "prepare"
# (tokenization and media, per engine call), "queue" (waiting for a worker, per engine call that reached
# the workers), "inference" (its forward passes) and "total" (per gRPC call). Per batch:
FORWARD_SECONDS = Histogram(
    "lateserve_batch_forward_seconds",
    "Forward time of one batch on a worker",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BATCH_FILL = Histogram(
    "lateserve_batch_fill_ratio",
    "Batch cost over the batch budget (--max-num-batched-tokens)",
    buckets=(0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
)
PADDED_TOKENS = Counter("lateserve_batch_padded_tokens_total", "Padded cost of batches (longest x size)")
PADDING_TOKENS = Counter(
    "lateserve_batch_padding_tokens_total", "Padding waste: padded cost minus the tokens the batches hold"
)
CACHE_HIT_RATIO = Gauge("lateserve_doc_cache_hit_ratio", "Document cache hits over lookups since start")
RESPONSE_BYTES = Counter(
    "lateserve_response_tensor_bytes_total", "Tensor bytes sent in responses, by gRPC method", ["method"]
)
