"""A worker killed with SIGKILL: its in-flight requests fail fast with UNAVAILABLE, never hang;
the pool starts a replacement and later requests succeed."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from lateserve.server.config import ServerConfig
from lateserve.v1 import common_pb2 as c
from lateserve.v1 import pool_service_pb2, pool_service_pb2_grpc
from tests.live import LiveServer


@pytest.fixture()
def crash_server() -> Iterator[LiveServer]:
    # The real MiniLM, so the in-flight request runs for seconds and the kill lands mid-batch.
    with LiveServer(ServerConfig(workers=1, threads_per_worker=1)) as live:
        yield live


def test_killed_worker_fails_in_flight_fast_and_recovers(crash_server: LiveServer) -> None:
    long_inputs = [c.Input(text="machine learning is fun " * 100) for _ in range(32)]
    request = pool_service_pb2.PoolRequest(inputs=long_inputs)
    (pid,) = crash_server.worker_pids()
    outcome: dict[str, object] = {}

    def call() -> None:
        with grpc.insecure_channel(crash_server.grpc_target) as channel:
            stub = pool_service_pb2_grpc.PoolServiceStub(channel)
            start = time.monotonic()
            try:
                stub.Pool(request, timeout=60)
                outcome["code"] = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                outcome["code"] = exc.code()
            outcome["elapsed"] = time.monotonic() - start

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(1.0)  # the request is now queued or running on the worker
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    caller.join(timeout=30)
    assert not caller.is_alive(), "the in-flight request hung after its worker died"
    if outcome["code"] == grpc.StatusCode.OK:
        pytest.skip("the request finished before the kill landed")  # 64x500 tokens on 1 thread: unlikely
    assert outcome["code"] == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - killed_at < 5
    deadline = time.monotonic() + 60
    with grpc.insecure_channel(crash_server.grpc_target) as channel:
        stub = pool_service_pb2_grpc.PoolServiceStub(channel)
        while True:
            try:
                resp = stub.Pool(pool_service_pb2.PoolRequest(inputs=[c.Input(text="hello")]), timeout=30)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() < deadline, "no replacement worker within 60 s"
                time.sleep(0.2)
    assert len(resp.outputs) == 1
    (new_pid,) = crash_server.worker_pids()
    assert new_pid != pid
