"""The worker process's main: apply the environment, import torch, load the replica, serve batches.

Runs in a spawned process. Environment (thread counts, CUDA_VISIBLE_DEVICES) is set before torch
is imported so each replica gets its own cores or GPU.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
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


def child_main(conn: Connection, spec: WorkerSpec) -> None:
    """Entry point of a worker process (target of multiprocessing.Process)."""
    _apply_environment(spec)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker{spec.worker_id} %(levelname)s %(message)s")
    try:
        import torch

        torch.set_num_threads(max(1, spec.threads))
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
                try:
                    outputs = runner.forward(msg.unpack())
                    packed = BatchResult.pack_outputs(outputs)
                    conn.send(BatchResult(msg.batch_id, packed, time.perf_counter_ns() - start))
                except Exception as exc:
                    log.error("batch %d failed: %s", msg.batch_id, traceback.format_exc())
                    conn.send(BatchFailed(msg.batch_id, f"{type(exc).__name__}: {exc}"))
