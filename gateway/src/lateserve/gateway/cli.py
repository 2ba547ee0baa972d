"""`lateserve-gateway`: run the REST gateway in front of a lateserve gRPC server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Sequence

from lateserve.gateway.app import start_gateway
from lateserve.gateway.config import GatewayConfig

MIB = 1 << 20


def build_parser() -> argparse.ArgumentParser:
    """The command line; flag names follow vLLM's where the concept matches."""
    parser = argparse.ArgumentParser(
        prog="lateserve-gateway", description="vLLM-compatible REST gateway for a lateserve gRPC server."
    )
    parser.add_argument("--grpc-target", required=True, help="the lateserve gRPC server, HOST:PORT")
    parser.add_argument("--host", default="0.0.0.0", help="HTTP bind address (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default %(default)s)")
    parser.add_argument("--max-body-mb", type=int, default=32, help="largest request body in MiB (default 32)")
    parser.add_argument(
        "--grpc-max-message-mb", type=int, default=64, help="gRPC message limit in MiB, both directions (default 64)"
    )
    limits = parser.add_argument_group("request limits and timeouts (docs/hardening.md)")
    limits.add_argument("--max-input-chars", type=int, default=1_000_000, help="characters (or token ids) per input")
    limits.add_argument("--max-request-chars", type=int, default=8_000_000, help="characters per request, all inputs")
    limits.add_argument("--max-items-per-request", type=int, default=4096, help="elements of any list in a body")
    limits.add_argument("--max-request-id-chars", type=int, default=256, help="longest request_id / x-request-id")
    limits.add_argument("--http-header-timeout", type=float, default=15.0, help="seconds to complete a request head")
    limits.add_argument("--http-body-timeout", type=float, default=60.0, help="seconds to receive a request body")
    limits.add_argument("--http-keepalive-timeout", type=float, default=75.0, help="seconds an idle connection stays")
    security = parser.add_argument_group("security (README 'Security')")
    security.add_argument(
        "--api-key",
        default=os.environ.get("LATESERVE_API_KEY") or None,
        help="require `Authorization: Bearer <key>` (env LATESERVE_API_KEY); also sent to the gRPC server. "
        "Without it the caller's Authorization header is forwarded to the gRPC server",
    )
    security.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate chain (PEM)")
    security.add_argument("--ssl-keyfile", default=None, help="the private key (PEM) of --ssl-certfile")
    security.add_argument("--grpc-ssl-ca-certfile", default=None, help="TLS to the gRPC server, verified by this CA")
    security.add_argument("--grpc-ssl-certfile", default=None, help="client certificate for mutual TLS to gRPC")
    security.add_argument("--grpc-ssl-keyfile", default=None, help="the private key of --grpc-ssl-certfile")
    parser.add_argument(
        "--otlp-traces-endpoint",
        default=None,
        help="send OpenTelemetry traces (a span per HTTP request, parent of the server's span) to this OTLP "
        "endpoint; gRPC unless OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf (needs the `otel` extra)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """The frozen config from parsed flags."""
    return GatewayConfig(
        grpc_target=args.grpc_target,
        host=args.host,
        port=args.port,
        max_body_bytes=args.max_body_mb * MIB,
        grpc_max_message_bytes=args.grpc_max_message_mb * MIB,
        max_input_chars=args.max_input_chars,
        max_request_chars=args.max_request_chars,
        max_items_per_request=args.max_items_per_request,
        max_request_id_chars=args.max_request_id_chars,
        header_timeout_s=args.http_header_timeout,
        body_timeout_s=args.http_body_timeout,
        keepalive_timeout_s=args.http_keepalive_timeout,
        api_key=args.api_key,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        grpc_ssl_ca_certfile=args.grpc_ssl_ca_certfile,
        grpc_ssl_certfile=args.grpc_ssl_certfile,
        grpc_ssl_keyfile=args.grpc_ssl_keyfile,
        otlp_traces_endpoint=args.otlp_traces_endpoint,
    )


def run_gateway(config: GatewayConfig) -> None:
    """Serves until SIGINT/SIGTERM, on a loop of its own (blocking)."""

    async def serve() -> None:
        runner = await start_gateway(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(serve())


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_gateway(config_from_args(args))
