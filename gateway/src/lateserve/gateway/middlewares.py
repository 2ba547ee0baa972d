"""Middlewares: the outermost one turns every failure into vLLM's error envelope and echoes the
request id; the inner one records Prometheus metrics and one log line per request."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc
from aiohttp import web
from aiohttp.typedefs import Handler

from lateserve.gateway import errors
from lateserve.gateway.keys import METRICS, REQUEST_ID, REQUEST_ID_FROM_HEADER

logger = logging.getLogger(__name__)

# Status recorded when the client went away before the answer (nginx's convention).
CLIENT_CLOSED = 499
# Probes and scrapes are logged at DEBUG so they do not drown the per-request INFO lines.
_QUIET_ROUTES = frozenset({"/health", "/ping", "/metrics"})


def route_label(request: web.Request) -> str:
    """The route template ("/rerank"), or "unmatched" so unknown paths cannot blow up label sets."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Assigns the request id and maps any exception to `{"error": {...}}` with status = code."""
    header_id = request.headers.get("x-request-id")
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
    response.headers["x-request-id"] = request[REQUEST_ID]
    return response


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
