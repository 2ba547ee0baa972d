"""`--metrics-port`: Prometheus /metrics on a port of its own, with or without the HTTP gateway.

Without it, `lateserve serve --no-gateway` (gRPC only, behind Envoy or a sidecar gateway) exposes its
lateserve_* series nowhere: /metrics belongs to the gateway, and a sidecar gateway is another process
with only its own HTTP metrics. The queue-depth autoscaler and per-replica dashboards need each serving
process's queue, request and cache series, so the process serves them itself.

A tiny aiohttp app on the server's event loop rather than prometheus_client's `start_http_server`: that
one answers each connection on a thread of its own with no read timeout (a client that stalls holds a
thread for good) and stops only by polling. Here a stalled client costs one idle transport, closed by
aiohttp's keep-alive timeout, it stops with the rest of the server's sockets, and aiohttp is in the
process anyway (the gateway's own stack). The exposition text is rendered on a worker thread, so a
scrape never blocks the loop that serves gRPC. The port is bound before the model loads, so a port
conflict stops the start at once with the flag named instead of after minutes of loading.

It binds to `--host`, the HTTP host, not `--grpc-host`: /metrics is an HTTP endpoint that Prometheus
scrapes. With the gateway on, the gateway's /metrics already answers on `--host`, so the extra port
opens nothing on an interface that does not already serve those series. With `--no-gateway`, `--host`
is otherwise unused, which keeps the two independent: gRPC can stay on 127.0.0.1 behind an Envoy or
mesh sidecar while Prometheus scrapes the pod address. Plain HTTP even with `--ssl-certfile`: it is an
opt-in, in-cluster scrape target that carries no request data (the gateway's /metrics follows
--ssl-certfile for those who want HTTPS).
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

log = logging.getLogger(__name__)

# Scrapes come every 10-60 s; an idle scrape connection is closed long before that matters.
_KEEPALIVE_S = 75.0


class MetricsPortError(OSError):
    """The metrics port could not be bound (taken by another process, or not ours to use)."""


def default_render() -> bytes:
    """The process-wide default registry: every lateserve_* server series, process and GC collectors."""
    return generate_latest(REGISTRY)


async def start_metrics_server(
    host: str, port: int, render: Callable[[], bytes] = default_render
) -> tuple[web.AppRunner, int]:
    """Serves GET /metrics (and HEAD) on host:port on the running loop; returns the runner (stop it with
    `await runner.cleanup()`) and the bound port (port 0 picks a free one).

    `render` runs on a worker thread per scrape. Raises MetricsPortError, with the flag and the reason,
    when the port cannot be bound.
    """

    async def metrics(request: web.Request) -> web.Response:
        body = await asyncio.to_thread(render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=_KEEPALIVE_S, handle_signals=False)
    await runner.setup()
    # reuse_port stays off: a port already in use (by us or anyone) must fail here, not be shared.
    site = web.TCPSite(runner, host, port, reuse_port=False)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise MetricsPortError(f"--metrics-port {port} on {host}: {reason}") from exc
    addresses = runner.addresses
    bound = int(addresses[0][1]) if addresses else port
    log.info("Prometheus /metrics on %s:%d", host, bound)
    return runner, bound
