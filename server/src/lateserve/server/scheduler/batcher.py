"""The asyncio side of scheduling: enqueue work, cut batches for idle workers, fan results out.

One loop owns the queue. It wakes on new work, on finished batches and on pool changes, and
hands each worker at most `max_inflight_per_worker` batches (one running, one prefetched).
Work whose caller gave up (cancelled future) is dropped at cut time, before any forward pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from lateserve.server import metrics
from lateserve.server.domain import ItemOutputs, LateserveError, WorkerUnavailable, WorkItem
from lateserve.server.scheduler.queue import BatchQueue, Entry, batch_cost
from lateserve.server.workers.messages import BatchResult
from lateserve.server.workers.pool import WorkerPool
from lateserve.server.workers.process import ProcessWorker

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ItemResult:
    """A finished item: its outputs and where its time went."""

    outputs: ItemOutputs
    queue_ns: int
    inference_ns: int


@dataclass(eq=False, slots=True)
class Ticket:
    """A queued item and the future its request awaits."""

    item: WorkItem
    future: asyncio.Future[ItemResult]


class Batcher:
    """Feeds the worker pool from one token-budget queue."""

    def __init__(
        self, pool: WorkerPool, queue: BatchQueue[Ticket], batch_timeout_s: float = 30.0, lend_cores_min_s: float = 0.1
    ) -> None:
        self.pool = pool
        self.queue = queue
        self.batch_timeout_s = batch_timeout_s
        self.lend_cores_min_s = lend_cores_min_s
        self._rate = 0.0  # cost units per second of one worker's forward time, smoothed
        self._busy_until: dict[int, float] = {}  # worker id -> when its dispatched batches should be done
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        pool.add_listener(lambda _ready: self._wake.set())

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="lateserve-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for entry in self.queue.cut_all():
            if not entry.payload.future.done():
                entry.payload.future.set_exception(WorkerUnavailable("the server is shutting down"))

    @property
    def busy(self) -> bool:
        """Work is queued or running."""
        return bool(len(self.queue) or self._running)

    def submit(self, items: list[WorkItem]) -> list[asyncio.Future[ItemResult]]:
        """Queue items; each future resolves with the item's outputs (cancel it to drop the item)."""
        loop = asyncio.get_running_loop()
        now = time.perf_counter_ns()
        futures: list[asyncio.Future[ItemResult]] = []
        for item in items:
            fut: asyncio.Future[ItemResult] = loop.create_future()
            self.queue.push(Entry(Ticket(item, fut), item.sequence.cost, now, fut.done))
            futures.append(fut)
        metrics.QUEUE_SIZE.set(len(self.queue))
        self._wake.set()
        return futures

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while len(self.queue):
                worker = self.pool.acquire()
                if worker is None:
                    break
                # Idle workers share what is waiting (a lone request uses every core); a busy worker's
                # prefetch takes a full batch. Sharing over busy workers too was 7 % slower at c=8.
                batch = self.queue.cut(parts=self.pool.idle_count)
                if not batch:
                    break
                lenders = self._lend_cores(worker, batch)
                own = worker.spec.threads
                threads = own + sum(w.spec.threads for w in lenders)
                # Sent now, not inside the task, so the worker counts as busy before the next cut.
                sent = worker.submit([e.payload.item for e in batch], self.deadline_s(batch), threads if lenders else 0)
                self._book(worker.spec.worker_id, sum(e.num_tokens for e in batch), threads / own)
                task = asyncio.get_running_loop().create_task(self._run(worker, batch, sent, lenders))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            metrics.QUEUE_SIZE.set(len(self.queue))
            metrics.DROPPED.set(self.queue.dropped)

    def _lend_cores(self, worker: ProcessWorker, batch: list[Entry[Ticket]]) -> list[ProcessWorker]:
        """Idle CPU workers lend their cores to a batch that is the last work waiting and long enough to
        gain from more threads (at least `lend_cores_min_s` on one worker at the measured speed): a lone
        image then computes on every core instead of one, as it would in a single multi-threaded process,
        while work that can be split over the workers still is (the cut shares it first).

        Why not always: a short batch gains little from more threads, and new work waits for the borrowed
        cores to come back (at most one such batch, run faster than it would have on one core)."""
        if (
            self.lend_cores_min_s < 0
            or len(self.queue)
            or worker.inflight
            or worker.spec.device != "cpu"
            or self._rate <= 0
            or sum(e.num_tokens for e in batch) / self._rate < self.lend_cores_min_s
        ):
            return []
        return self.pool.lend_idle(worker)

    def _observe(self, cost: int, inference_ns: int) -> None:
        if cost <= 0 or inference_ns <= 0:
            return
        rate = cost / (inference_ns / 1e9)
        self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate

    def _book(self, worker_id: int, cost: int, speedup: float = 1.0) -> None:
        """Extend the worker's expected busy time by a dispatched batch (once a speed is measured);
        `speedup` > 1 when it computes with lent cores."""
        if self._rate <= 0:
            return
        now = time.monotonic()
        self._busy_until[worker_id] = max(now, self._busy_until.get(worker_id, now)) + cost / (self._rate * speedup)

    def expected_wait_s(self) -> float | None:
        """Seconds new work would wait before a worker starts it: the soonest-free worker's remaining
        dispatched work plus the waiting queue spread over the ready workers, at the measured speed.
        None until a batch has been measured (no guess before the first number)."""
        if self._rate <= 0:
            return None
        now = time.monotonic()
        ready = [w.spec.worker_id for w in self.pool.workers()]
        soonest = min((max(0.0, self._busy_until.get(wid, now) - now) for wid in ready), default=0.0)
        return soonest + self.queue.queued_tokens / (self._rate * max(1, len(ready)))

    def deadline_s(self, batch: list[Entry[Ticket]]) -> float:
        """How long a worker may take for a batch before it counts as frozen: ten times what the batch
        should take at the measured speed, never under --worker-batch-timeout; five times the timeout
        until a batch has been measured (a big model on a slow CPU must not be taken for a frozen one).
        Doubled because a prefetched batch waits for the one running before it."""
        cost = sum(e.num_tokens for e in batch)
        if self._rate <= 0:
            return 2 * 5 * self.batch_timeout_s
        return 2 * max(self.batch_timeout_s, 10 * cost / self._rate)

    async def _run(
        self,
        worker: ProcessWorker,
        batch: list[Entry[Ticket]],
        sent: asyncio.Future[BatchResult],
        lenders: list[ProcessWorker],
    ) -> None:
        start = time.perf_counter_ns()
        self._record_batch(batch)
        metrics.WORKER_BATCHES.labels(str(worker.spec.worker_id)).inc()
        try:
            result: BatchResult = await sent
        except LateserveError as exc:
            self._fail(batch, exc)
            return
        except Exception as exc:
            log.error("batch failed on worker %d: %s", worker.spec.worker_id, exc)
            self._fail(batch, exc)
            return
        finally:
            self.pool.return_lent(worker, lenders)
            self._wake.set()
            if not worker.inflight:
                self._busy_until[worker.spec.worker_id] = time.monotonic()
        # The speed is kept per own core: a batch on lent cores counts as that many times its wall time.
        own = max(1, worker.spec.threads)
        if result.threads > own:
            metrics.LENT_CORE_BATCHES.inc()
        self._observe(sum(e.num_tokens for e in batch), result.inference_ns * max(own, result.threads) // own)
        metrics.FORWARD_SECONDS.observe(result.inference_ns / 1e9)
        outputs = result.unpack_outputs()
        for entry, out in zip(batch, outputs, strict=True):
            fut = entry.payload.future
            if not fut.done():
                fut.set_result(ItemResult(out, start - entry.enqueued_ns, result.inference_ns))

    def _record_batch(self, batch: list[Entry[Ticket]]) -> None:
        """Size, tokens, fill (cost over the batch budget, as the queue counts cost) and, for a padded
        backend, the padding the batch carries."""
        lengths = [e.num_tokens for e in batch]
        tokens = sum(lengths)
        cost = batch_cost(lengths, self.queue.cost_model)
        metrics.BATCH_TOKENS.observe(tokens)
        metrics.BATCH_SIZE.observe(len(batch))
        metrics.BATCH_FILL.observe(cost / max(1, self.queue.max_batch_tokens))
        if self.queue.cost_model == "padded":
            metrics.PADDED_TOKENS.inc(cost)
            metrics.PADDING_TOKENS.inc(cost - tokens)

    @staticmethod
    def _fail(batch: list[Entry[Ticket]], exc: BaseException) -> None:
        for entry in batch:
            if not entry.payload.future.done():
                entry.payload.future.set_exception(exc)
