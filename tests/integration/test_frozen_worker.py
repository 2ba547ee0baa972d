"""A frozen worker (SIGSTOP) is found and replaced: requests on it fail with UNAVAILABLE and a retry
hint instead of hanging, health reports NOT_SERVING while no worker can serve, and a replacement serves
the next request."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from lateserve.server.config import ServerConfig
from lateserve.v1 import common_pb2 as c
from lateserve.v1 import pool_service_pb2, pool_service_pb2_grpc
from lateserve.wire.status import unpack_details
from tests.live import LiveServer


@pytest.fixture()
def server(colbert_dir: Path) -> Iterator[LiveServer]:
    config = ServerConfig(
        model=str(colbert_dir),
        workers=1,
        threads_per_worker=1,
        max_model_len=64,
        worker_batch_timeout=1.0,
        worker_heartbeat=1.0,
    )
    with LiveServer(config) as live:
        yield live


def pool_once(target: str, timeout: float = 60) -> pool_service_pb2.PoolResponse:
    with grpc.insecure_channel(target) as channel:
        return pool_service_pb2_grpc.PoolServiceStub(channel).Pool(
            pool_service_pb2.PoolRequest(inputs=[c.Input(text="machine learning")]), timeout=timeout
        )


def health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return int(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status)


def test_a_stopped_worker_busy_with_a_request_is_replaced(server: LiveServer) -> None:
    (pid,) = server.worker_pids()
    os.kill(pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            pool_once(server.grpc_target)
        waited = time.monotonic() - start
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    err = info.value
    details = unpack_details(err.code(), err.details() or "", rpc_status.from_call(err))  # type: ignore[arg-type]
    assert details.code == grpc.StatusCode.UNAVAILABLE and details.retry_after_s is not None
    assert "froze" in details.message
    assert waited < 30  # bounded by the batch deadline, not by the 60 s client timeout
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (server.worker_pids() and server.worker_pids()[0] != pid):
        time.sleep(0.2)
    new_pids = server.worker_pids()
    assert new_pids and new_pids[0] != pid
    while time.monotonic() < deadline and health(server.grpc_target) != health_pb2.HealthCheckResponse.SERVING:
        time.sleep(0.2)
    assert len(pool_once(server.grpc_target).outputs) == 1


def test_a_stopped_idle_worker_is_found_by_the_heartbeat(server: LiveServer) -> None:
    (pid,) = server.worker_pids()
    seen_not_serving = threading.Event()
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if health(server.grpc_target) == health_pb2.HealthCheckResponse.NOT_SERVING:
                seen_not_serving.set()
                break
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert seen_not_serving.is_set(), "health stayed SERVING while the only worker was frozen"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and health(server.grpc_target) != health_pb2.HealthCheckResponse.SERVING:
        time.sleep(0.2)
    assert server.worker_pids()[0] != pid
    assert len(pool_once(server.grpc_target).outputs) == 1
