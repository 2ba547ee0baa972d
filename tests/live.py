"""A real lateserve server (gRPC + gateway + worker processes) on 127.0.0.1, run in a background
thread with its own event loop so tests can use blocking clients against it."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

from lateserve.server.app import Server
from lateserve.server.config import ServerConfig


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
