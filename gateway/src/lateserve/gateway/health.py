"""Operational routes: /health, /ping, /version, /v1/models (from InfoService) and /metrics."""

from __future__ import annotations

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2

from lateserve.gateway import errors
from lateserve.gateway.common import http
from lateserve.gateway.errors import GatewayError
from lateserve.gateway.keys import METRICS, STUBS
from lateserve.v1 import info_service_pb2

HEALTH_TIMEOUT_S = 5.0

routes = web.RouteTableDef()


async def _serving(request: web.Request) -> bool:
    """True when the gRPC server reports the overall service ("") as SERVING."""
    try:
        reply = await request.app[STUBS].health.Check(
            health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_TIMEOUT_S
        )
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """200 with an empty body when the server is SERVING, else 503 (as vLLM)."""
    return web.Response(status=200 if await _serving(request) else 503)


@routes.get("/ping")
@routes.post("/ping")
async def ping(request: web.Request) -> web.StreamResponse:
    """SageMaker-style health check; same answer as /health."""
    return await health(request)


async def _get_info(request: web.Request) -> info_service_pb2.GetInfoResponse:
    stub = request.app[STUBS].info
    return await stub.GetInfo(info_service_pb2.GetInfoRequest(), metadata=http.grpc_metadata(request))


@routes.get("/version")
async def version(request: web.Request) -> web.Response:
    """`{"version": ...}`: the server's version from InfoService."""
    info = await _get_info(request)
    return http.json_response({"version": info.version})


def model_to_json(model: info_service_pb2.ModelInfo, created: int) -> dict[str, object]:
    """One OpenAI model card."""
    return {
        "id": model.id,
        "object": "model",
        "created": created,
        "owned_by": "lateserve",
        "root": model.source or model.id,
        "parent": None,
        "max_model_len": model.max_model_len,
    }


def models_to_json(info: info_service_pb2.GetInfoResponse, created: int) -> dict[str, object]:
    """The OpenAI model list built from GetInfo."""
    return {"object": "list", "data": [model_to_json(model, created) for model in info.models]}


@routes.get("/v1/models")
async def models(request: web.Request) -> web.Response:
    """The served models in OpenAI's list format."""
    info = await _get_info(request)
    return http.json_response(models_to_json(info, http.created()))


@routes.get("/v1/models/{model_id:.+}")
async def model(request: web.Request) -> web.Response:
    """One served model's card (OpenAI's retrieve-model); an id not served is 404 in vLLM's envelope."""
    wanted = request.match_info["model_id"]
    info = await _get_info(request)
    for served in info.models:
        if served.id == wanted:
            return http.json_response(model_to_json(served, http.created()))
    raise GatewayError(f"The model `{wanted}` does not exist.", param="model", status=404, type=errors.NOT_FOUND)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this app's registry."""
    body, content_type = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": content_type})
