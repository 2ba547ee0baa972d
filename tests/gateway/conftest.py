"""A stand-in lateserve gRPC server for the gateway's HTTP tests: real grpc.aio on 127.0.0.1:0, with
canned answers and rich errors per method, recording every request. It exercises the gateway's
routes, middlewares and channel without the model server (which is tested in tests/integration).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from lateserve.gateway.config import GatewayConfig
from lateserve.v1 import (
    common_pb2,
    embed_service_pb2,
    embed_service_pb2_grpc,
    info_service_pb2,
    info_service_pb2_grpc,
    pool_service_pb2,
    pool_service_pb2_grpc,
    rerank_service_pb2,
    rerank_service_pb2_grpc,
    score_service_pb2,
    score_service_pb2_grpc,
    tokenize_service_pb2,
    tokenize_service_pb2_grpc,
)
from lateserve.wire import status as wire_status
from lateserve.wire.tensors import to_tensor

TIMINGS = common_pb2.Timings(tokenize_ns=11, queue_ns=22, inference_ns=33, total_ns=99)


def default_answers() -> dict[str, Any]:
    """Canned responses; a test replaces one or sets `errors[method]`."""
    return {
        "Rerank": lambda req: rerank_service_pb2.RerankResponse(
            id=f"score-{req.request_id}",
            model="colbert-minilm",
            usage=common_pb2.Usage(prompt_tokens=38, total_tokens=38),
            results=[
                rerank_service_pb2.RerankResult(index=i, document=d, relevance_score=10.0 - i)
                for i, d in enumerate(req.documents)
            ][: req.top_n or None],
            timings=TIMINGS,
        ),
        "Score": lambda req: score_service_pb2.ScoreResponse(
            id=f"score-{req.request_id}",
            model="colbert-minilm",
            usage=common_pb2.Usage(prompt_tokens=17, total_tokens=17),
            results=[score_service_pb2.ScoreResult(index=i, score=1.5 * (i + 1)) for i in range(len(req.documents))],
            timings=TIMINGS,
        ),
        "Pool": lambda req: pool_service_pb2.PoolResponse(
            id=f"pooling-{req.request_id}",
            model="colbert-minilm",
            usage=common_pb2.Usage(prompt_tokens=4, total_tokens=4),
            outputs=[
                pool_service_pb2.PoolOutput(
                    index=i, data=to_tensor(np.full((2, 3), 0.5 * (i + 1), dtype=np.float32), req.dtype)
                )
                for i in range(len(req.inputs) or 1)
            ],
            timings=TIMINGS,
        ),
        "Embed": lambda req: embed_service_pb2.EmbedResponse(
            id=f"embd-{req.request_id}",
            model="colbert-minilm",
            usage=common_pb2.Usage(prompt_tokens=3, total_tokens=3),
            embeddings=[
                embed_service_pb2.Embedding(index=i, data=to_tensor(np.array([0.6, 0.8], dtype=np.float32)))
                for i in range(len(req.inputs))
            ],
            timings=TIMINGS,
        ),
        "Tokenize": lambda req: tokenize_service_pb2.TokenizeResponse(
            count=6,
            max_model_len=512,
            tokens=[101, 2054, 2003, 23928, 1029, 102],
            token_strs=["[CLS]", "what", "is", "colbert", "?", "[SEP]"],
        ),
        "Detokenize": lambda req: tokenize_service_pb2.DetokenizeResponse(prompt="[CLS] what is colbert? [SEP]"),
        "GetInfo": lambda req: info_service_pb2.GetInfoResponse(
            models=[
                info_service_pb2.ModelInfo(
                    id="colbert-minilm", source="models/colbert-minilm", architecture="HF_ColBERT", max_model_len=512
                )
            ],
            version="0.1.0-test",
        ),
    }


@dataclass
class FakeBackend:
    """What the fake server answers and what it saw."""

    answers: dict[str, Callable[[Any], Any]] = field(default_factory=default_answers)
    errors: dict[str, wire_status.ErrorDetails] = field(default_factory=dict)
    requests: dict[str, list[Any]] = field(default_factory=dict)
    metadata: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    delay_s: float = 0.0
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.requests.setdefault(method, []).append(request)
        self.metadata.setdefault(method, []).append(dict(context.invocation_metadata() or ()))
        self.started.set()
        if self.delay_s:
            try:
                await asyncio.sleep(self.delay_s)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if method in self.errors:
            await context.abort_with_status(rpc_status.to_status(wire_status.pack_status(self.errors[method])))
        return self.answers[method](request)

    def last(self, method: str) -> Any:
        return self.requests[method][-1]


class _Rerank(rerank_service_pb2_grpc.RerankServiceServicer):
    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend

    async def Rerank(self, request: Any, context: Any) -> Any:
        return await self.backend.handle("Rerank", request, context)


class _Score(score_service_pb2_grpc.ScoreServiceServicer):
    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend

    async def Score(self, request: Any, context: Any) -> Any:
        return await self.backend.handle("Score", request, context)


class _Pool(pool_service_pb2_grpc.PoolServiceServicer):
    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend

    async def Pool(self, request: Any, context: Any) -> Any:
        return await self.backend.handle("Pool", request, context)

    async def StreamPool(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the fake")


class _Embed(embed_service_pb2_grpc.EmbedServiceServicer):
    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend

    async def Embed(self, request: Any, context: Any) -> Any:
        return await self.backend.handle("Embed", request, context)


class _Tokenize(tokenize_service_pb2_grpc.TokenizeServiceServicer):
    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend

    async def Tokenize(self, request: Any, context: Any) -> Any:
        return await self.backend.handle("Tokenize", request, context)

    async def Detokenize(self, request: Any, context: Any) -> Any:
        return await self.backend.handle("Detokenize", request, context)


class _Info(info_service_pb2_grpc.InfoServiceServicer):
    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend

    async def GetInfo(self, request: Any, context: Any) -> Any:
        return await self.backend.handle("GetInfo", request, context)


@dataclass
class FakeServer:
    backend: FakeBackend
    health: health.aio.HealthServicer
    target: str


@pytest_asyncio.fixture(loop_scope="session")
async def fake_server() -> AsyncIterator[FakeServer]:
    """A fresh fake lateserve gRPC server per test, SERVING."""
    backend = FakeBackend()
    server = grpc.aio.server()
    rerank_service_pb2_grpc.add_RerankServiceServicer_to_server(_Rerank(backend), server)
    score_service_pb2_grpc.add_ScoreServiceServicer_to_server(_Score(backend), server)
    pool_service_pb2_grpc.add_PoolServiceServicer_to_server(_Pool(backend), server)
    embed_service_pb2_grpc.add_EmbedServiceServicer_to_server(_Embed(backend), server)
    tokenize_service_pb2_grpc.add_TokenizeServiceServicer_to_server(_Tokenize(backend), server)
    info_service_pb2_grpc.add_InfoServiceServicer_to_server(_Info(backend), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield FakeServer(backend=backend, health=health_servicer, target=f"127.0.0.1:{port}")
    finally:
        await server.stop(grace=None)


@pytest.fixture
def gateway_config(fake_server: FakeServer) -> GatewayConfig:
    """A gateway config pointing at the fake server, with a small body limit for the 413 test."""
    return GatewayConfig(grpc_target=fake_server.target, host="127.0.0.1", port=0, max_body_bytes=64 << 10)
