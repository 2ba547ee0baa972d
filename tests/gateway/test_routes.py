"""The gateway's HTTP routes end to end against a fake lateserve gRPC server (see conftest.py):
status codes, exact bodies, headers, error envelopes, metrics and disconnect cancellation."""

from __future__ import annotations

import asyncio
import base64
import re
import socket
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from lateserve.gateway.app import create_app, start_gateway
from lateserve.gateway.config import GatewayConfig
from lateserve.v1 import common_pb2
from lateserve.wire import status as wire_status

pytestmark = pytest.mark.asyncio(loop_scope="session")

DOCS = ["Paris is the capital of France.", "Berlin is the capital of Germany."]


@pytest.fixture
async def client(aiohttp_client: Any, gateway_config: GatewayConfig) -> Any:
    return await aiohttp_client(create_app(gateway_config))


def envelope(status: int, type_: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


async def test_rerank_round_trip(client: Any, fake_server: Any) -> None:
    resp = await client.post(
        "/rerank",
        json={"model": "colbert-minilm", "query": "capital of france", "documents": DOCS, "return_documents": False},
        headers={"x-request-id": "req-42"},
    )
    assert resp.status == 200
    assert resp.headers["x-request-id"] == "req-42"
    assert (resp.headers["x-tokenize-ns"], resp.headers["x-queue-ns"], resp.headers["x-inference-ns"]) == (
        "11",
        "22",
        "33",
    )
    assert await resp.text() == (
        '{"id":"score-req-42","model":"colbert-minilm","usage":{"prompt_tokens":38,"total_tokens":38},"results":['
        '{"index":0,"document":{"text":"Paris is the capital of France.","multi_modal":null},"relevance_score":10.0},'
        '{"index":1,"document":{"text":"Berlin is the capital of Germany.","multi_modal":null},"relevance_score":9.0}]}'
    )
    sent = fake_server.backend.last("Rerank")
    assert sent.request_id == "req-42"
    assert sent.model == "colbert-minilm"
    assert sent.query.text == "capital of france"
    assert fake_server.backend.metadata["Rerank"][-1]["x-request-id"] == "req-42"


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
async def test_rerank_aliases(client: Any, fake_server: Any, path: str) -> None:
    resp = await client.post(path, json={"query": "q", "documents": "only one", "top_n": 1})
    assert resp.status == 200
    data = await resp.json()
    assert list(data) == ["id", "model", "usage", "results"]
    assert data["results"][0]["document"] == {"text": "only one", "multi_modal": None}
    sent = fake_server.backend.last("Rerank")
    assert [d.text for d in sent.documents] == ["only one"]
    assert sent.top_n == 1
    assert sent.model == ""  # no model: the server's default


async def test_request_id_from_body_then_generated(client: Any, fake_server: Any) -> None:
    resp = await client.post("/rerank", json={"query": "q", "documents": ["a"], "request_id": "body-id"})
    assert resp.headers["x-request-id"] == "body-id"
    assert fake_server.backend.last("Rerank").request_id == "body-id"
    resp = await client.post("/rerank", json={"query": "q", "documents": ["a"]})
    generated = resp.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert (await resp.json())["id"] == f"score-{generated}"
    resp = await client.post(
        "/rerank", json={"query": "q", "documents": ["a"], "request_id": "body-id"}, headers={"X-Request-Id": "hdr"}
    )
    assert resp.headers["x-request-id"] == "hdr"  # the header wins, as vLLM


@pytest.mark.parametrize(
    "payload",
    [
        {"text_1": "q", "text_2": DOCS},
        {"queries": "q", "documents": DOCS},
        {"queries": ["q"], "items": DOCS},
        {"data_1": "q", "data_2": DOCS},
    ],
)
async def test_score_spellings(client: Any, fake_server: Any, payload: dict[str, Any]) -> None:
    for path in ("/score", "/v1/score"):
        resp = await client.post(path, json=payload)
        assert resp.status == 200
        data = await resp.json()
        assert list(data) == ["id", "object", "created", "model", "data", "usage"]
        assert data["object"] == "list"
        assert isinstance(data["created"], int)
        assert data["data"] == [
            {"index": 0, "object": "score", "score": 1.5},
            {"index": 1, "object": "score", "score": 3.0},
        ]
        assert data["usage"] == {
            "prompt_tokens": 17,
            "total_tokens": 17,
            "completion_tokens": 0,
            "prompt_tokens_details": None,
            "completion_tokens_details": None,
        }
        sent = fake_server.backend.last("Score")
        assert [q.text for q in sent.queries] == ["q"]
        assert [d.text for d in sent.documents] == DOCS


async def test_pooling_float_and_base64(client: Any, fake_server: Any) -> None:
    resp = await client.post("/pooling", json={"input": ["hello world", "bye"], "task": "token_embed"})
    assert resp.status == 200
    data = await resp.json()
    assert data["id"].startswith("pooling-")
    assert data["data"][0] == {"index": 0, "object": "pooling", "data": [[0.5] * 3] * 2}
    assert data["data"][1]["data"] == [[1.0] * 3] * 2
    assert fake_server.backend.last("Pool").task == common_pb2.POOLING_TASK_TOKEN_EMBED

    resp = await client.post(
        "/pooling", json={"input": [[101, 7592, 102]], "encoding_format": "base64", "embed_dtype": "float16"}
    )
    data = await resp.json()
    sent = fake_server.backend.last("Pool")
    assert sent.dtype == common_pb2.DTYPE_FLOAT16
    assert list(sent.inputs[0].token_ids.ids) == [101, 7592, 102]
    decoded = np.frombuffer(base64.b64decode(data["data"][0]["data"]), dtype="<f2")
    np.testing.assert_array_equal(decoded, np.full(6, 0.5, dtype=np.float16))


async def test_pooling_unknown_task_never_reaches_the_server(client: Any, fake_server: Any) -> None:
    resp = await client.post("/pooling", json={"input": "x", "task": "plugin"})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"]["param"] == "task"
    assert body["error"]["message"].startswith("Unsupported task: 'plugin'")
    assert body["error"]["code"] == 400
    assert "Pool" not in fake_server.backend.requests


async def test_pooling_unsupported_task_from_server(client: Any, fake_server: Any) -> None:
    message = "Unsupported task: 'embed' Supported tasks: ['token_embed']"
    fake_server.backend.errors["Pool"] = wire_status.ErrorDetails(
        code=grpc.StatusCode.INVALID_ARGUMENT, message=message, reason=wire_status.UNSUPPORTED_TASK, field="task"
    )
    resp = await client.post("/pooling", json={"input": "x", "task": "embed"})
    assert resp.status == 400
    assert await resp.json() == envelope(400, "BadRequestError", message, "task")
    assert "x-request-id" in resp.headers


async def test_embeddings(client: Any, fake_server: Any) -> None:
    resp = await client.post("/v1/embeddings", json={"input": ["a", "b"], "dimensions": 2})
    assert resp.status == 200
    data = await resp.json()
    assert data["data"] == [
        {"index": 0, "object": "embedding", "embedding": [pytest.approx(0.6), pytest.approx(0.8)]},
        {"index": 1, "object": "embedding", "embedding": [pytest.approx(0.6), pytest.approx(0.8)]},
    ]
    assert fake_server.backend.last("Embed").dimensions == 2


async def test_embeddings_unsupported_task_is_400(client: Any, fake_server: Any) -> None:
    # The contract: a model without the embed task answers INVALID_ARGUMENT / UNSUPPORTED_TASK.
    message = "Unsupported task: 'embed' Supported tasks: ['token_embed']"
    fake_server.backend.errors["Embed"] = wire_status.ErrorDetails(
        code=grpc.StatusCode.INVALID_ARGUMENT, message=message, reason=wire_status.UNSUPPORTED_TASK
    )
    resp = await client.post("/v1/embeddings", json={"input": "a"})
    assert resp.status == 400
    assert await resp.json() == envelope(400, "BadRequestError", message)


async def test_tokenize_and_detokenize(client: Any, fake_server: Any) -> None:
    resp = await client.post("/tokenize", json={"model": "colbert-minilm", "prompt": "What is ColBERT?"})
    assert await resp.text() == (
        '{"count":6,"max_model_len":512,"tokens":[101,2054,2003,23928,1029,102],"token_strs":null}'
    )
    resp = await client.post("/tokenize", json={"prompt": "x", "return_token_strs": True})
    assert (await resp.json())["token_strs"][1] == "what"
    assert fake_server.backend.last("Tokenize").return_token_strs is True
    resp = await client.post("/detokenize", json={"tokens": [101, 2054, 2003, 23928, 1029, 102]})
    assert await resp.json() == {"prompt": "[CLS] what is colbert? [SEP]"}
    assert list(fake_server.backend.last("Detokenize").tokens) == [101, 2054, 2003, 23928, 1029, 102]


@pytest.mark.parametrize(
    ("code", "reason", "message", "field", "retry", "status", "type_"),
    [
        (
            grpc.StatusCode.NOT_FOUND,
            wire_status.MODEL_NOT_FOUND,
            "The model `nope` does not exist.",
            None,
            None,
            404,
            "NotFoundError",
        ),
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            wire_status.EMPTY_INPUT,
            "At least one text_pair element must be given",
            None,
            None,
            400,
            "BadRequestError",
        ),
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            wire_status.INPUT_TOO_LONG,
            "too long",
            "input_tokens",
            None,
            400,
            "BadRequestError",
        ),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, wire_status.QUEUE_FULL, "queue is full", None, 0.5, 429, "RateLimitError"),
        (
            grpc.StatusCode.UNAVAILABLE,
            wire_status.WORKER_UNAVAILABLE,
            "no worker",
            None,
            2.0,
            503,
            "ServiceUnavailableError",
        ),
        (grpc.StatusCode.INTERNAL, wire_status.INTERNAL, "boom", None, None, 500, "InternalServerError"),
    ],
)
async def test_server_errors_become_vllm_envelopes(
    client: Any,
    fake_server: Any,
    code: grpc.StatusCode,
    reason: str,
    message: str,
    field: str | None,
    retry: float | None,
    status: int,
    type_: str,
) -> None:
    fake_server.backend.errors["Rerank"] = wire_status.ErrorDetails(
        code=code, message=message, reason=reason, field=field, retry_after_s=retry
    )
    resp = await client.post(
        "/rerank", json={"model": "nope", "query": "q", "documents": []}, headers={"x-request-id": "e1"}
    )
    assert resp.status == status
    assert await resp.json() == envelope(status, type_, message, field)
    assert resp.headers["x-request-id"] == "e1"
    if retry is None:
        assert "Retry-After" not in resp.headers
    else:
        assert resp.headers["Retry-After"] == str(int(np.ceil(retry)))


async def test_wrong_content_type(client: Any, fake_server: Any) -> None:
    resp = await client.post("/rerank", data=b'{"query":"q","documents":["a"]}', headers={"Content-Type": "text/plain"})
    assert resp.status == 400
    assert await resp.json() == envelope(
        400, "BadRequestError", "Unsupported Media Type: Only 'application/json' is allowed"
    )
    assert "Rerank" not in fake_server.backend.requests


async def test_json_with_charset_is_accepted(client: Any) -> None:
    resp = await client.post(
        "/rerank",
        data=b'{"query":"q","documents":["a"]}',
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert resp.status == 200


async def test_malformed_json(client: Any) -> None:
    resp = await client.post("/score", data=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"]["type"] == "BadRequestError"
    assert body["error"]["code"] == 400
    assert "JSON" in body["error"]["message"]


async def test_validation_error_names_param(client: Any) -> None:
    resp = await client.post("/rerank", json={"query": "q", "documents": ["a", {"content": [{"type": "text"}]}]})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"]["param"] == "documents[1].content[0].text"
    assert body["error"]["type"] == "BadRequestError"


async def test_body_over_limit_is_413_envelope(client: Any, fake_server: Any) -> None:
    resp = await client.post("/rerank", json={"query": "q", "documents": ["x" * (70 << 10)]})
    assert resp.status == 413
    body = await resp.json()
    assert body["error"]["code"] == 413
    assert body["error"]["type"] == "RequestEntityTooLargeError"
    assert "Rerank" not in fake_server.backend.requests


async def test_unknown_route_and_method(client: Any) -> None:
    resp = await client.post("/nope", json={})
    assert resp.status == 404
    assert (await resp.json())["error"]["type"] == "NotFoundError"
    resp = await client.get("/rerank")
    assert resp.status == 405
    assert (await resp.json())["error"]["code"] == 405


async def test_health_ping_version_models(client: Any, fake_server: Any) -> None:
    for method, path in (("GET", "/health"), ("GET", "/ping"), ("POST", "/ping")):
        resp = await client.request(method, path)
        assert resp.status == 200
        assert await resp.read() == b""
    resp = await client.get("/version")
    assert await resp.json() == {"version": "0.1.0-test"}
    resp = await client.get("/v1/models")
    data = await resp.json()
    assert data["object"] == "list"
    model = data["data"][0]
    assert list(model) == ["id", "object", "created", "owned_by", "root", "parent", "max_model_len"]
    assert (model["id"], model["root"], model["max_model_len"], model["parent"]) == (
        "colbert-minilm",
        "models/colbert-minilm",
        512,
        None,
    )
    await fake_server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert (await client.get("/health")).status == 503
    assert (await client.get("/ping")).status == 503


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_server_down_is_503(aiohttp_client: Any) -> None:
    config = GatewayConfig(grpc_target=f"127.0.0.1:{_closed_port()}", host="127.0.0.1", port=0)
    client = await aiohttp_client(create_app(config))
    resp = await client.post("/rerank", json={"query": "q", "documents": ["a"]})
    assert resp.status == 503
    body = await resp.json()
    assert body["error"]["type"] == "ServiceUnavailableError"
    assert (await client.get("/health")).status == 503


async def test_metrics(client: Any, fake_server: Any) -> None:
    await client.post("/rerank", json={"query": "q", "documents": ["a"]})
    await client.post("/rerank", json={"query": "q", "documents": ["a"]})
    await client.post("/pooling", json={"input": "x", "task": "plugin"})
    await client.post("/nope/at/all", json={})
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    assert 'lateserve_http_requests_total{route="/rerank",status="200"} 2.0' in text
    assert 'lateserve_http_requests_total{route="/pooling",status="400"} 1.0' in text
    assert 'lateserve_http_requests_total{route="unmatched",status="404"} 1.0' in text
    assert 'lateserve_http_request_errors_total{route="/pooling",type="BadRequestError"} 1.0' in text
    assert 'lateserve_http_prompt_tokens_total{route="/rerank"} 76.0' in text
    assert 'lateserve_http_request_duration_seconds_count{route="/rerank"} 2.0' in text
    assert "python_info" in text  # the process-wide default registry follows (server metrics in-process)


async def test_two_apps_have_separate_registries(aiohttp_client: Any, gateway_config: GatewayConfig) -> None:
    first = await aiohttp_client(create_app(gateway_config))
    second = await aiohttp_client(create_app(gateway_config))
    await first.post("/rerank", json={"query": "q", "documents": ["a"]})
    assert 'route="/rerank"' not in await (await second.get("/metrics")).text()


async def test_client_disconnect_cancels_the_grpc_call(fake_server: Any, gateway_config: GatewayConfig) -> None:
    fake_server.backend.delay_s = 30.0
    runner = await start_gateway(gateway_config, shutdown_timeout=0.5)
    try:
        host, port = runner.addresses[0][:2]
        async with aiohttp.ClientSession() as session:
            request = asyncio.ensure_future(
                session.post(f"http://{host}:{port}/rerank", json={"query": "q", "documents": ["a"]})
            )
            await asyncio.wait_for(fake_server.backend.started.wait(), 5)
            request.cancel()  # the client goes away mid-request
            with pytest.raises(asyncio.CancelledError):
                await request
        await asyncio.wait_for(fake_server.backend.cancelled.wait(), 5)
    finally:
        await runner.cleanup()
