"""`lateserve-gateway`: run the REST gateway in front of a lateserve gRPC server."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from aiohttp import web

from lateserve.gateway.app import create_app
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
    )


def run_gateway(config: GatewayConfig) -> None:
    """Serves until SIGINT/SIGTERM, on a loop of its own (blocking)."""
    web.run_app(
        create_app(config),
        host=config.host,
        port=config.port,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=10.0,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_gateway(config_from_args(args))
