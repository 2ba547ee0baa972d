"""SIGTERM on a real `lateserve serve` process: new requests are refused, the request in flight
finishes, and the process exits cleanly within the grace period."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lateserve.v1 import common_pb2 as c
from lateserve.v1 import pool_service_pb2, pool_service_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(target: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise AssertionError("server did not become healthy")


def test_sigterm_drains_in_flight_work() -> None:
    grpc_port, http_port = free_port(), free_port()
    target = f"127.0.0.1:{grpc_port}"
    args = ["serve", "--host", "127.0.0.1", "--port", str(http_port), "--grpc-host", "127.0.0.1"]
    args += ["--grpc-port", str(grpc_port), "--workers", "1", "--threads-per-worker", "1"]
    args += ["--shutdown-grace-seconds", "30"]
    proc = subprocess.Popen([sys.executable, "-m", "lateserve.server", *args], stderr=subprocess.PIPE, text=True)
    try:
        wait_serving(target)
        outcome: dict[str, object] = {}

        def heavy() -> None:
            options = [("grpc.max_receive_message_length", 64 << 20)]  # 16 x 402 x 384 floats
            with grpc.insecure_channel(target, options=options) as channel:
                request = pool_service_pb2.PoolRequest(inputs=[c.Input(text="machine learning is fun " * 100)] * 16)
                try:
                    outcome["outputs"] = len(pool_service_pb2_grpc.PoolServiceStub(channel).Pool(request).outputs)
                except grpc.RpcError as exc:
                    outcome["error"] = exc.code()

        caller = threading.Thread(target=heavy)
        caller.start()
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.5)
        with grpc.insecure_channel(target) as channel:
            try:
                pool_service_pb2_grpc.PoolServiceStub(channel).Pool(
                    pool_service_pb2.PoolRequest(inputs=[c.Input(text="late")]), timeout=5
                )
                refused = False
            except grpc.RpcError as exc:
                refused = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert refused, "a new request was accepted after SIGTERM"
        caller.join(timeout=60)
        assert outcome == {"outputs": 16}, outcome
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
