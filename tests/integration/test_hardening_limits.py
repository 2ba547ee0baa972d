"""Cheap, early request limits against a live server (issue 12, items 1, 4, 6).

A request over a limit is a 400 naming the limit before anything is built from it: a /rerank with a
million tiny documents is refused without stalling /health (its latency meanwhile is compared with /health
alone), a deeply nested body is a 400 and not a 500, and a huge request_id is refused, never echoed into a
header or a log line. The same limits hold over gRPC (REQUEST_TOO_LARGE with the field)."""

from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status

from lateserve.server.config import ServerConfig
from lateserve.v1 import common_pb2 as c
from lateserve.v1 import (
    pool_service_pb2,
    pool_service_pb2_grpc,
    rerank_service_pb2,
    rerank_service_pb2_grpc,
    tokenize_service_pb2,
    tokenize_service_pb2_grpc,
)
from lateserve.wire.status import unpack_details
from tests.live import LiveServer

MAX_ITEMS = 1000
MAX_INPUT_CHARS = 20_000
MAX_REQUEST_CHARS = 50_000


@pytest.fixture(scope="module")
def server(colbert_dir: Path) -> Iterator[LiveServer]:
    config = ServerConfig(
        model=str(colbert_dir),
        workers=1,
        threads_per_worker=1,
        max_model_len=64,
        max_items_per_request=MAX_ITEMS,
        max_input_chars=MAX_INPUT_CHARS,
        max_request_chars=MAX_REQUEST_CHARS,
    )
    with LiveServer(config) as live:
        yield live


def request(
    server: LiveServer, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any, dict[str, str]]:
    connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=120)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw[:1] == b"{" else raw, dict(response.getheaders())
    finally:
        connection.close()


def post(server: LiveServer, path: str, body: object, **kw: Any) -> tuple[int, Any, dict[str, str]]:
    return request(server, "POST", path, json.dumps(body).encode(), **kw)


def health_latencies(server: LiveServer, stop: threading.Event | None = None, n: int = 30) -> list[float]:
    out: list[float] = []
    while (stop is None and len(out) < n) or (stop is not None and not stop.is_set()):
        start = time.perf_counter()
        status, _, _ = request(server, "GET", "/health")
        out.append(time.perf_counter() - start)
        assert status == 200
        time.sleep(0.01)
    return out


def grpc_error(err: grpc.RpcError) -> Any:
    return unpack_details(err.code(), err.details() or "", rpc_status.from_call(err))  # type: ignore[attr-defined]


def test_a_million_tiny_documents_are_refused_fast_without_stalling_health(server: LiveServer) -> None:
    alone = health_latencies(server)
    body = json.dumps({"query": "machine learning", "documents": ["a"] * 1_000_000}).encode()
    start = time.perf_counter()
    json.loads(body)
    parse_s = time.perf_counter() - start  # what a single JSON parse of this body costs on this machine

    stop = threading.Event()
    during: list[float] = []
    poller = threading.Thread(target=lambda: during.extend(health_latencies(server, stop)))
    poller.start()
    time.sleep(0.1)
    start = time.perf_counter()
    status, answer, _ = request(server, "POST", "/rerank", body)
    elapsed = time.perf_counter() - start
    time.sleep(0.1)
    stop.set()
    poller.join(timeout=60)

    assert status == 400, answer
    assert answer["error"]["param"] == "documents" and "--max-items-per-request" in answer["error"]["message"]
    # Refused after one parse and one len(): no pydantic model, proto message or tokenization of a million items.
    assert elapsed < 10 * parse_s + max(alone) * 10, (elapsed, parse_s)
    assert during, "health was polled during the request"
    worst = max(during)
    assert worst < max(alone) + 5 * parse_s, (
        f"/health took up to {worst * 1e3:.0f} ms during the request, {max(alone) * 1e3:.0f} ms alone "
        f"(one parse of the body: {parse_s * 1e3:.0f} ms)"
    )
    # Before the fix: /health blocked for 43 s. Now it answers in about the time of one parse at worst.
    assert statistics.median(during) < statistics.median(alone) + parse_s


def test_grpc_a_million_documents_are_refused_with_the_limit(server: LiveServer) -> None:
    docs = [c.Input(text="a")] * 1_000_000
    with grpc.insecure_channel(server.grpc_target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = rerank_service_pb2_grpc.RerankServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Rerank(rerank_service_pb2.RerankRequest(query=c.Input(text="q"), documents=docs), timeout=60)
    details = grpc_error(info.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT and details.reason == "REQUEST_TOO_LARGE"
    assert details.field == "documents" and "--max-items-per-request" in details.message


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000 + b"]" * 100_000, b'{"query": ' + b"[" * 100_000 + b"]" * 100_000 + b', "documents": ["a"]}'],
    ids=["top", "field"],
)
def test_deeply_nested_json_is_400_not_500(server: LiveServer, body: bytes) -> None:
    status, answer, _ = request(server, "POST", "/rerank", body)
    assert status == 400, answer
    assert answer["error"]["code"] == 400 and answer["error"]["type"] == "BadRequestError"
    assert "nested too deeply" in answer["error"]["message"]


def test_malformed_json_is_400(server: LiveServer) -> None:
    for body in (b"{", b'{"query": "a", "documents": ["b"]', b"\xff\xfe{}", b'{"query": NaN'):
        status, answer, _ = request(server, "POST", "/rerank", body)
        assert status == 400, (body, answer)
        assert answer["error"]["message"].startswith("Invalid JSON")


def test_a_huge_request_id_is_refused_and_never_echoed(server: LiveServer) -> None:
    huge = "x" * (8 << 20)
    status, answer, headers = post(server, "/rerank", {"query": "q", "documents": ["d"], "request_id": huge})
    assert status == 400, str(answer)[:300]
    assert answer["error"]["param"] == "request_id" and "--max-request-id-chars" in answer["error"]["message"]
    assert len(headers["x-request-id"]) <= 64 and len(json.dumps(answer)) < 1000

    status, answer, headers = post(
        server, "/rerank", {"query": "q", "documents": ["d"]}, headers={"x-request-id": "y" * 300}
    )
    assert status == 400 and answer["error"]["param"] == "x-request-id"
    assert "y" * 300 not in headers["x-request-id"]

    status, answer, headers = post(server, "/rerank", {"query": "q", "documents": ["d"], "request_id": "r" * 256})
    assert status == 200, answer
    assert headers["x-request-id"] == "r" * 256 and answer["id"] == "score-" + "r" * 256

    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = rerank_service_pb2_grpc.RerankServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Rerank(
                rerank_service_pb2.RerankRequest(
                    query=c.Input(text="q"), documents=[c.Input(text="d")], request_id=huge
                )
            )
    details = grpc_error(info.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT and details.field == "request_id"
    assert len(details.message) < 300


def test_characters_per_input_and_per_request(server: LiveServer) -> None:
    long = "word " * (MAX_INPUT_CHARS // 5 + 1)
    status, answer, _ = post(server, "/pooling", {"input": long, "task": "token_embed"})
    assert status == 400 and answer["error"]["param"] == "input" and "--max-input-chars" in answer["error"]["message"]
    status, answer, _ = post(server, "/tokenize", {"prompt": long})
    assert status == 400 and "--max-input-chars" in answer["error"]["message"]
    many = ["word " * (MAX_INPUT_CHARS // 10)] * (MAX_REQUEST_CHARS // (MAX_INPUT_CHARS // 2) + 1)
    status, answer, _ = post(server, "/rerank", {"query": "q", "documents": many})
    assert status == 400 and "--max-request-chars" in answer["error"]["message"], answer
    status, answer, _ = post(server, "/pooling", {"input": [[1] * (MAX_INPUT_CHARS + 1)], "task": "token_embed"})
    assert status == 400 and answer["error"]["param"] == "input[0]", answer
    # Under the limits: served (truncated to max_model_len by the request's own choice).
    ok = "word " * (MAX_INPUT_CHARS // 5 - 10)
    status, answer, _ = post(server, "/pooling", {"input": ok, "task": "token_embed", "truncate_prompt_tokens": 32})
    assert status == 200, answer

    with grpc.insecure_channel(server.grpc_target) as channel:
        pool = pool_service_pb2_grpc.PoolServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            pool.Pool(pool_service_pb2.PoolRequest(inputs=[c.Input(text="a"), c.Input(text=long)]))
        details = grpc_error(info.value)
        assert details.reason == "REQUEST_TOO_LARGE" and details.field == "input[1]"
        with pytest.raises(grpc.RpcError) as info:
            list(pool.StreamPool(pool_service_pb2.StreamPoolRequest(inputs=[c.Input(text=long)])))
        assert grpc_error(info.value).field == "input[0]"
        tokenize = tokenize_service_pb2_grpc.TokenizeServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            tokenize.Tokenize(tokenize_service_pb2.TokenizeRequest(prompt=long))
        assert grpc_error(info.value).field == "prompt"
        assert tokenize.Tokenize(tokenize_service_pb2.TokenizeRequest(prompt="hello")).count > 0
