"""ProcessWorker: the parent's handle on one worker process.

A reader thread blocks on the pipe and hands every message to the event loop. When the pipe
breaks (the child died, e.g. kill -9), every batch in flight fails at once with
WorkerUnavailable, so no request waits on a dead process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing as mp
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

from lateserve.server.domain import WorkerUnavailable, WorkItem
from lateserve.server.workers.child import child_main
from lateserve.server.workers.messages import (
    BatchFailed,
    BatchResult,
    ChildMessage,
    EncodeBatch,
    LoadFailed,
    Ping,
    Pong,
    WorkerReady,
    WorkerSpec,
)

log = logging.getLogger(__name__)
_batch_ids = itertools.count(1)


class ProcessWorker:
    """One replica in a spawned process. Not thread-safe: use it from the event loop only."""

    def __init__(self, spec: WorkerSpec, on_exit: Callable[[ProcessWorker], None]) -> None:
        self.spec = spec
        self._on_exit = on_exit
        self._loop = asyncio.get_running_loop()
        self._pending: dict[int, asyncio.Future[BatchResult]] = {}
        self._ready: asyncio.Future[WorkerReady] = self._loop.create_future()
        self._conn: Connection | None = None
        self._process: mp.process.BaseProcess | None = None
        self.alive = False
        self.stopping = False
        self.frozen = False
        # batch id -> loop time by which the child must answer (the batch's cost-derived deadline)
        self._deadlines: dict[int, float] = {}
        self._ping_sent: float | None = None
        self._nonce = 0
        self.last_heard = 0.0

    @property
    def inflight(self) -> int:
        return len(self._pending)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        process = ctx.Process(
            target=child_main, args=(child, self.spec), name=f"lateserve-worker-{self.spec.worker_id}", daemon=True
        )
        process.start()
        child.close()
        self._conn, self._process, self.alive = parent, process, True
        threading.Thread(target=self._read_loop, args=(parent,), daemon=True, name=process.name).start()

    async def wait_ready(self, timeout_s: float) -> WorkerReady:
        """Resolves when the replica is loaded; raises RuntimeError with the child's reason otherwise."""
        return await asyncio.wait_for(asyncio.shield(self._ready), timeout_s)

    def submit(
        self, items: list[WorkItem], timeout_s: float | None = None, threads: int = 0
    ) -> asyncio.Future[BatchResult]:
        """Send a batch; the future fails with WorkerUnavailable if the process dies first, or if it does
        not answer within `timeout_s` (the watchdog then replaces the process: it is frozen or wedged).
        `threads` > 0 runs it with that many CPU threads (cores lent by idle workers)."""
        future: asyncio.Future[BatchResult] = self._loop.create_future()
        if not self.alive or self._conn is None:
            future.set_exception(WorkerUnavailable("worker is not running; retry the request", retry_after_s=1.0))
            return future
        batch_id = next(_batch_ids)
        self._pending[batch_id] = future
        if timeout_s is not None:
            self._deadlines[batch_id] = self._loop.time() + timeout_s
        try:
            self._conn.send(EncodeBatch.pack(batch_id, items, threads))
        except (OSError, ValueError) as exc:
            self._pending.pop(batch_id, None)
            future.set_exception(WorkerUnavailable(f"worker pipe broke: {exc}", retry_after_s=1.0))
        return future

    def overdue(self, now: float, heartbeat_timeout_s: float) -> str | None:
        """Why this worker looks frozen, or None: a batch past its deadline, or an unanswered ping."""
        late = [bid for bid, deadline in self._deadlines.items() if now > deadline]
        if late:
            return f"batch {late[0]} passed its deadline"
        if self._ping_sent is not None and now - self._ping_sent > heartbeat_timeout_s:
            return f"no answer to a ping in {heartbeat_timeout_s:g} s"
        return None

    def ping(self) -> None:
        """Heartbeat while idle (a busy child answers after its batch; the batch deadline covers that)."""
        if self._ping_sent is not None or not self.alive or self._conn is None:
            return
        self._nonce += 1
        try:
            self._conn.send(Ping(self._nonce))
        except (OSError, ValueError):
            return
        self._ping_sent = self._loop.time()

    def replace_frozen(self, why: str) -> None:
        """Kill a frozen process so its batches fail now and the pool starts a replacement."""
        log.error("worker %d (pid %s) is frozen (%s); killing it", self.spec.worker_id, self.pid, why)
        self.frozen = True
        if self._process is not None and self._process.is_alive():
            self._process.kill()

    def kill(self) -> None:
        """Hard stop (used for shutdown and by tests through the pid)."""
        self.stopping = True
        if self._process is not None and self._process.is_alive():
            self._process.kill()

    def stop(self) -> None:
        """Ask the child to exit after its current batch."""
        self.stopping = True
        if self._conn is not None:
            with contextlib.suppress(OSError, ValueError):
                self._conn.send(None)

    def _read_loop(self, conn: Connection) -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            self._loop.call_soon_threadsafe(self._dispatch, msg)
        self._loop.call_soon_threadsafe(self._exited)

    def _dispatch(self, msg: ChildMessage) -> None:
        self.last_heard = self._loop.time()
        if isinstance(msg, BatchResult | BatchFailed):
            self._deadlines.pop(msg.batch_id, None)
        if isinstance(msg, Pong):
            self._ping_sent = None
        elif isinstance(msg, BatchResult):
            fut = self._pending.pop(msg.batch_id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, BatchFailed):
            fut = self._pending.pop(msg.batch_id, None)
            if fut is not None and not fut.done():
                fut.set_exception(RuntimeError(msg.message))
        elif isinstance(msg, WorkerReady):
            if not self._ready.done():
                self._ready.set_result(msg)
        elif isinstance(msg, LoadFailed) and not self._ready.done():
            self._ready.set_exception(RuntimeError(msg.message))

    def _exited(self) -> None:
        if not self.alive:
            return
        self.alive = False
        if self._process is not None:
            self._process.join(timeout=1)
        code = self._process.exitcode if self._process is not None else None
        if not self._ready.done():
            self._ready.set_exception(RuntimeError(f"worker exited during load (exit code {code})"))
        pending, self._pending = self._pending, {}
        self._deadlines.clear()
        why = "froze and was replaced" if self.frozen else "died"
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(
                    WorkerUnavailable(f"the worker running this request {why}; retry the request", retry_after_s=1.0)
                )
        if not self.stopping:
            log.warning("worker %d (pid %s) exited with code %s", self.spec.worker_id, self.pid, code)
        self._on_exit(self)
