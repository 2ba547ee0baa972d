"""`lateserve serve [MODEL]` and `lateserve gateway`: vLLM's flag names where they exist."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys

from lateserve.server.config import ServerConfig
from lateserve.server.media import MediaPolicy


def _json_arg(value: str) -> dict[str, object]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lateserve", description="Serve late-interaction retrieval models.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over gRPC and HTTP")
    serve.add_argument("model", nargs="?", default="", help="Hub id or local directory (default: all-MiniLM-L6-v2)")
    serve.add_argument("--host", default="0.0.0.0", help="HTTP host")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (0: any free port)")
    serve.add_argument("--grpc-host", default="0.0.0.0")
    serve.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (0: any free port)")
    serve.add_argument("--no-gateway", action="store_true", help="serve gRPC only")
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="also serve Prometheus /metrics on this port of --host, with or without the gateway (0: off)",
    )
    serve.add_argument("--served-model-name", default="")
    serve.add_argument("--hf-overrides", type=_json_arg, default={})
    serve.add_argument("--trust-remote-code", action="store_true")
    serve.add_argument(
        "--chat-template", default=None, help="a template file, the template itself, or a checkpoint template's name"
    )
    serve.add_argument("--max-model-len", type=int, default=None)
    serve.add_argument("--runner", choices=["pooling", "auto"], default="pooling", help="accepted for vLLM parity")
    serve.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16", "half", "float"],
        help="auto: bfloat16 on CUDA and on CPUs with native bf16 (avx512_bf16, amx_bf16), float32 otherwise",
    )
    serve.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    serve.add_argument(
        "--workers",
        type=int,
        default=0,
        help="worker processes (default: 1 per GPU; on CPU 1 per core, at most 8, fewer if memory is short)",
    )
    serve.add_argument(
        "--threads-per-worker", type=int, default=0, help="torch threads per CPU worker (default: cores / workers)"
    )
    serve.add_argument("--max-num-batched-tokens", type=int, default=8192)
    serve.add_argument("--max-num-seqs", type=int, default=256)
    serve.add_argument("--max-queued-requests", type=int, default=1024)
    serve.add_argument("--max-queued-tokens", type=int, default=1 << 20, help="tokens admitted at once")
    serve.add_argument("--doc-cache-mb", type=int, default=256, help="document embedding cache (0 disables)")
    serve.add_argument("--max-body-mb", type=int, default=32)
    serve.add_argument("--shutdown-grace-seconds", type=float, default=10.0)
    serve.add_argument(
        "--scoring-embedding-mode",
        choices=["raw", "faithful"],
        default="raw",
        help="raw: /score and /rerank encode text as vLLM does; faithful: queries as ColBERT queries and "
        "documents as ColBERT documents (markers, [MASK] expansion, skiplist)",
    )
    serve.add_argument(
        "--score-type",
        choices=["late-interaction", "bi-encoder", "cross-encoder"],
        default="",
        help="how /score and /rerank score (default: the model's kind, as vLLM; the bundled model: late-interaction)",
    )
    serve.add_argument(
        "--max-queue-wait-ms",
        type=int,
        default=5000,
        help="shed with 429 once the queued work needs longer than this to drain at the measured speed (0: never)",
    )
    serve.add_argument(
        "--worker-batch-timeout",
        type=float,
        default=30.0,
        help="least seconds a batch may take before its worker counts as frozen (else 10x its measured time)",
    )
    serve.add_argument(
        "--lend-cores-min-ms",
        type=float,
        default=100.0,
        help="CPU: a lone batch expected to take at least this long on one worker also computes on the idle "
        "workers' cores (more threads; -1: never)",
    )
    serve.add_argument(
        "--worker-heartbeat", type=float, default=5.0, help="seconds an idle worker has to answer a ping"
    )
    serve.add_argument("--max-queued-mb", type=int, default=1024, help="input bytes (ids, pixels) admitted at once")
    serve.add_argument(
        "--prepare-threads", type=int, default=0, help="threads for input preparation off the event loop (0: auto)"
    )
    serve.add_argument("--limit-mm-per-prompt", default=None, help="images per input, e.g. '{\"image\": 4}' (8)")
    serve.add_argument(
        "--allowed-media-domains", nargs="*", default=[], help="hosts image_url may fetch from over http(s)"
    )
    serve.add_argument("--allowed-local-media-path", default="", help="directory file:// image URLs may read")
    serve.add_argument("--max-image-bytes", type=int, default=None, help="bytes per image (default 20 MiB)")
    serve.add_argument("--max-image-pixels", type=int, default=None, help="decoded pixels per image (50M)")
    serve.add_argument("--max-image-aspect-ratio", type=float, default=None, help="longest/shortest side (200)")
    serve.add_argument("--media-fetch-timeout", type=float, default=None, help="seconds per http(s) image (10)")
    serve.add_argument(
        "--mm-processor-kwargs", type=_json_arg, default={}, help="image processor settings, e.g. '{\"max_pixels\": N}'"
    )
    limits = serve.add_argument_group("request limits and timeouts (docs/hardening.md)")
    limits.add_argument("--max-input-chars", type=int, default=1_000_000, help="characters (or token ids) per input")
    limits.add_argument("--max-request-chars", type=int, default=8_000_000, help="characters per request, all inputs")
    limits.add_argument("--max-items-per-request", type=int, default=4096, help="inputs per request")
    limits.add_argument("--max-request-id-chars", type=int, default=256, help="longest request_id / x-request-id")
    limits.add_argument("--http-header-timeout", type=float, default=15.0, help="seconds to complete a request head")
    limits.add_argument("--http-body-timeout", type=float, default=60.0, help="seconds to receive a request body")
    limits.add_argument("--http-keepalive-timeout", type=float, default=75.0, help="seconds an idle connection stays")
    limits.add_argument("--grpc-keepalive-time", type=float, default=60.0, help="seconds between server pings (0: off)")
    limits.add_argument("--grpc-keepalive-timeout", type=float, default=20.0, help="seconds to answer a ping")
    limits.add_argument(
        "--grpc-max-connection-idle", type=float, default=300.0, help="seconds an idle connection stays (0: never)"
    )
    limits.add_argument("--grpc-max-connection-age", type=float, default=0.0, help="connection lifetime (0: never)")
    limits.add_argument(
        "--grpc-max-connection-age-grace", type=float, default=30.0, help="seconds calls get once the age is reached"
    )
    limits.add_argument(
        "--grpc-min-ping-interval", type=float, default=10.0, help="least seconds between client pings accepted"
    )
    security = serve.add_argument_group("security (README 'Security')")
    security.add_argument(
        "--api-key",
        default=os.environ.get("LATESERVE_API_KEY") or None,
        help="require `Authorization: Bearer <key>` over HTTP and `authorization` metadata over gRPC "
        "(env LATESERVE_API_KEY); /health, /ping, /version, /metrics, gRPC health and reflection stay open",
    )
    security.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate chain (PEM)")
    security.add_argument("--ssl-keyfile", default=None, help="the private key (PEM) of --ssl-certfile")
    security.add_argument("--grpc-ssl-certfile", default=None, help="serve gRPC over TLS with this certificate (PEM)")
    security.add_argument("--grpc-ssl-keyfile", default=None, help="the private key (PEM) of --grpc-ssl-certfile")
    security.add_argument(
        "--grpc-ssl-ca-certfile", default=None, help="mutual TLS: gRPC clients must present a certificate of this CA"
    )
    serve.add_argument(
        "--otlp-traces-endpoint",
        default=None,
        help="send OpenTelemetry traces (a span per request, one per stage) to this OTLP endpoint; gRPC unless "
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf (needs the `otel` extra)",
    )
    serve.add_argument("--log-level", default="INFO")
    gw = sub.add_parser("gateway", help="run only the HTTP gateway in front of a gRPC server")
    gw.add_argument("--grpc-target", default="127.0.0.1:50051")
    gw.add_argument("--host", default="0.0.0.0")
    gw.add_argument("--port", type=int, default=8000)
    gw.add_argument("--max-body-mb", type=int, default=32)
    gw.add_argument("--api-key", default=None, help="as `lateserve serve --api-key` (env LATESERVE_API_KEY)")
    gw.add_argument("--ssl-certfile", default=None)
    gw.add_argument("--ssl-keyfile", default=None)
    gw.add_argument("--grpc-ssl-ca-certfile", default=None, help="TLS to the gRPC server, verified by this CA")
    gw.add_argument("--grpc-ssl-certfile", default=None, help="client certificate for mutual TLS")
    gw.add_argument("--grpc-ssl-keyfile", default=None, help="the private key of --grpc-ssl-certfile")
    gw.add_argument(
        "--otlp-traces-endpoint", default=None, help="a span per HTTP request to this OTLP endpoint (the `otel` extra)"
    )
    gw.add_argument("--log-level", default="INFO")
    return parser


def _media_policy(ns: argparse.Namespace) -> MediaPolicy:
    try:
        return MediaPolicy.from_flags(
            allowed_media_domains=ns.allowed_media_domains,
            allowed_local_media_path=ns.allowed_local_media_path,
            limit_mm_per_prompt=ns.limit_mm_per_prompt,
            max_image_bytes=ns.max_image_bytes,
            max_image_pixels=ns.max_image_pixels,
            max_aspect_ratio=ns.max_image_aspect_ratio,
            fetch_timeout_s=ns.media_fetch_timeout,
        )
    except ValueError as exc:
        raise SystemExit(f"lateserve: {exc}") from exc


def config_from_args(ns: argparse.Namespace) -> ServerConfig:
    config = _config(ns)
    try:
        config.check_ports()
        config.check_tls()
    except ValueError as exc:
        raise SystemExit(f"lateserve: {exc}") from exc
    return config


def _config(ns: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        model=ns.model,
        served_model_name=ns.served_model_name,
        host=ns.host,
        port=ns.port,
        grpc_host=ns.grpc_host,
        grpc_port=ns.grpc_port,
        gateway=not ns.no_gateway,
        metrics_port=ns.metrics_port,
        hf_overrides=ns.hf_overrides,
        trust_remote_code=ns.trust_remote_code,
        chat_template=ns.chat_template,
        max_model_len=ns.max_model_len,
        dtype=ns.dtype,
        device=ns.device,
        workers=ns.workers,
        threads_per_worker=ns.threads_per_worker,
        max_num_batched_tokens=ns.max_num_batched_tokens,
        max_num_seqs=ns.max_num_seqs,
        max_queued_requests=ns.max_queued_requests,
        max_queued_tokens=ns.max_queued_tokens,
        doc_cache_mb=ns.doc_cache_mb,
        max_body_bytes=ns.max_body_mb << 20,
        shutdown_grace_seconds=ns.shutdown_grace_seconds,
        scoring_embedding_mode=ns.scoring_embedding_mode,
        score_type=ns.score_type,
        max_queued_bytes=ns.max_queued_mb << 20,
        max_queue_wait_ms=ns.max_queue_wait_ms,
        worker_batch_timeout=ns.worker_batch_timeout,
        lend_cores_min_ms=ns.lend_cores_min_ms,
        worker_heartbeat=ns.worker_heartbeat,
        prepare_threads=ns.prepare_threads,
        media=_media_policy(ns),
        mm_processor_kwargs=ns.mm_processor_kwargs,
        max_input_chars=ns.max_input_chars,
        max_request_chars=ns.max_request_chars,
        max_items_per_request=ns.max_items_per_request,
        max_request_id_chars=ns.max_request_id_chars,
        http_header_timeout=ns.http_header_timeout,
        http_body_timeout=ns.http_body_timeout,
        http_keepalive_timeout=ns.http_keepalive_timeout,
        grpc_keepalive_time=ns.grpc_keepalive_time,
        grpc_keepalive_timeout=ns.grpc_keepalive_timeout,
        grpc_max_connection_idle=ns.grpc_max_connection_idle,
        grpc_max_connection_age=ns.grpc_max_connection_age,
        grpc_max_connection_age_grace=ns.grpc_max_connection_age_grace,
        grpc_min_ping_interval=ns.grpc_min_ping_interval,
        api_key=ns.api_key,
        ssl_certfile=ns.ssl_certfile,
        ssl_keyfile=ns.ssl_keyfile,
        grpc_ssl_certfile=ns.grpc_ssl_certfile,
        grpc_ssl_keyfile=ns.grpc_ssl_keyfile,
        grpc_ssl_ca_certfile=ns.grpc_ssl_ca_certfile,
        otlp_traces_endpoint=ns.otlp_traces_endpoint,
    )


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain within the grace period."""
    from lateserve.server.app import Server

    server = Server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        await stop.wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> None:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if ns.command == "gateway":
        from lateserve.gateway.cli import main as gateway_main

        argv = ["--grpc-target", ns.grpc_target, "--host", ns.host, "--port", str(ns.port), "--max-body-mb",
                str(ns.max_body_mb)]  # fmt: skip
        for flag in ("api_key", "ssl_certfile", "ssl_keyfile", "grpc_ssl_ca_certfile", "grpc_ssl_certfile",
                     "grpc_ssl_keyfile", "otlp_traces_endpoint"):  # fmt: skip
            if getattr(ns, flag):
                argv += [f"--{flag.replace('_', '-')}", getattr(ns, flag)]
        gateway_main(argv)
        return
    try:
        asyncio.run(serve(config_from_args(ns)))
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        from lateserve.server.domain import ModelLoadError
        from lateserve.server.metrics_http import MetricsPortError

        if isinstance(exc, (ModelLoadError, MetricsPortError)):
            sys.exit(f"lateserve: {exc}")
        raise


if __name__ == "__main__":
    main()
