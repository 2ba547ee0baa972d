"""Observability against a live server: per-stage Prometheus metrics, x-request-id in and out over HTTP
and gRPC, per-request timings as x-lateserve-* headers and gRPC trailing metadata, and OpenTelemetry
traces sent by the real OTLP/HTTP exporter (--otlp-traces-endpoint) to a collector this test runs
(http.server on 127.0.0.1, POST /v1/traces, decoded with opentelemetry-proto)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from lateserve.server import tracing
from lateserve.server.config import ServerConfig
from lateserve.v1 import common_pb2, pool_service_pb2, pool_service_pb2_grpc
from tests.live import LiveServer, call, delta, scrape

pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")
pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

MODEL = "obs-colbert"
DOCS = ["machine learning is fun", "python is a language", "deep networks learn"]
TIMING_KEYS = ("x-lateserve-prepare-ms", "x-lateserve-queue-ms", "x-lateserve-inference-ms", "x-lateserve-total-ms")


class Collector:
    """An OTLP/HTTP trace receiver: every span of every export, flattened."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path == "/v1/traces":
                    request = ExportTraceServiceRequest.FromString(body)
                    with collector.lock:
                        for resource in request.resource_spans:
                            for scope in resource.scope_spans:
                                collector.spans.extend(scope.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.close()


@pytest.fixture(scope="module")
def server(colbert_dir: Path, collector: Collector) -> Iterator[LiveServer]:
    mp = pytest.MonkeyPatch()
    mp.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    config = ServerConfig(
        model=str(colbert_dir),
        served_model_name=MODEL,
        workers=1,
        threads_per_worker=1,
        max_model_len=64,
        max_request_id_chars=32,
        otlp_traces_endpoint=collector.url,
    )
    try:
        with LiveServer(config) as live:
            yield live
    finally:
        mp.undo()


def test_per_stage_metrics(server: LiveServer) -> None:
    before = scrape(server)
    pooled_floats = 0
    for text in ("one short input", "a second input", "the third"):
        reply = call(server, "/pooling", {"model": MODEL, "input": text})
        assert reply.status == 200
        pooled_floats += sum(len(row) for row in reply.json()["data"][0]["data"])
    # Two inputs of different lengths: one batch, padded to the longer.
    two = call(server, "/pooling", {"model": MODEL, "input": ["short", "a much longer input with many more words"]})
    assert two.status == 200
    pooled_floats += sum(len(row) for item in two.json()["data"] for row in item["data"])
    after = scrape(server)

    # Per request (engine call): 4 /pooling requests, none answered from the cache.
    for stage in ("prepare", "queue", "inference", "total"):
        assert delta(before, after, "lateserve_request_duration_seconds_count", stage=stage) == 4, stage
        assert delta(before, after, "lateserve_request_duration_seconds_sum", stage=stage) > 0 or stage == "queue"
    # Per batch: one batch per request (a single idle worker takes a request's inputs at once).
    batches = delta(before, after, "lateserve_batch_forward_seconds_count")
    assert batches == 4
    assert delta(before, after, "lateserve_batch_forward_seconds_sum") > 0
    assert delta(before, after, "lateserve_batch_size_count") == batches
    assert delta(before, after, "lateserve_batch_size_sum") == 5  # sequences
    assert delta(before, after, "lateserve_batch_fill_ratio_count") == batches
    assert 0 < delta(before, after, "lateserve_batch_fill_ratio_sum") <= batches
    tokens = delta(before, after, "lateserve_batch_tokens_sum")
    padded = delta(before, after, "lateserve_batch_padded_tokens_total")
    waste = delta(before, after, "lateserve_batch_padding_tokens_total")
    assert waste > 0  # the two-input batch
    assert padded - tokens == waste
    # Bytes out: float32 tensors (the JSON's floats x 4), and the HTTP bodies.
    assert delta(before, after, "lateserve_response_tensor_bytes_total", method="Pool") == pooled_floats * 4
    assert delta(before, after, "lateserve_http_response_bytes_total", route="/pooling") >= len(two.raw)


def test_document_cache_hit_ratio(server: LiveServer) -> None:
    before = scrape(server)
    for _ in range(2):
        assert call(server, "/rerank", {"model": MODEL, "query": "learning", "documents": DOCS}).status == 200
    after = scrape(server)
    assert delta(before, after, "lateserve_doc_cache_misses_total") == len(DOCS)
    assert delta(before, after, "lateserve_doc_cache_hits_total") == len(DOCS)
    ratio = after[("lateserve_doc_cache_hit_ratio", ())]
    assert 0 < ratio <= 1
    # The second request's document side never reached a worker: one fewer queue observation than prepares.
    prepares = delta(before, after, "lateserve_request_duration_seconds_count", stage="prepare")
    queued = delta(before, after, "lateserve_request_duration_seconds_count", stage="queue")
    assert (prepares, queued) == (4, 3)


def test_http_request_id_and_timing_headers(server: LiveServer) -> None:
    given = call(server, "/pooling", {"model": MODEL, "input": "hi"}, x_request_id="req-abc")
    assert given.headers["x-request-id"] == "req-abc"
    assert given.json()["id"] == "pooling-req-abc"
    # The header wins over the body's request_id (vLLM); without the header the body's is used.
    both = call(server, "/pooling", {"model": MODEL, "input": "hi", "request_id": "body-id"}, x_request_id="hdr-id")
    assert (both.headers["x-request-id"], both.json()["id"]) == ("hdr-id", "pooling-hdr-id")
    body = call(server, "/pooling", {"model": MODEL, "input": "hi", "request_id": "body-id"})
    assert (body.headers["x-request-id"], body.json()["id"]) == ("body-id", "pooling-body-id")
    generated = call(server, "/pooling", {"model": MODEL, "input": "hi"})
    rid = generated.headers["x-request-id"]
    assert len(rid) == 32 and generated.json()["id"] == f"pooling-{rid}"
    # A body id that is not a header value is echoed percent-encoded (never a broken or injected header).
    odd = call(server, "/pooling", {"model": MODEL, "input": "hi", "request_id": "r\u00e9q\r\nX-Evil: 1"})
    assert odd.status == 200 and odd.json()["id"] == "pooling-r\u00e9q\r\nX-Evil: 1"
    assert odd.headers["x-request-id"] == "r%C3%A9q%0D%0AX-Evil%3A%201" and "X-Evil" not in odd.headers
    too_long = call(server, "/pooling", {"model": MODEL, "input": "hi"}, x_request_id="x" * 33)
    assert too_long.status == 400 and too_long.headers["x-request-id"] != "x" * 33
    for reply in (given, generated):
        values = {key: float(reply.headers[key]) for key in TIMING_KEYS}
        assert all(v >= 0 for v in values.values())
        assert values["x-lateserve-inference-ms"] > 0
        assert values["x-lateserve-total-ms"] >= values["x-lateserve-prepare-ms"]
        assert values["x-lateserve-total-ms"] >= values["x-lateserve-inference-ms"]


def pool_request(**kwargs: Any) -> pool_service_pb2.PoolRequest:
    return pool_service_pb2.PoolRequest(inputs=[common_pb2.Input(text="hello world")], **kwargs)


def test_grpc_request_id_and_trailing_timings(server: LiveServer) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pool_service_pb2_grpc.PoolServiceStub(channel)
        response, call = stub.Pool.with_call(pool_request(), metadata=(("x-request-id", "grpc-1"),))
        trailing = dict(call.trailing_metadata())
        assert response.id == "pooling-grpc-1" and trailing["x-request-id"] == "grpc-1"
        assert float(trailing["x-lateserve-total-ms"]) == pytest.approx(response.timings.total_ns / 1e6, abs=1e-3)
        assert float(trailing["x-lateserve-prepare-ms"]) == pytest.approx(response.timings.tokenize_ns / 1e6, abs=1e-3)
        assert float(trailing["x-lateserve-queue-ms"]) == pytest.approx(response.timings.queue_ns / 1e6, abs=1e-3)
        assert float(trailing["x-lateserve-inference-ms"]) > 0
        response, call = stub.Pool.with_call(pool_request(request_id="r\u00e9q"))
        assert (response.id, dict(call.trailing_metadata())["x-request-id"]) == ("pooling-r\u00e9q", "r%C3%A9q")
        # The message's own request_id is kept; without either, one is generated and echoed.
        response, call = stub.Pool.with_call(pool_request(request_id="own"), metadata=(("x-request-id", "meta"),))
        assert (response.id, dict(call.trailing_metadata())["x-request-id"]) == ("pooling-own", "own")
        response, call = stub.Pool.with_call(pool_request())
        rid = dict(call.trailing_metadata())["x-request-id"]
        assert len(rid) == 32 and response.id == f"pooling-{rid}"
        # Streaming: the timings of the last message, in the trailing metadata.
        stream = stub.StreamPool(
            pool_service_pb2.StreamPoolRequest(inputs=[common_pb2.Input(text="a b c")]),
            metadata=(("x-request-id", "stream-1"),),
        )
        messages = list(stream)
        trailing = dict(stream.trailing_metadata())
        assert trailing["x-request-id"] == "stream-1"
        assert float(trailing["x-lateserve-total-ms"]) == pytest.approx(messages[-1].timings.total_ns / 1e6, abs=1e-3)
        # An over-long id is refused (its own field named), never echoed.
        with pytest.raises(grpc.RpcError) as refused:
            stub.Pool(pool_request(), metadata=(("x-request-id", "y" * 33),))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "x-request-id has 33 characters" in refused.value.details()
        echoed = dict(refused.value.trailing_metadata())["x-request-id"]
        assert echoed != "y" * 33 and len(echoed) == 32
        with pytest.raises(grpc.RpcError) as refused:
            stub.Pool(pool_request(request_id="z" * 33))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(dict(refused.value.trailing_metadata())["x-request-id"]) == 32
        # An error still carries the request id.
        with pytest.raises(grpc.RpcError) as failed:
            stub.Pool(pool_request(model="nope"), metadata=(("x-request-id", "bad-model"),))
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND
        assert dict(failed.value.trailing_metadata())["x-request-id"] == "bad-model"


def test_traces_exported_over_otlp(server: LiveServer, collector: Collector) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    reply = call(
        server,
        "/pooling",
        {"model": MODEL, "input": ["traced input", "another traced input"]},
        x_request_id="traced-1",
        traceparent=f"00-{trace_id}-00f067aa0ba902b7-01",
    )
    assert reply.status == 200
    tracing.force_flush()
    with collector.lock:
        spans = list(collector.spans)

    def attrs(span: Any) -> dict[str, Any]:
        out = {}
        for kv in span.attributes:
            value = kv.value
            out[kv.key] = getattr(value, value.WhichOneof("value"))
        return out

    roots = [s for s in spans if s.name == "Pool" and attrs(s).get("lateserve.request_id") == "traced-1"]
    assert len(roots) == 1
    root = roots[0]
    assert root.trace_id.hex() == trace_id  # the caller's traceparent is the parent
    assert root.parent_span_id.hex() == "00f067aa0ba902b7"
    root_attrs = attrs(root)
    assert root_attrs["lateserve.model"] == MODEL
    assert root_attrs["lateserve.items"] == 2
    assert root_attrs["lateserve.tokens"] == reply.json()["usage"]["prompt_tokens"]
    children = {s.name: s for s in spans if s.parent_span_id == root.span_id}
    assert set(children) == {"prepare", "queue", "forward"}
    for child in children.values():
        assert child.trace_id == root.trace_id
        assert root.start_time_unix_nano <= child.start_time_unix_nano <= child.end_time_unix_nano
        assert child.end_time_unix_nano <= root.end_time_unix_nano
        assert attrs(child)["lateserve.items"] == 2
        assert attrs(child)["lateserve.tokens"] == reply.json()["usage"]["prompt_tokens"]
    assert children["prepare"].end_time_unix_nano <= children["forward"].start_time_unix_nano
    # A plain gRPC call is a span of its own (new trace) with its request id.
    with grpc.insecure_channel(server.grpc_target) as channel:
        pool_service_pb2_grpc.PoolServiceStub(channel).Pool(pool_request(request_id="grpc-traced"))
    tracing.force_flush()
    with collector.lock:
        assert any(attrs(s).get("lateserve.request_id") == "grpc-traced" for s in collector.spans)


def test_no_opentelemetry_without_the_flag() -> None:
    code = (
        "import sys\n"
        "from lateserve.server import app, cli, tracing\n"
        "from lateserve.server.rpc import rpc_method\n"
        "with tracing.request_span('x', request_id='r') as span:\n"
        "    assert span is None\n"
        "tracing.stages(0, [('prepare', 0, 5)])\n"
        "assert not tracing.setup(None)\n"
        "assert cli.build_parser().parse_args(['serve']).otlp_traces_endpoint is None\n"
        "loaded = [m for m in sys.modules if m.startswith('opentelemetry')]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_weight_progress_is_quiet_off_a_terminal(colbert_dir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from lateserve.server.families.loading import load_safetensors, progress_disabled

    assert progress_disabled()  # pytest's captured stderr is not a terminal
    state = load_safetensors(colbert_dir)
    assert state and "linear.weight" in state
    assert capfd.readouterr().err == ""
