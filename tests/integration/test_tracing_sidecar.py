"""OpenTelemetry traces over OTLP/gRPC (the exporter both --otlp-traces-endpoint flags use by default) and the
sidecar gateway's own spans (issue 11), against a collector this test runs: a real gRPC TraceService on
127.0.0.1 (opentelemetry-proto's servicer), fed by the real exporters of a live server and of a
`lateserve-gateway` sidecar in front of it.

Checked: one trace from the caller's traceparent through the sidecar's "POST /rerank" SERVER span (route,
path, method, status, request id) to the server's Rerank span and its prepare / queue / forward stages; a
4xx is recorded but not an error; without the flag the sidecar has no tracer and passes the caller's
traceparent on as before, and importing the gateway loads no opentelemetry."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from lateserve.gateway.app import start_gateway
from lateserve.gateway.cli import build_parser, config_from_args
from lateserve.gateway.config import GatewayConfig
from lateserve.gateway.keys import TRACER
from lateserve.server import tracing
from lateserve.server.config import ServerConfig
from tests.live import LiveServer

pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
RERANK = {"query": "What is machine learning?", "documents": ["Machine learning is AI.", "The weather is sunny."]}


class GrpcCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: every span of every export, with its resource's service.name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Any]] = []
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self.lock:
            for resource in request.resource_spans:
                service = next(
                    (a.value.string_value for a in resource.resource.attributes if a.key == "service.name"), ""
                )
                for scope in resource.scope_spans:
                    self.spans.extend((service, span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def of_trace(self, trace_id: str) -> list[tuple[str, Any]]:
        with self.lock:
            return [(service, s) for service, s in self.spans if s.trace_id.hex() == trace_id]


def attrs(span: Any) -> dict[str, Any]:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in span.attributes}


@pytest.fixture(scope="module")
def collector() -> Iterator[GrpcCollector]:
    c = GrpcCollector()
    yield c
    c.server.stop(None)


@pytest.fixture(scope="module")
def server(colbert_dir: Path, collector: GrpcCollector) -> Iterator[LiveServer]:
    with pytest.MonkeyPatch.context() as mp:  # the default protocol, gRPC, whatever the environment says
        mp.delenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", raising=False)
        mp.delenv("OTEL_EXPORTER_OTLP_PROTOCOL", raising=False)
        config = ServerConfig(
            model=str(colbert_dir),
            workers=1,
            threads_per_worker=1,
            max_model_len=64,
            otlp_traces_endpoint=collector.endpoint,
        )
        with LiveServer(config) as live:
            yield live


def post(url: str, body: Any, **headers: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    for key, value in headers.items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_sidecar_span_is_the_parent_of_the_server_span(server: LiveServer, collector: GrpcCollector) -> None:
    argv = ["--grpc-target", server.grpc_target, "--host", "127.0.0.1", "--port", "0"]
    config = config_from_args(build_parser().parse_args([*argv, "--otlp-traces-endpoint", collector.endpoint]))
    assert config.otlp_traces_endpoint == collector.endpoint
    runner = server.call(start_gateway(config))
    try:
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        status, body = post(
            base + "/rerank", RERANK, traceparent=f"00-{TRACE_ID}-{CALLER_SPAN}-01", **{"x-request-id": "side-1"}
        )
        assert status == 200, body
        bad_trace = "1af7651916cd43dd8448eb211c80319c"
        status, _ = post(base + "/rerank", {"query": "q"}, traceparent=f"00-{bad_trace}-{CALLER_SPAN}-01")
        assert status == 400
        runner.app[TRACER].force_flush()
    finally:
        server.call(runner.cleanup())  # flushes and stops the sidecar's exporter
    tracing.force_flush()

    spans = collector.of_trace(TRACE_ID)
    (gateway,) = [s for service, s in spans if service == "lateserve-gateway"]
    assert gateway.name == "POST /rerank" and gateway.kind == gateway.SPAN_KIND_SERVER
    assert gateway.parent_span_id.hex() == CALLER_SPAN  # the caller's traceparent is the parent
    assert attrs(gateway) == {
        "http.request.method": "POST",
        "http.route": "/rerank",
        "url.path": "/rerank",
        "http.response.status_code": 200,
        "lateserve.request_id": "side-1",
    }
    (rpc,) = [s for service, s in spans if s.name == "Rerank"]
    assert rpc.parent_span_id == gateway.span_id  # the sidecar's span went on as the gRPC traceparent
    assert attrs(rpc)["lateserve.request_id"] == "side-1"
    assert gateway.start_time_unix_nano <= rpc.start_time_unix_nano <= rpc.end_time_unix_nano
    assert rpc.end_time_unix_nano <= gateway.end_time_unix_nano
    stages = {s.name for _, s in spans if s.parent_span_id == rpc.span_id}
    assert stages == {"prepare", "queue", "forward"}
    (refused,) = [s for service, s in collector.of_trace(bad_trace) if service == "lateserve-gateway"]
    assert attrs(refused)["http.response.status_code"] == 400
    assert refused.status.code != refused.status.STATUS_CODE_ERROR  # the caller's mistake, not the gateway's


def test_server_exports_over_otlp_grpc(server: LiveServer, collector: GrpcCollector) -> None:
    trace_id = "2af7651916cd43dd8448eb211c80319c"
    status, _ = post(server.http_url + "/rerank", RERANK, traceparent=f"00-{trace_id}-{CALLER_SPAN}-01")
    assert status == 200
    tracing.force_flush()
    spans = [s for service, s in collector.of_trace(trace_id)]
    (rpc,) = [s for s in spans if s.name == "Rerank"]
    assert rpc.parent_span_id.hex() == CALLER_SPAN  # the in-process gateway adds no span of its own
    assert {s.name for s in spans} == {"Rerank", "prepare", "queue", "forward"}


def test_without_the_flag_the_sidecar_passes_the_callers_traceparent(
    server: LiveServer, collector: GrpcCollector
) -> None:
    runner = server.call(start_gateway(GatewayConfig(grpc_target=server.grpc_target, host="127.0.0.1", port=0)))
    trace_id = "3af7651916cd43dd8448eb211c80319c"
    try:
        assert TRACER not in runner.app
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        status, _ = post(base + "/rerank", RERANK, traceparent=f"00-{trace_id}-{CALLER_SPAN}-01")
        assert status == 200
    finally:
        server.call(runner.cleanup())
    tracing.force_flush()
    spans = collector.of_trace(trace_id)
    assert [s.name for service, s in spans if service == "lateserve-gateway"] == []
    (rpc,) = [s for _, s in spans if s.name == "Rerank"]
    assert rpc.parent_span_id.hex() == CALLER_SPAN


def test_the_gateway_loads_no_opentelemetry_without_the_flag() -> None:
    code = (
        "import sys\n"
        "from lateserve.gateway import app, cli, tracing\n"
        "app.create_app(cli.config_from_args(cli.build_parser().parse_args(['--grpc-target', 'x:1'])))\n"
        "loaded = [m for m in sys.modules if m.startswith('opentelemetry')]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_lateserve_gateway_command_passes_the_flag_on(server: LiveServer, collector: GrpcCollector) -> None:
    # `lateserve gateway` (the server's CLI) hands its flags to lateserve-gateway: a real process, its port read
    # from its "gateway listening" log line, its spans flushed by SIGTERM's cleanup.
    argv = [sys.executable, "-m", "lateserve.server", "gateway", "--grpc-target", server.grpc_target]
    argv += ["--host", "127.0.0.1", "--port", "0", "--otlp-traces-endpoint", collector.endpoint]
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    trace_id = "4af7651916cd43dd8448eb211c80319c"
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if "gateway listening" in line:
                port = int(re.findall(r"'127\.0\.0\.1', (\d+)", line)[0])
                break
        else:
            pytest.fail("lateserve gateway exited without listening")
        status, _ = post(f"http://127.0.0.1:{port}/rerank", RERANK, traceparent=f"00-{trace_id}-{CALLER_SPAN}-01")
        assert status == 200
    finally:
        process.terminate()
        process.wait(timeout=60)
    tracing.force_flush()
    names = {(service, s.name) for service, s in collector.of_trace(trace_id)}
    assert ("lateserve-gateway", "POST /rerank") in names and ("lateserve", "Rerank") in names
