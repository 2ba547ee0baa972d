"""The one mapping from server errors to gRPC statuses, and the wrapper every servicer method wears.

A LateserveError becomes its status code with google.rpc details (ErrorInfo, BadRequest,
RetryInfo); anything else becomes INTERNAL with the traceback logged, never a raw exception.

Every call answers with its request id (`x-request-id`) and, when the response carries Timings, the
per-stage times (`x-lateserve-*-ms`, the gateway's HTTP header names) as trailing metadata; with
--otlp-traces-endpoint each call is a span.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any, NamedTuple, TypeVar
from urllib.parse import quote

import grpc
from grpc_status import rpc_status

from lateserve.server import metrics, tracing
from lateserve.server.domain import InvalidArgument, LateserveError
from lateserve.wire import reasons
from lateserve.wire.status import INTERNAL, ErrorDetails, pack_status

log = logging.getLogger(__name__)
Req = TypeVar("Req")
Resp = TypeVar("Resp")


REQUEST_ID_KEY = "x-request-id"
DEFAULT_MAX_REQUEST_ID_CHARS = 256
# The id LimitedServicer resolved (with the configured bound) for the call it is running.
CALL_REQUEST_ID: ContextVar[str | None] = ContextVar("lateserve_request_id", default=None)


class _Status(NamedTuple):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


class RpcStatus(_Status, grpc.Status):
    """A grpc.Status with our trailing metadata appended."""


def incoming_metadata(context: Any) -> dict[str, str]:
    """The call's text metadata (binary `-bin` entries left out); {} where the context has none."""
    read = getattr(context, "invocation_metadata", None)
    items = read() if read is not None else None
    return {str(k).lower(): v for k, v in items or () if isinstance(v, str)}


def begin_call(request: Any, context: Any, max_chars: int = DEFAULT_MAX_REQUEST_ID_CHARS) -> str:
    """The call's request id: the request's `request_id`, else `x-request-id` metadata, else a new uuid
    hex. Written into an empty `request_id` field, so the response id ends with it (vLLM's rule for the
    header). Metadata over `max_chars` is refused (InvalidArgument); neither it nor a request_id over
    `max_chars` (which RequestLimits refuses) is ever echoed."""
    given = incoming_metadata(context).get(REQUEST_ID_KEY, "")
    if len(given) > max_chars:
        raise InvalidArgument(
            f"x-request-id has {len(given)} characters, more than the {max_chars} allowed (--max-request-id-chars)",
            reason=reasons.REQUEST_TOO_LARGE,
            field=REQUEST_ID_KEY,
            metadata={"limit": str(max_chars), "requested": str(len(given))},
        )
    body = getattr(request, "request_id", None)
    if body and len(body) > max_chars:
        return uuid.uuid4().hex  # the request limits refuse it; never echoed
    rid: str = body or given or uuid.uuid4().hex
    if body == "":
        request.request_id = rid
    return rid


def current_request_id(request: Any, context: Any) -> str:
    """The id LimitedServicer chose for this call, or one chosen now (services without request limits)."""
    rid = CALL_REQUEST_ID.get()
    if rid is None:
        try:
            rid = begin_call(request, context)
        except InvalidArgument:
            rid = uuid.uuid4().hex
    return rid


def timing_metadata(timings: Any) -> tuple[tuple[str, str], ...]:
    """A Timings message as `x-lateserve-{prepare,queue,inference,total}-ms` pairs (milliseconds)."""
    return (
        ("x-lateserve-prepare-ms", f"{timings.tokenize_ns / 1e6:.3f}"),
        ("x-lateserve-queue-ms", f"{timings.queue_ns / 1e6:.3f}"),
        ("x-lateserve-inference-ms", f"{timings.inference_ns / 1e6:.3f}"),
        ("x-lateserve-total-ms", f"{timings.total_ns / 1e6:.3f}"),
    )


def metadata_value(text: str) -> str:
    """`text` as a gRPC metadata value: printable ASCII as is, anything else percent-encoded (UTF-8).

    >>> metadata_value("req-1 a"), metadata_value("réq")
    ('req-1 a', 'r%C3%A9q')
    """
    return text if text.isascii() and text.isprintable() else quote(text, safe="")


def _set_trailing(context: Any, rid: str, message: Any) -> None:
    pairs: tuple[tuple[str, str], ...] = ((REQUEST_ID_KEY, metadata_value(rid)),)
    if message is not None and _has_timings(message):
        pairs += timing_metadata(message.timings)
    setter = getattr(context, "set_trailing_metadata", None)
    if setter is not None:
        setter(pairs)


def _has_timings(message: Any) -> bool:
    try:
        return bool(message.HasField("timings"))
    except ValueError:  # no such field
        return False


def _span_attributes(response: Any) -> dict[str, Any]:
    attrs: dict[str, Any] = {"model": getattr(response, "model", None) or None}
    usage = getattr(response, "usage", None)
    if usage is not None:
        attrs["tokens"] = usage.prompt_tokens
    for name in ("results", "outputs", "embeddings"):
        items = getattr(response, name, None)
        if items is not None:
            attrs["items"] = len(items)
            break
    return attrs


def to_rpc_status(exc: BaseException, request_id: str | None = None) -> grpc.Status:
    """grpc.Status (with rich details) for any exception a handler let escape; `request_id` goes into
    its trailing metadata."""
    status = _to_rpc_status(exc)
    if request_id is None:
        return status
    echo = (REQUEST_ID_KEY, metadata_value(request_id))
    return RpcStatus(status.code, status.details, (*status.trailing_metadata, echo))


def _to_rpc_status(exc: BaseException) -> grpc.Status:
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
        rid = current_request_id(request, context)
        with tracing.request_span(
            fn.__name__, incoming_metadata(context) if tracing.enabled() else None, request_id=rid
        ) as span:
            try:
                response = await fn(self, request, context)
            except asyncio.CancelledError:
                metrics.REQUESTS.labels(fn.__name__, "CANCELLED").inc()
                raise
            except Exception as exc:
                _record(fn.__name__, exc, start)
                tracing.set_attributes(span, error_reason=getattr(exc, "reason", "INTERNAL"))
                await context.abort_with_status(to_rpc_status(exc, rid))
                raise  # abort_with_status raises; this keeps type checkers honest
            _record(fn.__name__, None, start)
            _set_trailing(context, rid, response)
            if span is not None:
                tracing.set_attributes(span, **_span_attributes(response))
            return response

    return wrapper


def rpc_stream(
    fn: Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Resp]]:
    """Wrap a server-streaming servicer method the same way."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Resp]:
        start = time.perf_counter()
        rid = current_request_id(request, context)
        last: Any = None
        with tracing.request_span(
            fn.__name__, incoming_metadata(context) if tracing.enabled() else None, request_id=rid
        ) as span:
            try:
                async for message in fn(self, request, context):
                    if _has_timings(message):
                        last = message
                    yield message
            except asyncio.CancelledError:
                metrics.REQUESTS.labels(fn.__name__, "CANCELLED").inc()
                raise
            except Exception as exc:
                _record(fn.__name__, exc, start)
                tracing.set_attributes(span, error_reason=getattr(exc, "reason", "INTERNAL"))
                await context.abort_with_status(to_rpc_status(exc, rid))
                return
            _record(fn.__name__, None, start)
            _set_trailing(context, rid, last)
            if span is not None and last is not None:
                tracing.set_attributes(span, tokens=last.usage.prompt_tokens)

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
