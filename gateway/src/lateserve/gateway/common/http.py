"""HTTP helpers every route uses: read a JSON body into a schema, resolve the request id, answer."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

import pydantic
from aiohttp import web

from lateserve.gateway import errors
from lateserve.gateway.common.protocol import EncodingFields
from lateserve.gateway.common.translate import bytes_body, timing_headers
from lateserve.gateway.config import GatewayConfig
from lateserve.gateway.jsonutil import dumps
from lateserve.gateway.keys import CONFIG, METRICS, PARSED_BODY, REQUEST_ID, REQUEST_ID_FROM_HEADER, SPAN, TRACER
from lateserve.gateway.middlewares import header_value, route_label
from lateserve.v1 import common_pb2

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=pydantic.BaseModel)

UNSUPPORTED_MEDIA_TYPE = "Unsupported Media Type: Only 'application/json' is allowed"


async def read_body(request: web.Request, schema: type[M]) -> M:
    """The request body validated against `schema`.

    Raises GatewayError: 400 for a non-JSON content type, JSON that does not parse (nested too deeply
    included) or a body over a request limit; 408 when the body does not arrive within the body timeout.
    aiohttp raises 413 past client_max_size; a pydantic error becomes 400 naming the first bad field.
    The body is parsed once, and measured (`check_limits`) before pydantic builds anything from it.
    """
    data = await read_json(request)
    try:
        body = schema.model_validate(data)
    except pydantic.ValidationError as exc:
        raise errors.GatewayError.from_api_error(errors.from_validation_error(exc, data)) from exc
    extra = body.model_extra
    if extra:
        logger.debug("ignored request fields: %s", sorted(extra))
    return body


async def read_json(request: web.Request) -> object:
    """The request body as JSON, measured against the request limits; read and parsed once per request
    (/invocations parses it to pick a route, whose handler then reads the same object)."""
    if PARSED_BODY in request:
        return request[PARSED_BODY]
    if request.content_type.lower() != "application/json":
        raise errors.GatewayError(UNSUPPORTED_MEDIA_TYPE)
    config = request.app[CONFIG]
    try:
        async with asyncio.timeout(config.body_timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise errors.GatewayError(
            f"the request body did not arrive within {config.body_timeout_s:g} s", status=408, type=errors.TIMEOUT
        ) from None
    data = parse_json(raw)
    check_limits(data, config)
    request[PARSED_BODY] = data
    return data


def parse_json(raw: bytes) -> object:
    """The body as JSON, or a 400: malformed JSON, invalid UTF-8, nesting past the parser's depth.

    >>> parse_json(b'{"a": [1]}')
    {'a': [1]}
    >>> parse_json(b"[" * 100_000 + b"]" * 100_000)
    Traceback (most recent call last):
    ...
    lateserve.gateway.errors.GatewayError: Invalid JSON: nested too deeply
    """
    try:
        return json.loads(raw)
    except RecursionError:
        raise errors.GatewayError("Invalid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise errors.GatewayError(f"Invalid JSON: {exc}") from None


# Keys whose strings are not input text: image URLs (bounded by the server's --max-image-bytes) and the
# request id (its own limit).
_NOT_TEXT = frozenset({"url", "image_url", "request_id"})
# JSON values walked per item allowed (a multimodal document is a dozen values).
_VALUES_PER_ITEM = 32


def check_limits(data: object, config: GatewayConfig) -> None:
    """Refuse a parsed body over a request limit before anything is built from it: request_id length,
    elements per list, characters per string and per request, JSON values in all.

    The walk stops at the first list longer than the item limit, so its cost is bounded by the limits,
    not by the body (a list of a million tiny documents is refused after one len()). Lists of integers
    are token ids: one input each, bounded by the character limit and not walked.

    >>> cfg = GatewayConfig(grpc_target="x", max_items_per_request=2, max_input_chars=4)
    >>> check_limits({"query": "q", "documents": ["a", "b"]}, cfg)
    >>> def refusal(data):
    ...     try:
    ...         check_limits(data, cfg)
    ...     except errors.GatewayError as exc:
    ...         return exc.api_error.status, exc.api_error.param
    >>> refusal({"query": "q", "documents": ["a", "b", "c"]})
    (400, 'documents')
    >>> refusal({"input": ["abcde"]}), refusal({"input": [[1, 2, 3, 4, 5]]}), refusal({"input": [1, 2, 3, 4]})
    ((400, 'input[0]'), (400, 'input[0]'), None)
    """
    if not isinstance(data, dict):
        return  # the schema refuses it
    rid = data.get("request_id")
    if isinstance(rid, str) and len(rid) > config.max_request_id_chars:
        raise _too_large(
            f"request_id has {len(rid)} characters, more than the {config.max_request_id_chars} allowed "
            "(--max-request-id-chars)",
            "request_id",
        )
    budget = config.max_items_per_request * _VALUES_PER_ITEM + 1024
    total = 0
    stack: list[tuple[object, str]] = [(data, "")]
    while stack:
        node, path = stack.pop()
        budget -= 1
        if budget < 0:
            raise _too_large(
                f"the request has more JSON values than {config.max_items_per_request} items can carry "
                "(--max-items-per-request)",
                None,
            )
        if isinstance(node, str):
            size = len(node)
        elif isinstance(node, dict):
            size = 0
            stack.extend(
                (v, f"{path}.{k}" if path else str(k))
                for k, v in node.items()
                if isinstance(v, str | list | dict) and k not in _NOT_TEXT
            )
        elif isinstance(node, list):
            size = 0
            if node and type(node[0]) is int:
                size = len(node)  # token ids: one input
            elif len(node) > config.max_items_per_request:
                raise _too_large(
                    f"{len(node)} items in {path or 'the body'}, more than the {config.max_items_per_request} "
                    "allowed per request (--max-items-per-request)",
                    path or None,
                )
            else:
                stack.extend((v, f"{path}[{i}]") for i, v in enumerate(node) if isinstance(v, str | list | dict))
        else:
            continue
        if size > config.max_input_chars:
            raise _too_large(
                f"{path} has {size} characters, more than the {config.max_input_chars} allowed per input "
                "(--max-input-chars)",
                path,
            )
        total += size
        if total > config.max_request_chars:
            raise _too_large(
                f"the inputs have more than {config.max_request_chars} characters together, the most one request "
                "may carry (--max-request-chars)",
                path.split("[")[0].split(".")[0] or None,
            )


def _too_large(message: str, param: str | None) -> errors.GatewayError:
    return errors.GatewayError(message, param=param)


def request_id(request: web.Request, body_request_id: str | None = None) -> str:
    """x-request-id if sent, else the body's `request_id`, else the generated id (as vLLM)."""
    if body_request_id and not request.get(REQUEST_ID_FROM_HEADER, False):
        request[REQUEST_ID] = body_request_id
    return request[REQUEST_ID]


_MAX_TRACE_HEADER = 512


def grpc_metadata(request: web.Request) -> tuple[tuple[str, str], ...]:
    """Metadata sent with every gRPC call: the request id, for the server's logs, and the credential.

    With --api-key the HTTP side has already checked the caller (or the route is public), so the
    gateway's own key goes on; without one, the caller's Authorization header is forwarded as is, so a
    sidecar in front of a server with --api-key passes the caller's key on for the server to check."""
    config = request.app[CONFIG]
    metadata: tuple[tuple[str, str], ...] = (("x-request-id", header_value(request[REQUEST_ID])),)
    tracer, span = request.app.get(TRACER), request.get(SPAN)
    if tracer is not None and span is not None:  # the sidecar's own span is the server span's parent
        metadata = (*metadata, *tracer.headers(span))
    else:
        for trace_header in ("traceparent", "tracestate"):  # W3C trace context, for the server's spans
            value = request.headers.get(trace_header)
            if value and len(value) <= _MAX_TRACE_HEADER:
                metadata = (*metadata, (trace_header, value))
    if config.api_key:
        return (*metadata, ("authorization", f"Bearer {config.api_key}"))
    caller = request.headers.get("Authorization")
    if caller and config.forward_authorization:
        return (*metadata, ("authorization", caller))
    return metadata


def created() -> int:
    """vLLM's `created`: Unix seconds."""
    return int(time.time())


def count_tokens(request: web.Request, usage: common_pb2.Usage) -> None:
    """Adds the response's prompt tokens to the route's counter."""
    request.app[METRICS].prompt_tokens.labels(route_label(request)).inc(usage.prompt_tokens)


def json_response(data: Any, *, headers: Mapping[str, str] | None = None, status: int = 200) -> web.Response:
    """A compact JSON response."""
    return web.Response(text=dumps(data), status=status, content_type="application/json", headers=headers)


class TensorResponse(Protocol):
    """What /pooling's and /v1/embeddings' gRPC answers share for a bytes body."""

    id: str
    model: str
    usage: common_pb2.Usage
    timings: common_pb2.Timings


def bytes_response(
    tensors_by_index: Sequence[tuple[int, common_pb2.Tensor]], body: EncodingFields, response: TensorResponse
) -> web.Response:
    """The application/octet-stream answer of encoding_format bytes / bytes_only (vLLM's layout,
    `translate.bytes_body`), with the per-request timing headers."""
    raw, headers = bytes_body(
        tensors_by_index, body, response_id=response.id, created=created(), model=response.model, usage=response.usage
    )
    return web.Response(
        body=raw,
        status=200,
        content_type="application/octet-stream",
        headers={**headers, **timing_headers(response.timings)},
    )
