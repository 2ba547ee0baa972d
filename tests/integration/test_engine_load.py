"""Serving under load against live servers with real workers: batch independence, the document
cache, backpressure (429 / RESOURCE_EXHAUSTED + RetryInfo), deadlines that drop queued work."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_status import rpc_status

from lateserve.server import metrics
from lateserve.server.config import ServerConfig
from lateserve.v1 import common_pb2 as c
from lateserve.v1 import pool_service_pb2, pool_service_pb2_grpc, rerank_service_pb2, rerank_service_pb2_grpc
from lateserve.wire.status import unpack_details
from lateserve.wire.tensors import from_tensor
from tests.live import LiveServer

HEAVY = [c.Input(text="machine learning is fun " * 100) for _ in range(24)]


def text(t: str) -> c.Input:
    return c.Input(text=t)


def test_outputs_do_not_depend_on_batch_mates(colbert_channel: grpc.Channel) -> None:
    pool = pool_service_pb2_grpc.PoolServiceStub(colbert_channel).Pool
    target = "Deep learning uses neural networks."
    alone = from_tensor(pool(pool_service_pb2.PoolRequest(inputs=[text(target)])).outputs[0].data)
    mates = [text("python " * n) for n in (1, 7, 20, 40)] + [text(target)] + [text("the weather is sunny " * 5)]
    mixed = from_tensor(pool(pool_service_pb2.PoolRequest(inputs=mates)).outputs[4].data)
    cos = (alone * mixed).sum(1) / (np.linalg.norm(alone, axis=1) * np.linalg.norm(mixed, axis=1))
    assert alone.shape == mixed.shape and cos.min() >= 0.99999


def test_repeated_documents_hit_the_cache(colbert_channel: grpc.Channel) -> None:
    rerank = rerank_service_pb2_grpc.RerankServiceStub(colbert_channel).Rerank
    docs = [text(f"The capital of France is Paris {i}.") for i in range(5)]
    first = rerank(rerank_service_pb2.RerankRequest(query=text("capital of France"), documents=docs))
    hits = metrics.CACHE_HITS._value.get()
    again = rerank(rerank_service_pb2.RerankRequest(query=text("capital of France"), documents=docs))
    assert metrics.CACHE_HITS._value.get() - hits == 5
    assert [r.index for r in again.results] == [r.index for r in first.results]
    np.testing.assert_allclose(
        [r.relevance_score for r in again.results], [r.relevance_score for r in first.results], rtol=1e-5
    )
    other = rerank(rerank_service_pb2.RerankRequest(query=text("Paris"), documents=docs))
    assert metrics.CACHE_HITS._value.get() - hits == 10
    assert [r.relevance_score for r in other.results] != [r.relevance_score for r in first.results]


@pytest.fixture(scope="module")
def busy_server() -> Iterator[LiveServer]:
    """Real MiniLM on one thread, so a heavy request keeps the only worker busy for seconds."""
    with LiveServer(ServerConfig(workers=1, threads_per_worker=1, max_queued_requests=2)) as live:
        yield live


def start_heavy(target: str) -> threading.Thread:
    def run() -> None:
        with grpc.insecure_channel(target) as channel, contextlib.suppress(grpc.RpcError):
            pool_service_pb2_grpc.PoolServiceStub(channel).Pool(pool_service_pb2.PoolRequest(inputs=HEAVY))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_full_queue_answers_resource_exhausted_and_429(busy_server: LiveServer) -> None:
    threads = [start_heavy(busy_server.grpc_target) for _ in range(2)]
    time.sleep(1.0)
    with grpc.insecure_channel(busy_server.grpc_target) as channel, pytest.raises(grpc.RpcError) as info:
        pool_service_pb2_grpc.PoolServiceStub(channel).Pool(pool_service_pb2.PoolRequest(inputs=[text("hi")]))
    err = info.value
    details = unpack_details(err.code(), err.details() or "", rpc_status.from_call(err))  # type: ignore[arg-type]
    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.reason == "QUEUE_FULL"
    assert details.retry_after_s == 1.0
    body = json.dumps({"input": "hi", "task": "token_embed"}).encode()
    req = urllib.request.Request(
        busy_server.http_url + "/pooling", data=body, headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(req, timeout=30)
    assert http.value.code == 429 and http.value.headers["Retry-After"] == "1"
    assert json.loads(http.value.read())["error"]["code"] == 429
    for t in threads:
        t.join(timeout=60)


def test_expired_deadline_drops_queued_work(busy_server: LiveServer) -> None:
    heavy = start_heavy(busy_server.grpc_target)
    time.sleep(1.0)  # the heavy request occupies the worker (and its prefetch slot)
    queue = busy_server.server._batcher.queue  # type: ignore[union-attr]
    dropped = queue.dropped
    waiting = [text(f"nobody waits for this {i}") for i in range(6)]
    with grpc.insecure_channel(busy_server.grpc_target) as channel:
        stub = pool_service_pb2_grpc.PoolServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Pool(pool_service_pb2.PoolRequest(inputs=waiting), timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    heavy.join(timeout=60)
    deadline = time.monotonic() + 10
    while queue.dropped - dropped < len(waiting) and time.monotonic() < deadline:
        time.sleep(0.1)
    # Dropped at cut time: the six items never reached a forward pass.
    assert queue.dropped - dropped == len(waiting) and len(queue) == 0


def test_one_request_spreads_over_idle_workers(colbert_dir: Path, colbert_channel: grpc.Channel) -> None:
    """Two single-threaded replicas (the CPU default on two cores): one rerank request is cut into a
    batch per idle worker, and its scores equal those of the one-worker server."""
    docs = [text(f"Document {i} is about {'machine learning ' * (1 + i % 5)}.") for i in range(12)]
    request = rerank_service_pb2.RerankRequest(query=text("what is machine learning"), documents=docs)
    single = rerank_service_pb2_grpc.RerankServiceStub(colbert_channel).Rerank(request)
    config = ServerConfig(model=str(colbert_dir), workers=2, threads_per_worker=1, max_model_len=64, doc_cache_mb=0)
    with LiveServer(config) as live, grpc.insecure_channel(live.grpc_target) as channel:
        before = [metrics.WORKER_BATCHES.labels(str(w))._value.get() for w in (0, 1)]
        split = rerank_service_pb2_grpc.RerankServiceStub(channel).Rerank(request)
        after = [metrics.WORKER_BATCHES.labels(str(w))._value.get() for w in (0, 1)]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1]
    assert [r.index for r in split.results] == [r.index for r in single.results]
    np.testing.assert_allclose(
        [r.relevance_score for r in split.results], [r.relevance_score for r in single.results], rtol=1e-5
    )
