"""WorkerPool: starts the replicas, tracks readiness, replaces the ones that die.

Readiness changes are reported through `on_change(ready_count)` so health and the batcher can
react; a replacement is started after a short back-off that grows while replicas keep dying.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from lateserve.server.domain import ModelLoadError
from lateserve.server.workers.messages import WorkerSpec
from lateserve.server.workers.process import ProcessWorker

log = logging.getLogger(__name__)


class WorkerPool:
    """A fixed number of replica slots, each filled by a live ProcessWorker when possible."""

    def __init__(
        self,
        specs: list[WorkerSpec],
        *,
        max_inflight_per_worker: int = 2,
        load_timeout_s: float = 600.0,
        heartbeat_s: float = 5.0,
    ) -> None:
        self._specs = specs
        self._max_inflight = max_inflight_per_worker
        self._load_timeout_s = load_timeout_s
        self._workers: dict[int, ProcessWorker] = {}
        self._ready: set[int] = set()
        self._listeners: list[Callable[[int], None]] = []
        self._restarts: dict[int, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._heartbeat_s = heartbeat_s
        self._watchdog: asyncio.Task[None] | None = None
        self._lent: set[int] = set()  # idle workers whose cores a borrowing worker computes with
        self._borrowing: set[int] = set()

    @property
    def size(self) -> int:
        return len(self._specs)

    @property
    def ready_count(self) -> int:
        return len(self._ready)

    @property
    def idle_count(self) -> int:
        """Ready workers with nothing in flight: how many ways queued work can be split right now."""
        return len(self._idle())

    def _idle(self) -> list[int]:
        return [
            wid
            for wid in self._ready
            if self._workers[wid].alive and not self._workers[wid].inflight and wid not in self._lent
        ]

    def lend_idle(self, borrower: ProcessWorker) -> list[ProcessWorker]:
        """Lend every other idle CPU worker's cores to `borrower` for one batch: the lenders take no work
        and the borrower no prefetch until `return_lent` (so no core runs two forwards at once)."""
        lenders = [self._workers[wid] for wid in self._idle() if wid != borrower.spec.worker_id]
        if lenders:
            self._lent.update(w.spec.worker_id for w in lenders)
            self._borrowing.add(borrower.spec.worker_id)
        return lenders

    def return_lent(self, borrower: ProcessWorker, lenders: list[ProcessWorker]) -> None:
        """The borrower's batch is over (done, failed or its process died): the lenders take work again."""
        if not lenders:
            return
        self._lent.difference_update(w.spec.worker_id for w in lenders)
        self._borrowing.discard(borrower.spec.worker_id)
        self.notify()

    def workers(self) -> list[ProcessWorker]:
        """Live workers (tests use their pids)."""
        return [w for w in self._workers.values() if w.alive]

    def add_listener(self, listener: Callable[[int], None]) -> None:
        """Called with the ready count whenever it changes (or capacity frees up)."""
        self._listeners.append(listener)

    def notify(self) -> None:
        for listener in self._listeners:
            listener(len(self._ready))

    async def start(self) -> None:
        """Start every replica and wait until all are ready; a load failure aborts startup."""
        workers = [self._launch(spec) for spec in self._specs]
        try:
            await asyncio.gather(*(w.wait_ready(self._load_timeout_s) for w in workers))
        except (RuntimeError, TimeoutError) as exc:
            await self.stop()
            raise ModelLoadError(f"model failed to load in a worker: {exc}") from exc
        for w in workers:
            self._ready.add(w.spec.worker_id)
        self.notify()
        self._watchdog = asyncio.get_running_loop().create_task(self._watch(), name="lateserve-watchdog")

    async def _watch(self) -> None:
        """Finds frozen or wedged workers: a batch past its cost-derived deadline, or an idle worker that
        does not answer a ping within the heartbeat. Such a worker is killed: its requests fail at once
        with UNAVAILABLE (retry hint) and the usual replacement starts; health follows the ready count."""
        interval = max(0.05, self._heartbeat_s / 4)
        while not self._closing:
            await asyncio.sleep(interval)
            now = asyncio.get_running_loop().time()
            for worker in list(self._workers.values()):
                if not worker.alive or worker.spec.worker_id not in self._ready:
                    continue
                why = worker.overdue(now, self._heartbeat_s)
                if why is not None:
                    self._ready.discard(worker.spec.worker_id)
                    self.notify()
                    worker.replace_frozen(why)
                elif not worker.inflight and now - worker.last_heard > self._heartbeat_s:
                    worker.ping()

    def acquire(self) -> ProcessWorker | None:
        """The ready worker with the fewest batches in flight, if one has room."""
        best: ProcessWorker | None = None
        for wid in self._ready:
            w = self._workers[wid]
            if wid in self._lent or wid in self._borrowing:
                continue
            if w.alive and w.inflight < self._max_inflight and (best is None or w.inflight < best.inflight):
                best = w
        return best

    async def stop(self, grace_s: float = 5.0) -> None:
        self._closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        for task in self._tasks:
            task.cancel()
        workers = list(self._workers.values())
        for w in workers:
            w.stop()
        deadline = asyncio.get_running_loop().time() + grace_s
        while any(w.alive for w in workers) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for w in workers:
            w.kill()
        self._ready.clear()

    def _launch(self, spec: WorkerSpec) -> ProcessWorker:
        worker = ProcessWorker(spec, self._on_exit)
        self._workers[spec.worker_id] = worker
        worker.start()
        return worker

    def _on_exit(self, worker: ProcessWorker) -> None:
        wid = worker.spec.worker_id
        self._ready.discard(wid)
        self.notify()
        if self._closing or worker.stopping:
            return
        task = asyncio.get_running_loop().create_task(self._replace(wid))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _replace(self, wid: int) -> None:
        attempt = self._restarts.get(wid, 0)
        self._restarts[wid] = attempt + 1
        await asyncio.sleep(min(0.2 * (2**attempt), 30.0))
        if self._closing:
            return
        spec = next(s for s in self._specs if s.worker_id == wid)
        log.info("starting replacement for worker %d", wid)
        worker = self._launch(spec)
        try:
            await worker.wait_ready(self._load_timeout_s)
        except (RuntimeError, TimeoutError) as exc:
            log.error("replacement worker %d failed: %s", wid, exc)
            worker.kill()
            return  # its exit callback schedules the next attempt
        self._restarts[wid] = 0
        if worker.alive and not self._closing:
            self._ready.add(wid)
            self.notify()
