"""The worker process's main: apply the environment, import torch, load the replica, serve batches.

Runs in a spawned process. Environment (thread counts, CUDA_VISIBLE_DEVICES) is set before torch
is imported so each replica gets its own cores or GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection

from lateserve.server.workers.messages import (
    BatchFailed,
    BatchResult,
    EncodeBatch,
    LoadFailed,
    Ping,
    Pong,
    WorkerReady,
    WorkerSpec,
)

log = logging.getLogger(__name__)


def _apply_environment(spec: WorkerSpec) -> None:
    threads = str(max(1, spec.threads))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = threads
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if spec.cuda_device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(spec.cuda_device)


# glibc's mallopt parameter for the mmap threshold; setting it also turns off the dynamic threshold.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 64 << 20


def _bound_heap() -> None:
    """Fix glibc's mmap threshold at 64 MiB: allocations under it (every activation of a text batch or of a
    page image) come from the heap and are reused batch after batch; bigger ones get their own mmap.

    Why fixed: glibc's default starts at 128 KiB and rises after each large free (up to 32 MiB), so where
    activations land depends on history, and under batches of varied shapes the heap fragments. Why not
    small: at 1 MiB (this project's earlier setting) every large activation was a fresh mmap, page-faulted and
    zeroed on each use: a Qwen3-VL page forward took 147k minor faults and 28-40 % longer (0.65 vs 0.51 s
    float32, 0.42 vs 0.30 s bf16, two threads), and a 90 s /rerank soak of the bundled model served 1439
    requests against 2052 at 64 MiB. The heap this keeps is given back by `HeapTrimmer`; worker RSS under that
    soak peaked at 1.1 GB (0.8 GB at 1 MiB) and was 0.79 GB after it (0.72 GB) (docs/hardening.md).
    An explicit MALLOC_MMAP_THRESHOLD_ in the environment wins."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


class HeapTrimmer:
    """Returns freed heap to the OS (glibc malloc_trim) after batches, at most every `interval_s`, and once
    more when the worker pauses for `interval_s` (so a burst's last batches are given back too).

    Batches of varied shapes leave freed activations in glibc's heap, which the process keeps; a trim costs
    the next batch the page faults of the memory it returned, so it is rate-limited rather than per batch.
    `LATESERVE_WORKER_MALLOC_TRIM=0` turns it off (for measurements)."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._last = 0.0
        self._dirty = False
        self._trim: Callable[[int], int] | None = None
        if os.environ.get("LATESERVE_WORKER_MALLOC_TRIM", "1") != "0":
            try:
                self._trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
            except (OSError, AttributeError):
                self._trim = None

    @property
    def pending(self) -> bool:
        """A batch ran since the last trim: trim when the worker pauses."""
        return self._dirty and self._trim is not None

    def after_batch(self) -> None:
        self._dirty = True
        if time.monotonic() - self._last >= self.interval_s:
            self.trim()

    def trim(self) -> None:
        if self._trim is not None:
            self._last = time.monotonic()
            self._dirty = False
            self._trim(0)


def child_main(conn: Connection, spec: WorkerSpec) -> None:
    """Entry point of a worker process (target of multiprocessing.Process)."""
    _apply_environment(spec)
    _bound_heap()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker{spec.worker_id} %(levelname)s %(message)s")
    try:
        import torch

        own_threads = max(1, spec.threads)
        torch.set_num_threads(own_threads)
        from lateserve.server.families.registry import family_for, load_source

        source = load_source(
            spec.model,
            hf_overrides=spec.hf_overrides,
            trust_remote_code=spec.trust_remote_code,
            max_model_len=spec.max_model_len,
        )
        device = "cuda" if spec.device == "cuda" else "cpu"
        runner = family_for(source).runner(device, spec.dtype)
        runner.warmup()
    except Exception as exc:
        conn.send(LoadFailed(f"{type(exc).__name__}: {exc}"))
        return
    conn.send(WorkerReady(pid=os.getpid(), device=device, dtype=spec.dtype))
    trimmer = HeapTrimmer()
    with torch.inference_mode():
        while True:
            try:
                if trimmer.pending and not conn.poll(trimmer.interval_s):
                    trimmer.trim()  # a pause: give the batches' freed heap back
                msg = conn.recv()
            except (EOFError, OSError):
                return  # the parent is gone: die with it
            if msg is None:
                return
            if isinstance(msg, Ping):
                torch.zeros(1, device=device).add_(1)
                conn.send(Pong(msg.nonce))
                continue
            if isinstance(msg, EncodeBatch):
                start = time.perf_counter_ns()
                threads = msg.threads or own_threads
                if device == "cpu" and torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)  # lent cores come and go batch by batch
                try:
                    outputs = runner.forward(msg.unpack())
                    packed = BatchResult.pack_outputs(outputs)
                    used = torch.get_num_threads() if device == "cpu" else 1
                    conn.send(BatchResult(msg.batch_id, packed, time.perf_counter_ns() - start, used))
                except Exception as exc:
                    log.error("batch %d failed: %s", msg.batch_id, traceback.format_exc())
                    conn.send(BatchFailed(msg.batch_id, f"{type(exc).__name__}: {exc}"))
                trimmer.after_batch()
