"""The aiohttp application: routes, middlewares and the gRPC channel's lifetime.

`create_app(config)` builds the app; `start_gateway(config)` serves it on an already running event
loop (the server's `lateserve serve` calls it to run the gateway beside the gRPC server).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from lateserve.gateway import health, openapi
from lateserve.gateway.config import GatewayConfig
from lateserve.gateway.embeddings.routes import routes as embeddings_routes
from lateserve.gateway.invocations.routes import routes as invocations_routes
from lateserve.gateway.keys import CHANNEL, CONFIG, METRICS, MODEL_TASKS, OPENAPI, STUBS, TRACER, Stubs
from lateserve.gateway.metrics import GatewayMetrics
from lateserve.gateway.middlewares import (
    TRIMMER,
    MemoryTrimmer,
    auth_middleware,
    error_middleware,
    metrics_middleware,
    tracing_middleware,
)
from lateserve.gateway.pooling.routes import routes as pooling_routes
from lateserve.gateway.rerank.routes import routes as rerank_routes
from lateserve.gateway.score.routes import routes as score_routes
from lateserve.gateway.tokenize.routes import routes as tokenize_routes
from lateserve.gateway.tracing import GatewayTracer

logger = logging.getLogger(__name__)

__all__ = ["GatewayConfig", "create_app", "start_gateway"]


def channel_options(config: GatewayConfig) -> list[tuple[str, int]]:
    """gRPC channel options: one message limit for both directions, as the server sets it."""
    return [
        ("grpc.max_send_message_length", config.grpc_max_message_bytes),
        ("grpc.max_receive_message_length", config.grpc_max_message_bytes),
    ]


def channel_credentials(config: GatewayConfig) -> grpc.ChannelCredentials | None:
    """TLS credentials for the sidecar's channel: the CA to verify the server by (--grpc-ssl-ca-certfile;
    else the system's roots) and, for mutual TLS, the client certificate and key. None: plaintext."""
    if not (config.grpc_ssl_ca_certfile or config.grpc_ssl_certfile):
        return None
    if bool(config.grpc_ssl_certfile) != bool(config.grpc_ssl_keyfile):
        raise ValueError("--grpc-ssl-certfile and --grpc-ssl-keyfile go together")

    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(config.grpc_ssl_ca_certfile),
        private_key=read(config.grpc_ssl_keyfile),
        certificate_chain=read(config.grpc_ssl_certfile),
    )


def server_ssl_context(config: GatewayConfig) -> ssl.SSLContext | None:
    """HTTPS for the gateway (--ssl-certfile / --ssl-keyfile, vLLM's names), TLS 1.2 or newer; None: HTTP."""
    if not config.ssl_certfile:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.ssl_certfile, config.ssl_keyfile)
    return context


async def grpc_channel_ctx(app: web.Application) -> AsyncIterator[None]:
    """Opens the grpc.aio channel (on the running loop) and its stubs; closes it on cleanup."""
    config = app[CONFIG]
    credentials = channel_credentials(config)
    if credentials is None:
        channel = grpc.aio.insecure_channel(config.grpc_target, options=channel_options(config))
    else:
        channel = grpc.aio.secure_channel(config.grpc_target, credentials, options=channel_options(config))
    app[CHANNEL] = channel
    app[STUBS] = Stubs.from_channel(channel)
    try:
        yield
    finally:
        await channel.close(grace=None)


async def tracer_ctx(app: web.Application) -> AsyncIterator[None]:
    """Flushes and stops the sidecar's span exporter on cleanup."""
    try:
        yield
    finally:
        app[TRACER].shutdown()


def create_app(config: GatewayConfig, stubs: Stubs | None = None) -> web.Application:
    """The gateway app. The tracing middleware (sidecar with --otlp-traces-endpoint), then the error
    middleware are listed first, so they are outermost.

    `stubs` replaces the gRPC channel to `config.grpc_target` (the server passes its servicers when
    the gateway runs in its process; they take and return the same lateserve.v1 messages, and the server's
    own spans cover them, so the in-process gateway never traces)."""
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[tracing_middleware, error_middleware, metrics_middleware, auth_middleware],
    )
    if config.otlp_traces_endpoint and stubs is None:
        app[TRACER] = GatewayTracer(config.otlp_traces_endpoint)
        app.cleanup_ctx.append(tracer_ctx)
        logger.info("exporting traces to %s", config.otlp_traces_endpoint)
    app[CONFIG] = config
    app[METRICS] = GatewayMetrics()
    app[TRIMMER] = MemoryTrimmer()
    app[MODEL_TASKS] = {}
    app[OPENAPI] = {}
    if stubs is None:
        app.cleanup_ctx.append(grpc_channel_ctx)
    else:
        app[STUBS] = stubs
    for table in (
        rerank_routes,
        score_routes,
        pooling_routes,
        embeddings_routes,
        tokenize_routes,
        invocations_routes,
        health.routes,
        openapi.routes,
    ):
        app.add_routes(table)
    return app


class _HeadTimeoutHandler(RequestHandler):
    """aiohttp's connection handler plus a deadline on the request head.

    aiohttp bounds an idle connection (keepalive_timeout) but not a head that arrives a byte at a time:
    once the first byte of a head comes, the whole head must follow within `head_timeout_s`, or the
    connection is closed (slowloris). A head is complete when the parser counted a new request; a
    request is over once its response finished."""

    __slots__ = ("_answered", "_head_timeout_s", "_head_timer")

    def __init__(self, manager: web.Server, *, head_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout_s = head_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None
        self._answered = 0

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_timer is not None:
            if self._request_count > self._answered:
                self._head_timer.cancel()
                self._head_timer = None
        elif data and self._request_count == self._answered and self.transport is not None:
            self._head_timer = self._loop.call_later(self._head_timeout_s, self._head_expired)

    def _head_expired(self) -> None:
        self._head_timer = None
        if self._request_count == self._answered:
            logger.debug("closing a connection whose request head took over %g s", self._head_timeout_s)
            self.force_close()

    async def finish_response(self, request: Any, resp: Any, start_time: float | None) -> tuple[Any, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._answered += 1

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)


class _GatewayServer(web.Server):
    """web.Server whose connections get `_HeadTimeoutHandler`."""

    head_timeout_s: float = 15.0

    def __call__(self) -> RequestHandler:
        return _HeadTimeoutHandler(self, loop=self._loop, head_timeout_s=self.head_timeout_s, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """AppRunner with the gateway's connection timeouts: head (header_timeout_s), idle keep-alive
    (keepalive_timeout_s); the body timeout is applied where the body is read (`read_body`)."""

    def __init__(self, app: web.Application, config: GatewayConfig, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=config.keepalive_timeout_s, **kwargs)
        self._head_timeout_s = config.header_timeout_s

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _GatewayServer
        assert isinstance(server, _GatewayServer)
        server.head_timeout_s = self._head_timeout_s
        return server


async def start_gateway(
    config: GatewayConfig, *, stubs: Stubs | None = None, shutdown_timeout: float = 10.0
) -> web.AppRunner:
    """Serves the gateway on the running event loop and returns its runner.

    Handlers are cancelled when their client disconnects, which cancels the in-flight gRPC
    call. Stop with `await runner.cleanup()`; with port 0, read the bound port from
    `runner.addresses`.
    """
    runner = GatewayRunner(
        create_app(config, stubs),
        config,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=shutdown_timeout,
    )
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, ssl_context=server_ssl_context(config))
    await site.start()
    target = config.grpc_target if stubs is None else "the servicers in this process"
    scheme = "https" if config.ssl_certfile else "http"
    logger.info("gateway listening (%s) on %s, forwarding to %s", scheme, runner.addresses, target)
    return runner
