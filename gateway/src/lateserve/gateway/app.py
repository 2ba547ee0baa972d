"""The aiohttp application: routes, middlewares and the gRPC channel's lifetime.

`create_app(config)` builds the app; `start_gateway(config)` serves it on an already running event
loop (the server's `lateserve serve` calls it to run the gateway beside the gRPC server).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from aiohttp import web

from lateserve.gateway import health
from lateserve.gateway.config import GatewayConfig
from lateserve.gateway.embeddings.routes import routes as embeddings_routes
from lateserve.gateway.keys import CHANNEL, CONFIG, METRICS, STUBS, Stubs
from lateserve.gateway.metrics import GatewayMetrics
from lateserve.gateway.middlewares import error_middleware, metrics_middleware
from lateserve.gateway.pooling.routes import routes as pooling_routes
from lateserve.gateway.rerank.routes import routes as rerank_routes
from lateserve.gateway.score.routes import routes as score_routes
from lateserve.gateway.tokenize.routes import routes as tokenize_routes

logger = logging.getLogger(__name__)

__all__ = ["GatewayConfig", "create_app", "start_gateway"]


def channel_options(config: GatewayConfig) -> list[tuple[str, int]]:
    """gRPC channel options: one message limit for both directions, as the server sets it."""
    return [
        ("grpc.max_send_message_length", config.grpc_max_message_bytes),
        ("grpc.max_receive_message_length", config.grpc_max_message_bytes),
    ]


async def grpc_channel_ctx(app: web.Application) -> AsyncIterator[None]:
    """Opens the grpc.aio channel (on the running loop) and its stubs; closes it on cleanup."""
    config = app[CONFIG]
    channel = grpc.aio.insecure_channel(config.grpc_target, options=channel_options(config))
    app[CHANNEL] = channel
    app[STUBS] = Stubs.from_channel(channel)
    try:
        yield
    finally:
        await channel.close(grace=None)


def create_app(config: GatewayConfig, stubs: Stubs | None = None) -> web.Application:
    """The gateway app. The error middleware is listed first, so it is outermost.

    `stubs` replaces the gRPC channel to `config.grpc_target` (the server passes its servicers when
    the gateway runs in its process; they take and return the same lateserve.v1 messages)."""
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[error_middleware, metrics_middleware])
    app[CONFIG] = config
    app[METRICS] = GatewayMetrics()
    if stubs is None:
        app.cleanup_ctx.append(grpc_channel_ctx)
    else:
        app[STUBS] = stubs
    for table in (rerank_routes, score_routes, pooling_routes, embeddings_routes, tokenize_routes, health.routes):
        app.add_routes(table)
    return app


async def start_gateway(
    config: GatewayConfig, *, stubs: Stubs | None = None, shutdown_timeout: float = 10.0
) -> web.AppRunner:
    """Serves the gateway on the running event loop and returns its runner.

    Handlers are cancelled when their client disconnects, which cancels the in-flight gRPC
    call. Stop with `await runner.cleanup()`; with port 0, read the bound port from
    `runner.addresses`.
    """
    runner = web.AppRunner(
        create_app(config, stubs), handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    target = config.grpc_target if stubs is None else "the servicers in this process"
    logger.info("gateway listening on %s, forwarding to %s", runner.addresses, target)
    return runner
