"""HTTP helpers every route uses: read a JSON body into a schema, resolve the request id, answer."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any, TypeVar

import pydantic
from aiohttp import web

from lateserve.gateway import errors
from lateserve.gateway.jsonutil import dumps
from lateserve.gateway.keys import METRICS, REQUEST_ID, REQUEST_ID_FROM_HEADER
from lateserve.gateway.middlewares import route_label
from lateserve.v1 import common_pb2

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=pydantic.BaseModel)

UNSUPPORTED_MEDIA_TYPE = "Unsupported Media Type: Only 'application/json' is allowed"


async def read_body(request: web.Request, schema: type[M]) -> M:
    """The request body validated against `schema`.

    Raises GatewayError (400) for a non-JSON content type; aiohttp raises 413 past
    client_max_size; a pydantic error becomes 400 naming the first bad field.
    """
    if request.content_type.lower() != "application/json":
        raise errors.GatewayError(UNSUPPORTED_MEDIA_TYPE)
    raw = await request.read()
    try:
        body = schema.model_validate_json(raw)
    except pydantic.ValidationError as exc:
        try:
            data: object = json.loads(raw)
        except ValueError:
            data = None
        raise errors.GatewayError.from_api_error(errors.from_validation_error(exc, data)) from exc
    extra = body.model_extra
    if extra:
        logger.debug("ignored request fields: %s", sorted(extra))
    return body


def request_id(request: web.Request, body_request_id: str | None = None) -> str:
    """x-request-id if sent, else the body's `request_id`, else the generated id (as vLLM)."""
    if body_request_id and not request.get(REQUEST_ID_FROM_HEADER, False):
        request[REQUEST_ID] = body_request_id
    return request[REQUEST_ID]


def grpc_metadata(request: web.Request) -> tuple[tuple[str, str], ...]:
    """Metadata sent with every gRPC call: the request id, for the server's logs."""
    return (("x-request-id", request[REQUEST_ID]),)


def created() -> int:
    """vLLM's `created`: Unix seconds."""
    return int(time.time())


def count_tokens(request: web.Request, usage: common_pb2.Usage) -> None:
    """Adds the response's prompt tokens to the route's counter."""
    request.app[METRICS].prompt_tokens.labels(route_label(request)).inc(usage.prompt_tokens)


def json_response(data: Any, *, headers: Mapping[str, str] | None = None, status: int = 200) -> web.Response:
    """A compact JSON response."""
    return web.Response(text=dumps(data), status=status, content_type="application/json", headers=headers)
