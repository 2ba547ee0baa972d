"""Typed exceptions for failed calls, built from the google.rpc.Status details the server attaches.

Callers switch on exception classes (or the stable `reason`), never on message text. The class
is chosen by ErrorInfo.reason first, because it names the cause exactly, then by status code, so
errors from a server or proxy that sends no rich details still land in a useful class.
"""

from __future__ import annotations

from typing import Any, Protocol

import grpc
from grpc_status import rpc_status

from lateserve.wire import status as wire_status


class LateserveError(Exception):
    """A failed lateserve call: gRPC code, stable reason, message, offending field, retry hint."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        field: str | None = None,
        retry_after_s: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code.name} ({reason}): {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s
        self.metadata = dict(metadata or {})


class InvalidArgumentError(LateserveError):
    """The request is wrong (too long, empty, mismatched pairs); `field` names the culprit."""


class NotFoundError(LateserveError):
    """The named model (or other entity) is not served."""


class UnsupportedTaskError(LateserveError):
    """The model cannot do what was asked (e.g. embed on a token-only model)."""


class OverloadedError(LateserveError):
    """The server's queue is full; retry after `retry_after_s`."""


class UnavailableError(LateserveError):
    """The server or its workers cannot answer now (down, restarting, shutting down)."""


class UnauthenticatedError(LateserveError):
    """The server requires an API key (--api-key) and the call had none or a wrong one: pass api_key=."""


class ProtocolError(LateserveError):
    """The server's reply broke the lateserve.v1 contract (e.g. a stream chunk out of order)."""


_BY_REASON: dict[str, type[LateserveError]] = {
    wire_status.INVALID_ARGUMENT: InvalidArgumentError,
    wire_status.INPUT_TOO_LONG: InvalidArgumentError,
    wire_status.TRUNCATION_TOO_LARGE: InvalidArgumentError,
    wire_status.EMPTY_INPUT: InvalidArgumentError,
    wire_status.PAIRING_MISMATCH: InvalidArgumentError,
    wire_status.UNSUPPORTED_INPUT: InvalidArgumentError,
    wire_status.UNSUPPORTED_TASK: UnsupportedTaskError,
    wire_status.MODEL_NOT_FOUND: NotFoundError,
    wire_status.QUEUE_FULL: OverloadedError,
    wire_status.WORKER_UNAVAILABLE: UnavailableError,
    wire_status.SHUTTING_DOWN: UnavailableError,
}
_BY_CODE: dict[grpc.StatusCode, type[LateserveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNIMPLEMENTED: UnsupportedTaskError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}


class _CallLike(Protocol):
    """What both grpc.RpcError (sync) and grpc.aio.AioRpcError offer."""

    def code(self) -> grpc.StatusCode: ...

    def details(self) -> str | None: ...

    def trailing_metadata(self) -> Any: ...


def error_class(code: grpc.StatusCode, reason: str) -> type[LateserveError]:
    """The exception class for a code and reason: reason first, then code, else the base class."""
    return _BY_REASON.get(reason) or _BY_CODE.get(code) or LateserveError


def from_details(details: wire_status.ErrorDetails) -> LateserveError:
    """The typed exception for already-unpacked error details."""
    cls = error_class(details.code, details.reason)
    return cls(
        details.code,
        details.reason,
        details.message,
        field=details.field,
        retry_after_s=details.retry_after_s,
        metadata=details.metadata,
    )


def from_rpc_error(error: grpc.RpcError) -> LateserveError:
    """The typed exception for a failed call (sync RpcError or aio AioRpcError).

    Trailing metadata with an inconsistent status (ValueError in from_call) is treated as
    "no rich details" rather than hiding the original failure behind a parsing error.
    """
    call: _CallLike = error
    code = call.code() or grpc.StatusCode.UNKNOWN
    message = call.details() or ""
    try:
        status = rpc_status.from_call(call)
    except (ValueError, TypeError):
        status = None
    return from_details(wire_status.unpack_details(code, message, status))
