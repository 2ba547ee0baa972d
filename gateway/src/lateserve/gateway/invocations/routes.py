"""POST /invocations: vLLM's routing by request shape.

vLLM tries its request schemas in a fixed order and serves the body with the first one that
validates: EmbeddingRequest (when the model has the embed task), RerankRequest, ScoreRequest, then
PoolingRequest; none fits: 400 "Cannot find suitable handler for request. Expected one of: [...]".
The body is parsed once; the chosen route's handler reads the same object.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pydantic
from aiohttp import web

from lateserve.gateway.common import http
from lateserve.gateway.embeddings.protocol import EmbeddingRequest
from lateserve.gateway.embeddings.routes import embeddings
from lateserve.gateway.errors import GatewayError
from lateserve.gateway.keys import MODEL_TASKS, STUBS
from lateserve.gateway.pooling.protocol import PoolingRequest
from lateserve.gateway.pooling.routes import pooling
from lateserve.gateway.rerank.protocol import RerankRequest
from lateserve.gateway.rerank.routes import rerank
from lateserve.gateway.score.protocol import ScoreRequest
from lateserve.gateway.score.routes import score
from lateserve.v1 import common_pb2, info_service_pb2

routes = web.RouteTableDef()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def model_tasks(request: web.Request) -> frozenset[int]:
    """The served model's tasks, asked of InfoService once per app (they do not change)."""
    cache = request.app[MODEL_TASKS]
    if "tasks" not in cache:
        info = await request.app[STUBS].info.GetInfo(
            info_service_pb2.GetInfoRequest(), metadata=http.grpc_metadata(request)
        )
        cache["tasks"] = frozenset(task for model in info.models for task in model.tasks)
    tasks: frozenset[int] = cache["tasks"]
    return tasks


async def candidates(request: web.Request) -> list[tuple[type[pydantic.BaseModel], Handler]]:
    """vLLM's order: earlier entries win."""
    table: list[tuple[type[pydantic.BaseModel], Handler]] = []
    if common_pb2.POOLING_TASK_EMBED in await model_tasks(request):
        table.append((EmbeddingRequest, embeddings))
    table += [(RerankRequest, rerank), (ScoreRequest, score), (PoolingRequest, pooling)]
    return table


@routes.post("/invocations")
async def invocations(request: web.Request) -> web.StreamResponse:
    """Serves the body with the first route whose request schema it fits."""
    data = await http.read_json(request)
    table = await candidates(request)
    for schema, handler in table:
        try:
            schema.model_validate(data)
        except pydantic.ValidationError:
            continue
        return await handler(request)
    names = [schema.__name__ for schema, _ in table]
    raise GatewayError(f"Cannot find suitable handler for request. Expected one of: {names}")
