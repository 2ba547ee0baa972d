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
MMAP_THRESHOLD_BYTES = 1 << 20


def _bound_heap() -> None:
    """Allocations of 1 MiB and more (activations, batch tensors) get their own mmap, returned to the OS
    when freed. glibc's default threshold starts at 128 KiB but rises after each large free up to 32 MiB, so
    under batches of varied shapes the activations end up in the heap and fragment it: measured on the
    bundled model (docs/hardening.md), worker RSS went 445 -> 900 MB under 768 varied /rerank requests, and
    ~610 MB with this plus `HeapTrimmer`. An explicit MALLOC_MMAP_THRESHOLD_ in the environment wins."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


class HeapTrimmer:
    """Returns freed heap to the OS after batches (glibc malloc_trim), at most every `interval_s`.

    Batches of varied shapes leave freed activations in glibc's heap, which the process keeps; trimming
    after a batch once a second costs well under a millisecond per batch on average."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._last = 0.0
        self._trim: Callable[[int], int] | None = None
        if os.environ.get("LATESERVE_WORKER_MALLOC_TRIM", "1") != "0":
            try:
                self._trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
            except (OSError, AttributeError):
                self._trim = None

    def after_batch(self) -> None:
        now = time.monotonic()
        if self._trim is not None and now - self._last >= self.interval_s:
            self._last = now
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
