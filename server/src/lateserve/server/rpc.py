"""The one mapping from server errors to gRPC statuses, and the wrapper every servicer method wears.

A LateserveError becomes its status code with google.rpc details (ErrorInfo, BadRequest,
RetryInfo); anything else becomes INTERNAL with the traceback logged, never a raw exception.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_status import rpc_status

from lateserve.server import metrics
from lateserve.server.domain import InvalidArgument, LateserveError
from lateserve.wire.status import INTERNAL, ErrorDetails, pack_status

log = logging.getLogger(__name__)
Req = TypeVar("Req")
Resp = TypeVar("Resp")


def to_rpc_status(exc: BaseException) -> grpc.Status:
    """grpc.Status (with rich details) for any exception a handler let escape."""
    if isinstance(exc, LateserveError):
        details = ErrorDetails(
            code=grpc.StatusCode[exc.code_name],
            message=exc.message,
            reason=exc.reason,
            metadata=exc.metadata,
            field=exc.field,
            retry_after_s=exc.retry_after_s,
        )
    else:
        details = ErrorDetails(code=grpc.StatusCode.INTERNAL, message="internal server error", reason=INTERNAL)
    return rpc_status.to_status(pack_status(details))


def _record(method: str, exc: BaseException | None, start: float) -> None:
    code = "OK" if exc is None else (exc.code_name if isinstance(exc, LateserveError) else "INTERNAL")
    metrics.REQUESTS.labels(method, code).inc()
    metrics.REQUEST_DURATION.labels("total").observe(time.perf_counter() - start)
    if isinstance(exc, LateserveError):
        metrics.FAILURES.labels(exc.reason).inc()
    elif exc is not None:
        metrics.FAILURES.labels(INTERNAL).inc()
        log.error("%s failed", method, exc_info=exc)


def rpc_method(
    fn: Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]:
    """Wrap a unary servicer method: metrics, logging, error mapping."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Any, Any]) -> Resp:
        start = time.perf_counter()
        try:
            response = await fn(self, request, context)
        except asyncio.CancelledError:
            metrics.REQUESTS.labels(fn.__name__, "CANCELLED").inc()
            raise
        except Exception as exc:
            _record(fn.__name__, exc, start)
            await context.abort_with_status(to_rpc_status(exc))
            raise  # abort_with_status raises; this keeps type checkers honest
        _record(fn.__name__, None, start)
        return response

    return wrapper


def rpc_stream(
    fn: Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Resp]]:
    """Wrap a server-streaming servicer method the same way."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Resp]:
        start = time.perf_counter()
        try:
            async for message in fn(self, request, context):
                yield message
        except asyncio.CancelledError:
            metrics.REQUESTS.labels(fn.__name__, "CANCELLED").inc()
            raise
        except Exception as exc:
            _record(fn.__name__, exc, start)
            await context.abort_with_status(to_rpc_status(exc))
            return
        _record(fn.__name__, None, start)

    return wrapper


class DecodeErrors(grpc.aio.ServerInterceptor):
    """Requests whose bytes are not the method's message answer INVALID_ARGUMENT, not UNKNOWN.

    grpc's own deserialization runs before any handler, so a failure there cannot carry our status. This
    interceptor hands the handler raw bytes and decodes them itself, inside the call, where it can abort
    with a proper status and details."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler
        decode = handler.request_deserializer
        method = getattr(details, "method", "")

        async def parse(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return decode(raw)
            except Exception:
                bad = InvalidArgument(f"the request body is not a valid {method} request message")
                metrics.REQUESTS.labels(method.rsplit("/", 1)[-1], "INVALID_ARGUMENT").inc()
                await context.abort_with_status(to_rpc_status(bad))
                raise

        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_behavior(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                return await unary(await parse(raw, context), context)

            return grpc.unary_unary_rpc_method_handler(
                unary_behavior, request_deserializer=None, response_serializer=handler.response_serializer
            )
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            async def stream_behavior(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                async for message in stream(await parse(raw, context), context):
                    yield message

            return grpc.unary_stream_rpc_method_handler(
                stream_behavior, request_deserializer=None, response_serializer=handler.response_serializer
            )
        return handler


# Services anyone may call without the API key: health checks and reflection (as the HTTP side's /health).
PUBLIC_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                   "/grpc.reflection.v1.ServerReflection/")  # fmt: skip
UNAUTHENTICATED = "UNAUTHENTICATED"


def key_matches(presented: str | None, api_key: str) -> bool:
    """True when `presented` is "Bearer <api_key>" (case-insensitive scheme), compared in constant time.

    >>> key_matches("Bearer s3", "s3"), key_matches("bearer s3", "s3"), key_matches("Bearer s4", "s3")
    (True, True, False)
    >>> key_matches(None, "s3"), key_matches("s3", "s3")
    (False, False)
    """
    scheme, _, token = (presented or "").strip().partition(" ")
    ok_scheme = scheme.lower() == "bearer"
    return hmac.compare_digest(token.strip().encode(), api_key.encode()) and ok_scheme


class ApiKeyAuth(grpc.aio.ServerInterceptor):
    """`authorization: Bearer <key>` metadata on every call but health and reflection; UNAUTHENTICATED
    (ErrorInfo reason UNAUTHENTICATED) otherwise. The refusal answers in the method's own shape, so a
    streaming call fails like a unary one, before the servicer runs."""

    def __init__(self, api_key: str) -> None:
        if not api_key:
            raise ValueError("ApiKeyAuth needs a non-empty key")
        self._api_key = api_key

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = getattr(details, "method", "") or ""
        handler = await continuation(details)
        if handler is None or method.startswith(PUBLIC_SERVICES):
            return handler
        presented = None
        for key, value in getattr(details, "invocation_metadata", None) or ():
            if key == "authorization":
                presented = value if isinstance(value, str) else value.decode("latin-1")
                break
        if key_matches(presented, self._api_key):
            return handler
        refusal = rpc_status.to_status(
            pack_status(
                ErrorDetails(
                    code=grpc.StatusCode.UNAUTHENTICATED,
                    message="Unauthorized: send the API key as `authorization: Bearer <key>` metadata",
                    reason=UNAUTHENTICATED,
                )
            )
        )
        metrics.REQUESTS.labels(method.rsplit("/", 1)[-1], "UNAUTHENTICATED").inc()

        async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await context.abort_with_status(refusal)

        async def refuse_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            await context.abort_with_status(refusal)
            yield  # pragma: no cover - abort raises

        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(refuse_stream, **kwargs)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
        return grpc.stream_stream_rpc_method_handler(refuse_stream, **kwargs)
