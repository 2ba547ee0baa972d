"""The one table from failures to HTTP: gRPC status + ErrorInfo reason, pydantic errors and aiohttp
exceptions become vLLM's error envelope `{"error": {"message", "type", "param", "code"}}`.

No behaviour is decided here: the server chose the code, reason, message and field; this module
only picks the HTTP status and type name for them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import pydantic
from aiohttp import web
from google.rpc import status_pb2

from lateserve.gateway.jsonutil import dumps
from lateserve.wire import status as wire_status

logger = logging.getLogger(__name__)

_DETAILS_KEY = "grpc-status-details-bin"

BAD_REQUEST = "BadRequestError"
INTERNAL = "InternalServerError"
TIMEOUT = "RequestTimeoutError"
NOT_FOUND = "NotFoundError"
UNAUTHORIZED = "UnauthorizedError"

# gRPC code -> (HTTP status, vLLM/OpenAI error type). Anything not listed is 500.
_BY_CODE: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, BAD_REQUEST),
    grpc.StatusCode.OUT_OF_RANGE: (400, BAD_REQUEST),
    grpc.StatusCode.NOT_FOUND: (404, "NotFoundError"),
    grpc.StatusCode.UNAUTHENTICATED: (401, UNAUTHORIZED),
    grpc.StatusCode.UNIMPLEMENTED: (501, "NotImplementedError"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "RateLimitError"),
    grpc.StatusCode.UNAVAILABLE: (503, "ServiceUnavailableError"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "GatewayTimeoutError"),
}

# (gRPC code, reason) overrides. RESOURCE_EXHAUSTED without a lateserve ErrorInfo (its reason then
# defaults to the code name) comes from gRPC itself: a message over the channel's size limit.
_BY_REASON: dict[tuple[grpc.StatusCode, str], tuple[int, str]] = {
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED"): (413, "RequestEntityTooLargeError"),
}

# Reasons whose vLLM envelope has `"param": null` although the server names a field (vLLM's pairing
# checks raise plain ValueErrors). Elsewhere `param` is the field of a 400, and null otherwise.
_NO_PARAM_REASONS = frozenset({wire_status.EMPTY_INPUT, wire_status.PAIRING_MISMATCH})
# Reasons whose vLLM `param` is fixed whatever item the server names: an over-long input is
# `"param": "input_tokens"` in vLLM, while gRPC's BadRequest.field names the item (`documents[3]`).
_FIXED_PARAM: dict[str, str] = {wire_status.INPUT_TOO_LONG: "input_tokens"}

# HTTP status -> type, for errors raised by aiohttp itself (routing, body limit).
_BY_HTTP_STATUS: dict[int, str] = {
    400: BAD_REQUEST,
    401: UNAUTHORIZED,
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: TIMEOUT,
    413: "RequestEntityTooLargeError",
    415: "UnsupportedMediaTypeError",
    429: "RateLimitError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


@dataclass(frozen=True, slots=True)
class ApiError:
    """One error as the HTTP client will see it."""

    status: int
    message: str
    type: str
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, object]:
        """The vLLM envelope; `code` always equals the HTTP status."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


class GatewayError(Exception):
    """A request the gateway cannot even translate (bad JSON, a task name with no proto value)."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400, type: str = BAD_REQUEST):
        super().__init__(message)
        self.api_error = ApiError(status=status, message=message, type=type, param=param)

    @classmethod
    def from_api_error(cls, api_error: ApiError) -> GatewayError:
        """Wraps an already mapped error so it can be raised."""
        error = cls(api_error.message)
        error.api_error = api_error
        return error


def rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status in the `grpc-status-details-bin` trailer, or None.

    Works on grpc.aio.AioRpcError, whose code()/details()/trailing_metadata() are plain methods.
    A trailer that does not parse is ignored (the code and message still stand).
    """
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except Exception:  # a malformed trailer must not hide the real error
                logger.warning("unparsable %s trailer", _DETAILS_KEY)
                return None
    return None


def from_rpc_error(error: grpc.RpcError) -> ApiError:
    """HTTP status, type, param and Retry-After for a failed gRPC call."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = (error.details() if hasattr(error, "details") else None) or code.name
    details = wire_status.unpack_details(code, message, rich_status(error))
    status, type_ = _BY_REASON.get((code, details.reason)) or _BY_CODE.get(code, (500, INTERNAL))
    headers: dict[str, str] = {}
    if details.retry_after_s is not None and status in (429, 503):
        headers["Retry-After"] = str(max(0, math.ceil(details.retry_after_s)))
    param = details.field if status == 400 and details.reason not in _NO_PARAM_REASONS else None
    if status == 400 and details.reason in _FIXED_PARAM:
        param = _FIXED_PARAM[details.reason]
    return ApiError(status=status, message=details.message, type=type_, param=param, headers=headers)


_MISSING = object()


def field_path(loc: tuple[int | str, ...], data: object = _MISSING) -> str:
    """A pydantic error location as a field path: ("documents", 3, "content", 0) -> "documents[3].content[0]".

    pydantic puts the union member it tried into `loc` ("str", "list[int]", a model name). With the
    request JSON as `data`, only the parts that really index into it are kept, which drops those.
    """
    return _format_path(_json_path(loc, data, missing=False))


def _json_path(loc: tuple[int | str, ...], data: object, *, missing: bool) -> tuple[int | str, ...]:
    path: list[int | str] = []
    node = data
    for position, part in enumerate(loc, start=1):
        if node is not _MISSING:
            child = _child(node, part)
            if child is not _MISSING:
                node = child
            elif not (missing and position == len(loc)):
                continue  # a union member's name, not a place in the JSON (a missing field is kept)
        path.append(part)
    return tuple(path)


def _child(node: object, part: int | str) -> object:
    if isinstance(node, dict) and isinstance(part, str) and part in node:
        return node[part]
    if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
        return node[part]
    return _MISSING


def _format_path(path: tuple[int | str, ...]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


# Longest echo of an offending value in a validation message: enough to recognise it, never a whole document.
_MAX_SHOWN = 100
# Problems whose `input` is not the offending value: the enclosing object (a missing field, a model-level rule)
# or the raw body (invalid JSON).
_NO_VALUE_TYPES = frozenset({"missing", "json_invalid", "json_type", "value_error", "assertion_error"})


def _shown(value: object) -> str:
    """`value`'s repr as pydantic prints it, cut to _MAX_SHOWN characters.

    >>> _shown(-3), _shown("middle"), _shown("x" * 200)[-5:]
    ('-3', "'middle'", 'xx...')
    """
    if isinstance(value, str) and len(value) > _MAX_SHOWN:
        value = value[:_MAX_SHOWN]  # bound the work before the repr
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _with_value(problem: Mapping[str, Any]) -> str:
    """pydantic's message with the offending value in pydantic's own words (vLLM's validation messages are
    pydantic's str, which shows the input; a client debugging a generated request needs to see what it sent):
    "Input should be 'left' or 'right' [type=literal_error, input_value='middle', input_type=str]".
    """
    msg = str(problem["msg"])
    if problem["type"] in _NO_VALUE_TYPES or "input" not in problem:
        return msg
    value = problem["input"]
    return f"{msg} [type={problem['type']}, input_value={_shown(value)}, input_type={type(value).__name__}]"


def from_validation_error(error: pydantic.ValidationError, data: object = _MISSING) -> ApiError:
    """400 naming the first offending field (param); the message lists each location once.

    A value that fails a union (e.g. `str | list[...]`) is reported by every member; the failures
    of the members that did not fit the value's shape sit at a prefix of the real one, so they
    are dropped, and one message per location is kept.
    """
    problems = [
        (_json_path(tuple(p["loc"]), data, missing=p["type"] == "missing"), _with_value(p))
        for p in error.errors(include_url=False)
    ]
    paths = {path for path, _ in problems}
    seen: dict[str, str] = {}
    for path, msg in problems:
        if any(len(other) > len(path) and other[: len(path)] == path for other in paths):
            continue
        seen.setdefault(_format_path(path), msg)
    message = "; ".join(f"{loc}: {msg}" if loc else msg for loc, msg in seen.items())
    return ApiError(status=400, message=message or str(error), type=BAD_REQUEST, param=next(iter(seen), "") or None)


def from_http_exception(error: web.HTTPException) -> ApiError:
    """aiohttp's own errors (404 route, 405 method, 413 body size) in the same envelope."""
    type_ = _BY_HTTP_STATUS.get(error.status, BAD_REQUEST if error.status < 500 else INTERNAL)
    message = error.text if error.text and not error.text.startswith(f"{error.status}:") else error.reason
    return ApiError(status=error.status, message=message, type=type_)


def from_exception(error: BaseException) -> ApiError:
    """The envelope for anything a handler raised."""
    if isinstance(error, GatewayError):
        return error.api_error
    if isinstance(error, pydantic.ValidationError):
        return from_validation_error(error)
    if isinstance(error, grpc.RpcError):
        return from_rpc_error(error)
    if isinstance(error, web.HTTPException):
        return from_http_exception(error)
    return ApiError(status=500, message="Internal server error", type=INTERNAL)


def error_response(error: ApiError) -> web.Response:
    """A JSON response carrying `error` with its status and headers."""
    return web.Response(
        status=error.status, text=dumps(error.body()), content_type="application/json", headers=error.headers
    )
