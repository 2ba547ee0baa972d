"""Slow clients are cut off (issue 12, item 8): sockets trickling a request head, never-ending chunked
bodies and idle sockets are closed within the head, body and keep-alive timeouts, while normal requests
in parallel keep working; gRPC connections without calls are closed after --grpc-max-connection-idle and
one that never completes the HTTP/2 handshake after the handshake (header) timeout."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from lateserve.server.config import ServerConfig
from lateserve.v1 import common_pb2 as c
from lateserve.v1 import rerank_service_pb2, rerank_service_pb2_grpc
from tests.live import LiveServer

HEAD_S = 1.0
BODY_S = 1.5
KEEPALIVE_S = 3.0
GRPC_IDLE_S = 1.0
SLACK_S = 1.5


@pytest.fixture(scope="module")
def server(colbert_dir: Path) -> Iterator[LiveServer]:
    config = ServerConfig(
        model=str(colbert_dir),
        workers=1,
        threads_per_worker=1,
        max_model_len=64,
        http_header_timeout=HEAD_S,
        http_body_timeout=BODY_S,
        http_keepalive_timeout=KEEPALIVE_S,
        grpc_max_connection_idle=GRPC_IDLE_S,
    )
    with LiveServer(config) as live:
        yield live


class Slow:
    """One hostile socket: what it sends each tick, and when the server closed it."""

    def __init__(self, port: int, first: bytes, drip: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.setblocking(False)
        self.opened = time.monotonic()
        self.closed_after: float | None = None
        self.received = b""
        self.drip = drip
        if first:
            self.sock.send(first)

    def tick(self) -> None:
        if self.closed_after is not None:
            return
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionResetError
                self.received += data
        except BlockingIOError:
            pass
        except OSError:
            self.closed_after = time.monotonic() - self.opened
            self.sock.close()
            return
        if self.drip:
            try:
                self.sock.send(self.drip)
            except BlockingIOError:
                pass
            except OSError:
                self.closed_after = time.monotonic() - self.opened
                self.sock.close()


def normal_requests(server: LiveServer, stop: threading.Event, out: list[tuple[int, float]]) -> None:
    body = json.dumps({"query": "machine learning", "documents": ["ml is ai", "sunny weather"]}).encode()
    while not stop.is_set():
        for path, data in (("/health", None), ("/rerank", body)):
            request = urllib.request.Request(server.http_url + path, data=data, method="POST" if data else "GET")
            request.add_header("Content-Type", "application/json")
            start = time.perf_counter()
            with urllib.request.urlopen(request, timeout=30) as response:
                response.read()
                out.append((response.status, time.perf_counter() - start))
        time.sleep(0.05)


def test_slow_heads_endless_bodies_and_idle_sockets_are_closed(server: LiveServer) -> None:
    port = server.server.http_port
    head = b"POST /rerank HTTP/1.1\r\nHost: x\r\n"
    chunked = (
        b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    trickling = [Slow(port, head, b"X") for _ in range(50)]  # one byte of a header every tick, forever
    endless = [Slow(port, chunked + b"1\r\n{\r\n", b"1\r\n \r\n") for _ in range(20)]  # a body that never ends
    idle = [Slow(port, b"", b"") for _ in range(10)]
    everyone = trickling + endless + idle

    stop = threading.Event()
    normal: list[tuple[int, float]] = []
    worker = threading.Thread(target=normal_requests, args=(server, stop, normal))
    worker.start()
    deadline = time.monotonic() + KEEPALIVE_S + 3 * SLACK_S
    while time.monotonic() < deadline and any(s.closed_after is None for s in everyone):
        for s in everyone:
            s.tick()
        time.sleep(0.1)
    stop.set()
    worker.join(timeout=60)
    for s in everyone:
        if s.closed_after is None:
            s.sock.close()

    def worst(group: list[Slow]) -> float:
        times = [s.closed_after for s in group]
        assert all(t is not None for t in times), f"{sum(t is None for t in times)} of {len(times)} still open"
        return max(t for t in times if t is not None)

    print(
        f"closed after: heads {worst(trickling):.2f} s, bodies {worst(endless):.2f} s, idle {worst(idle):.2f} s; "
        f"{len(normal)} normal requests, slowest {max(t for _, t in normal) * 1e3:.0f} ms"
    )
    # Trickled heads are cut by the head timeout, well before the keep-alive timeout would.
    assert worst(trickling) < HEAD_S + SLACK_S < KEEPALIVE_S
    # Endless bodies get a 408 once the body timeout passed, and the connection is closed.
    assert worst(endless) < BODY_S + SLACK_S
    assert all(s.received.startswith(b"HTTP/1.1 408") for s in endless), endless[0].received[:200]
    # Idle sockets are closed after the keep-alive timeout, not before.
    assert KEEPALIVE_S - 0.5 < worst(idle) < KEEPALIVE_S + SLACK_S
    assert normal and all(status == 200 for status, _ in normal), normal
    # Normal requests were served throughout (at least one round per second of the test).
    assert len(normal) >= 2 * int(KEEPALIVE_S)


def test_kept_alive_connection_serves_many_requests_within_the_keepalive(server: LiveServer) -> None:
    """The head timer starts at a head's first byte: a kept-alive connection that pauses between requests
    (shorter than the keep-alive timeout) keeps working."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=10)
    try:
        for _ in range(3):
            connection.request("GET", "/health")
            response = connection.getresponse()
            response.read()
            assert response.status == 200
            time.sleep(HEAD_S + 0.3)
    finally:
        connection.close()


def grpc_preface_socket(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # preface + SETTINGS
    return sock


def seconds_until_closed(sock: socket.socket, limit: float) -> float | None:
    start = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - start < limit:
        try:
            if not sock.recv(65536):
                return time.monotonic() - start
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - start
    return None


def test_grpc_idle_connections_and_stalled_handshakes_are_closed(server: LiveServer) -> None:
    port = server.server.grpc_port
    with grpc_preface_socket(port) as idle:
        closed = seconds_until_closed(idle, GRPC_IDLE_S + 10)
    assert closed is not None and closed < GRPC_IDLE_S + SLACK_S + 1, closed
    with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
        closed = seconds_until_closed(silent, HEAD_S + 10)
    assert closed is not None and closed < HEAD_S + SLACK_S + 1, closed
    # A channel reconnects transparently after the server closed its idle connection.
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = rerank_service_pb2_grpc.RerankServiceStub(channel)
        request = rerank_service_pb2.RerankRequest(query=c.Input(text="q"), documents=[c.Input(text="d")])
        assert len(stub.Rerank(request, timeout=30).results) == 1
        time.sleep(GRPC_IDLE_S + 1)
        assert len(stub.Rerank(request, timeout=30).results) == 1
