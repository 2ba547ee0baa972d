"""Typed keys for what the gateway keeps on the app and on each request (no module singletons)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2_grpc

from lateserve.gateway.config import GatewayConfig
from lateserve.gateway.metrics import GatewayMetrics
from lateserve.gateway.tracing import GatewayTracer
from lateserve.v1 import (
    embed_service_pb2_grpc,
    info_service_pb2_grpc,
    pool_service_pb2_grpc,
    rerank_service_pb2_grpc,
    score_service_pb2_grpc,
    tokenize_service_pb2_grpc,
)


@dataclass(frozen=True, slots=True)
class Stubs:
    """One grpc.aio stub per lateserve.v1 service, all on the same channel."""

    rerank: rerank_service_pb2_grpc.RerankServiceAsyncStub
    score: score_service_pb2_grpc.ScoreServiceAsyncStub
    pool: pool_service_pb2_grpc.PoolServiceAsyncStub
    embed: embed_service_pb2_grpc.EmbedServiceAsyncStub
    tokenize: tokenize_service_pb2_grpc.TokenizeServiceAsyncStub
    info: info_service_pb2_grpc.InfoServiceAsyncStub
    health: Any  # grpc_health.v1.health_pb2_grpc.HealthStub (untyped)

    @classmethod
    def from_channel(cls, channel: grpc.aio.Channel) -> Stubs:
        """Stubs bound to `channel` (which the caller owns and closes)."""
        # grpc ships no type hints, so mypy cannot pick the stubs' grpc.aio overload by itself.
        return cls(
            rerank=cast(
                "rerank_service_pb2_grpc.RerankServiceAsyncStub", rerank_service_pb2_grpc.RerankServiceStub(channel)
            ),
            score=cast(
                "score_service_pb2_grpc.ScoreServiceAsyncStub", score_service_pb2_grpc.ScoreServiceStub(channel)
            ),
            pool=cast("pool_service_pb2_grpc.PoolServiceAsyncStub", pool_service_pb2_grpc.PoolServiceStub(channel)),
            embed=cast(
                "embed_service_pb2_grpc.EmbedServiceAsyncStub", embed_service_pb2_grpc.EmbedServiceStub(channel)
            ),
            tokenize=cast(
                "tokenize_service_pb2_grpc.TokenizeServiceAsyncStub",
                tokenize_service_pb2_grpc.TokenizeServiceStub(channel),
            ),
            info=cast("info_service_pb2_grpc.InfoServiceAsyncStub", info_service_pb2_grpc.InfoServiceStub(channel)),
            health=health_pb2_grpc.HealthStub(channel),
        )


CONFIG = web.AppKey("config", GatewayConfig)
CHANNEL = web.AppKey("grpc_channel", grpc.aio.Channel)
STUBS = web.AppKey("grpc_stubs", Stubs)
METRICS = web.AppKey("metrics", GatewayMetrics)

# The request id: x-request-id, else the body's request_id, else a generated uuid hex. Echoed back.
REQUEST_ID = web.RequestKey("request_id", str)
# Set once the request id came from the x-request-id header (then the body's request_id is ignored).
REQUEST_ID_FROM_HEADER = web.RequestKey("request_id_from_header", bool)
# The request body as parsed JSON, once read (so /invocations and the route it picks parse it once).
PARSED_BODY = web.RequestKey("parsed_body", object)
# The served models' tasks (lateserve.v1 PoolingTask values), from InfoService once, for /invocations.
MODEL_TASKS = web.AppKey("model_tasks", dict)
# The OpenAPI document, built on first request (openapi.py).
OPENAPI = web.AppKey("openapi", dict)
# The sidecar's tracer (--otlp-traces-endpoint); absent without the flag and in the in-process gateway.
TRACER = web.AppKey("tracer", GatewayTracer)
# The request's span, while the tracing middleware runs (the gRPC call names it as its parent).
SPAN = web.RequestKey("span", object)
