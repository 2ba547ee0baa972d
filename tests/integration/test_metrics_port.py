"""`lateserve serve --metrics-port`: Prometheus /metrics on a port of its own. A gRPC-only server
(--no-gateway, as behind Envoy or a sidecar gateway) answers it with the lateserve_* series, and its
counters move with gRPC calls; with the gateway on it is an extra port answering what the gateway's
/metrics answers. The flag parses through the real CLI, a port that another listener of the server
takes is refused before anything starts, and a port taken by another process stops `lateserve serve`
at once with the flag named (no hang, no traceback). Live servers on 127.0.0.1, tiny HF_ColBERT."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from lateserve.server.cli import build_parser, config_from_args
from lateserve.server.config import ServerConfig
from lateserve.v1 import common_pb2, rerank_service_pb2, rerank_service_pb2_grpc
from tests.deploy.helpers import free_port, metric_sum, scrape
from tests.live import LiveServer

RERANK_OK = {"method": "Rerank", "code": "OK"}


def _config(model: Path, *, gateway: bool = True, metrics_port: int = 0) -> ServerConfig:
    return ServerConfig(
        model=str(model),
        gateway=gateway,
        metrics_port=metrics_port,
        workers=1,
        threads_per_worker=1,
        prepare_threads=1,
        max_model_len=64,
    )


def _rerank(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        reply = rerank_service_pb2_grpc.RerankServiceStub(channel).Rerank(
            rerank_service_pb2.RerankRequest(
                query=common_pb2.Input(text="what is late interaction"),
                documents=[common_pb2.Input(text="token level matching"), common_pb2.Input(text="rain")],
            ),
            timeout=30,
        )
    assert len(reply.results) == 2


def _get(url: str, method: str = "GET") -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read()


@pytest.fixture(scope="module")
def grpc_only(colbert_dir: Path) -> Iterator[LiveServer]:
    with LiveServer(_config(colbert_dir, gateway=False, metrics_port=free_port())) as live:
        yield live


def test_grpc_only_server_serves_metrics_on_its_port(grpc_only: LiveServer) -> None:
    port = grpc_only.server.metrics_port
    assert port == grpc_only.config.metrics_port and grpc_only.server.http_port == 0  # no gateway, no HTTP port
    url = f"http://127.0.0.1:{port}/metrics"
    before = scrape(url)
    assert metric_sum(before, "lateserve_workers_ready") == 1
    assert ("lateserve_queue_size", ()) in before
    # The default registry only: no gateway here, so no lateserve_http_* series.
    assert not any(name.startswith("lateserve_http_") for name, _ in before)

    _rerank(grpc_only.grpc_target)
    _rerank(grpc_only.grpc_target)
    after = scrape(url)
    assert (
        metric_sum(after, "lateserve_grpc_requests_total", **RERANK_OK)
        - metric_sum(before, "lateserve_grpc_requests_total", **RERANK_OK)
        == 2
    )
    assert metric_sum(after, "lateserve_prompt_tokens_total") > metric_sum(before, "lateserve_prompt_tokens_total")

    status, content_type, body = _get(url)
    assert status == 200 and content_type.startswith("text/plain") and b"# TYPE lateserve_queue_size gauge" in body
    assert _get(url, "HEAD")[0] == 200
    assert _get(f"http://127.0.0.1:{port}/rerank")[0] == 404  # a metrics port, nothing else


def test_with_the_gateway_it_is_an_extra_port(colbert_dir: Path) -> None:
    with LiveServer(_config(colbert_dir, metrics_port=free_port())) as live:
        body = json.dumps({"query": "late interaction", "documents": ["token matching", "rain"]}).encode()
        request = urllib.request.Request(
            f"{live.http_url}/rerank", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
        _rerank(live.grpc_target)
        own = scrape(f"http://127.0.0.1:{live.server.metrics_port}/metrics")
        gateway = scrape(f"{live.http_url}/metrics")
        # The same exposition on both ports: the gateway's HTTP series and the server's lateserve_* series.
        assert {name for name, _ in own} == {name for name, _ in gateway}
        assert metric_sum(own, "lateserve_http_requests_total", route="/rerank", status="200") == 1
        for samples in (own, gateway):
            assert metric_sum(samples, "lateserve_grpc_requests_total", **RERANK_OK) >= 1
            assert metric_sum(samples, "lateserve_workers_ready") == 1
    # Stopped with the server.
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{live.server.metrics_port}/metrics", timeout=5)


def test_the_serve_command_takes_the_flag() -> None:
    parser = build_parser()
    assert config_from_args(parser.parse_args(["serve", "m"])).metrics_port == 0  # off by default
    config = config_from_args(parser.parse_args(["serve", "m", "--no-gateway", "--metrics-port", "9400"]))
    assert config.metrics_port == 9400 and not config.gateway
    # Without the gateway the HTTP port is free for it.
    assert config_from_args(parser.parse_args(["serve", "m", "--no-gateway", "--metrics-port", "8000"])).metrics_port
    refused = {
        ("--metrics-port", "8000"): "--metrics-port 8000 is also the HTTP --port",
        ("--port", "9000", "--metrics-port", "9000"): "--metrics-port 9000 is also the HTTP --port",
        ("--no-gateway", "--metrics-port", "50051"): "--metrics-port 50051 is also the --grpc-port",
        ("--metrics-port", "70000"): "--metrics-port 70000: not a port",
    }
    for flags, message in refused.items():
        with pytest.raises(SystemExit) as exc:
            config_from_args(parser.parse_args(["serve", "m", *flags]))
        assert message in str(exc.value), (flags, exc.value)


def test_a_taken_port_stops_the_start_at_once(colbert_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        # The real command line, gateway on: the metrics port is bound first, before the model loads.
        argv = [sys.executable, "-m", "lateserve.server", "serve", str(colbert_dir), "--host", "127.0.0.1",
                "--port", "0", "--grpc-host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", str(port)]  # fmt: skip
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode != 0
    assert f"lateserve: --metrics-port {port} on 127.0.0.1: address already in use" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "ready:" not in proc.stderr
    assert time.monotonic() - started < 60
