"""Admission bounds against a live server: work that can never fit is a 400 naming the limit (a retry
cannot help), not a 429 that a client would retry forever; the request's own query does not count
against its documents."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status

from lateserve.server.config import ServerConfig
from lateserve.v1 import common_pb2 as c
from lateserve.v1 import rerank_service_pb2, rerank_service_pb2_grpc
from lateserve.wire.status import unpack_details
from tests.live import LiveServer

LIMIT = 120


@pytest.fixture(scope="module")
def small_server(colbert_dir: Path) -> Iterator[LiveServer]:
    config = ServerConfig(
        model=str(colbert_dir), workers=1, threads_per_worker=1, max_model_len=64, max_queued_tokens=LIMIT
    )
    with LiveServer(config) as live:
        yield live


def post(server: LiveServer, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    request = urllib.request.Request(server.http_url + path, data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def test_work_over_the_queue_bound_is_400_not_429(small_server: LiveServer) -> None:
    documents = [f"document number {i} is about machine learning and retrieval" for i in range(20)]
    status, body, headers = post(small_server, "/rerank", {"query": "machine learning", "documents": documents})
    assert status == 400, body
    assert "Retry-After" not in headers
    message = body["error"]["message"]
    assert "--max-queued-tokens" in message and f"({LIMIT}," in message


def test_work_under_the_bound_is_served(small_server: LiveServer) -> None:
    documents = [f"document {i}" for i in range(8)]  # 8 x 4 tokens + the query: under the bound
    status, body, _ = post(small_server, "/rerank", {"query": "machine learning", "documents": documents})
    assert status == 200, body
    assert len(body["results"]) == 8


def test_grpc_reports_request_too_large(small_server: LiveServer) -> None:
    docs = [c.Input(text=f"document number {i} is about machine learning and retrieval") for i in range(20)]
    with grpc.insecure_channel(small_server.grpc_target) as channel:
        stub = rerank_service_pb2_grpc.RerankServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Rerank(rerank_service_pb2.RerankRequest(query=c.Input(text="machine learning"), documents=docs))
    err = info.value
    details = unpack_details(err.code(), err.details() or "", rpc_status.from_call(err))  # type: ignore[arg-type]
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT and details.reason == "REQUEST_TOO_LARGE"
    assert details.retry_after_s is None


def test_an_input_without_tokens_is_400(small_server: LiveServer) -> None:
    """Empty token ids (found by tests/fuzz): nothing to embed, so 400 naming the item, not a 500."""
    from lateserve.v1 import pool_service_pb2, pool_service_pb2_grpc

    empty = c.Input(token_ids=c.TokenIds(ids=[]))
    with grpc.insecure_channel(small_server.grpc_target) as channel:
        rerank = rerank_service_pb2_grpc.RerankServiceStub(channel).Rerank
        with pytest.raises(grpc.RpcError) as info:
            rerank(rerank_service_pb2.RerankRequest(query=empty, documents=[empty]))
        pool = pool_service_pb2_grpc.PoolServiceStub(channel).Pool
        with pytest.raises(grpc.RpcError) as pooled:
            pool(pool_service_pb2.PoolRequest(inputs=[c.Input(text="fine"), empty]))
    for err in (info.value, pooled.value):
        details = unpack_details(err.code(), err.details() or "", rpc_status.from_call(err))  # type: ignore[arg-type]
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT and details.reason == "EMPTY_INPUT", details
    assert (
        unpack_details(
            pooled.value.code(),
            pooled.value.details() or "",
            rpc_status.from_call(pooled.value),  # type: ignore[arg-type]
        ).field
        == "input[1]"
    )
    status, body, _ = post(small_server, "/pooling", {"input": [[]], "task": "token_embed"})
    assert status == 400, body
