"""A real lateserve server (gRPC + gateway + worker processes) on 127.0.0.1, run in a background
thread with its own event loop so tests can use blocking clients against it."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

from lateserve.server.app import Server
from lateserve.server.config import ServerConfig
from tests.deploy.helpers import scrape as scrape_url


class LiveServer:
    """Starts `Server(config)` on ephemeral ports; `grpc_target` and `http_url` say where."""

    def __init__(self, config: ServerConfig) -> None:
        # Tests compare against float32 references: `auto` would pick bfloat16 on CPUs with native bf16.
        dtype = "float32" if config.dtype in ("auto", "") else config.dtype
        self.config = replace(config, host="127.0.0.1", port=0, grpc_host="127.0.0.1", grpc_port=0, dtype=dtype)
        self.loop = asyncio.new_event_loop()
        self.server = Server(self.config)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="live-server")

    def __enter__(self) -> LiveServer:
        self._thread.start()
        self.call(self.server.start(), timeout=300)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self.server.stop(1.0), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)

    def call(self, coro: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the server's loop and wait for it."""
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    def worker_pids(self) -> list[int]:
        assert self.server.pool is not None
        return [w.pid for w in self.server.pool.workers() if w.pid is not None]


class Reply:
    """An HTTP answer: status, headers and the raw body (any status, errors included)."""

    def __init__(self, status: int, headers: Any, raw: bytes) -> None:
        self.status = status
        self.headers = headers
        self.raw = raw

    def json(self) -> Any:
        return json.loads(self.raw)


def call(server: LiveServer, path: str, body: Any = None, *, method: str | None = None, **headers: str) -> Reply:
    """One HTTP request to the server (POST with a JSON body when given, else GET); `x_request_id="a"` sends
    the header `x-request-id: a`."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.http_url + path, data=data, method=method or ("POST" if data else "GET"))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    for key, value in headers.items():
        request.add_header(key.replace("_", "-"), value)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return Reply(response.status, response.headers, response.read())
    except urllib.error.HTTPError as error:
        return Reply(error.code, error.headers, error.read())


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(server: LiveServer) -> Samples:
    """Every sample of the server's /metrics, keyed by (name, sorted labels)."""
    return scrape_url(server.http_url + "/metrics", 30.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    """How much one sample moved between two scrapes."""
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)
