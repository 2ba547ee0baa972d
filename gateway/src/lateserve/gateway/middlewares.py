"""Middlewares: the outermost one (sidecar with --otlp-traces-endpoint only) makes a span per request; the
next turns every failure into vLLM's error envelope and echoes the request id; the inner ones record
Prometheus metrics and one log line per request, and check the API key."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import hmac
import logging
import time
import uuid
from collections.abc import Callable
from urllib.parse import quote

import grpc
from aiohttp import web
from aiohttp.typedefs import Handler

from lateserve.gateway import errors
from lateserve.gateway.keys import CONFIG, METRICS, REQUEST_ID, REQUEST_ID_FROM_HEADER, SPAN, TRACER

logger = logging.getLogger(__name__)

# Status recorded when the client went away before the answer (nginx's convention).
CLIENT_CLOSED = 499
# Probes and scrapes are logged at DEBUG so they do not drown the per-request INFO lines.
_QUIET_ROUTES = frozenset({"/health", "/ping", "/metrics"})


class MemoryTrimmer:
    """Gives freed heap back to the OS a moment after a large request (glibc's malloc_trim, in a thread,
    at most once a second): without it the JSON of one 10 MB request stays in the process's malloc arenas."""

    def __init__(self, threshold_bytes: int = 1 << 20, delay_s: float = 0.5, min_interval_s: float = 1.0) -> None:
        self.threshold_bytes = threshold_bytes
        self.delay_s = delay_s
        self.min_interval_s = min_interval_s
        self._last = 0.0
        self._trim = malloc_trim()

    def after(self, nbytes: int) -> None:
        """Schedule a trim when a request or response of `nbytes` was large (the response is still held now)."""
        if self._trim is None or nbytes < self.threshold_bytes:
            return
        now = time.monotonic()
        if now - self._last < self.min_interval_s:
            return
        self._last = now
        loop = asyncio.get_running_loop()
        loop.call_later(self.delay_s, lambda: loop.run_in_executor(None, self._run))

    def _run(self) -> None:
        if self._trim is not None:
            self._trim(0)


@functools.cache
def malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim; None with another C library."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


TRIMMER = web.AppKey("memory_trimmer", MemoryTrimmer)


def route_label(request: web.Request) -> str:
    """The route template ("/rerank"), or "unmatched" so unknown paths cannot blow up label sets."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Assigns the request id and maps any exception to `{"error": {...}}` with status = code."""
    header_id = request.headers.get("x-request-id")
    limit = request.app[CONFIG].max_request_id_chars
    if header_id and len(header_id) > limit:
        # Never echoed (nor logged): a client could otherwise make every answer and log line arbitrarily big.
        request[REQUEST_ID_FROM_HEADER] = False
        request[REQUEST_ID] = uuid.uuid4().hex
        refused = _error(
            request,
            errors.ApiError(
                status=400,
                message=f"x-request-id has {len(header_id)} characters, more than the {limit} allowed "
                "(--max-request-id-chars)",
                type=errors.BAD_REQUEST,
                param="x-request-id",
            ),
        )
        refused.headers["x-request-id"] = request[REQUEST_ID]
        return refused
    request[REQUEST_ID_FROM_HEADER] = bool(header_id)
    request[REQUEST_ID] = header_id or uuid.uuid4().hex
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _error(request, errors.from_http_exception(exc))
    except Exception as exc:
        api_error = errors.from_exception(exc)
        if isinstance(exc, grpc.RpcError):
            if api_error.status >= 500:
                logger.warning(
                    "%s failed upstream (%d): %s (request id %s)",
                    request.path,
                    api_error.status,
                    api_error.message,
                    request[REQUEST_ID],
                )
        elif api_error.status >= 500:
            logger.exception("unhandled error in %s (request id %s)", request.path, request[REQUEST_ID])
        response = _error(request, api_error)
        if api_error.status == 408:
            response.force_close()  # the rest of a body that did not come in time is not waited for
    response.headers["x-request-id"] = header_value(request[REQUEST_ID])
    request.app[TRIMMER].after(max(request.content_length or 0, response.content_length or 0))
    return response


def header_value(text: str) -> str:
    r"""`text` as a header value: printable ASCII as is, anything else (a body request_id with accents or
    line breaks) percent-encoded as UTF-8, so it can neither break nor inject a header.

    >>> header_value("req-1"), header_value("a\u00e9\r\nX-Evil: 1")
    ('req-1', 'a%C3%A9%0D%0AX-Evil%3A%201')
    """
    return text if text.isascii() and text.isprintable() else quote(text, safe="")


def _error(request: web.Request, api_error: errors.ApiError) -> web.Response:
    request.app[METRICS].errors.labels(route_label(request), api_error.type).inc()
    return errors.error_response(api_error)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts and times every request by route template and final status."""
    metrics = request.app[METRICS]
    route = route_label(request)
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        if response.content_length:
            metrics.response_bytes.labels(route).inc(response.content_length)
        return response
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    except Exception as exc:
        status = errors.from_exception(exc).status
        raise
    finally:
        elapsed = time.perf_counter() - start
        metrics.requests.labels(route, str(status)).inc()
        metrics.duration.labels(route).observe(elapsed)
        logger.log(
            logging.DEBUG if route in _QUIET_ROUTES else logging.INFO,
            "%s %s %d %.1fms request_id=%s",
            request.method,
            request.path,
            status,
            elapsed * 1e3,
            request[REQUEST_ID],
        )


# Routes open without the API key: health probes, the version and Prometheus scrapes.
PUBLIC_PATHS = frozenset({"/health", "/ping", "/version", "/metrics"})


def bearer_matches(header: str | None, api_key: str) -> bool:
    """True when `header` is "Bearer <api_key>" (scheme case-insensitive); the key is compared in
    constant time (hmac.compare_digest), so its bytes cannot be found by timing answers.

    >>> bearer_matches("Bearer k1", "k1"), bearer_matches("Bearer k2", "k1"), bearer_matches(None, "k1")
    (True, False, False)
    """
    scheme, _, token = (header or "").strip().partition(" ")
    same = hmac.compare_digest(token.strip().encode(), api_key.encode())
    return same and scheme.lower() == "bearer"


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With --api-key: `Authorization: Bearer <key>` on every route but PUBLIC_PATHS, else 401 in vLLM's
    envelope (raised into the error middleware). Without a key configured it does nothing."""
    api_key = request.app[CONFIG].api_key
    presented = request.headers.get("Authorization")
    if api_key and request.path not in PUBLIC_PATHS and not bearer_matches(presented, api_key):
        error = errors.GatewayError("Unauthorized", status=401, type=errors.UNAUTHORIZED)
        error.api_error.headers["WWW-Authenticate"] = "Bearer"
        raise error
    return await handler(request)


@web.middleware
async def tracing_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With a tracer (the sidecar's --otlp-traces-endpoint): one SERVER span per request, outside the error
    middleware so it sees the status the client gets; `http.grpc_metadata` hands it to the gRPC call."""
    tracer = request.app.get(TRACER)
    if tracer is None:
        return await handler(request)
    route = route_label(request)
    span = tracer.start(
        f"{request.method} {route}",
        request.headers,
        {"http.request.method": request.method, "http.route": route, "url.path": request.path},
    )
    request[SPAN] = span
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    finally:
        tracer.finish(span, status, {"lateserve.request_id": request.get(REQUEST_ID, "")})
