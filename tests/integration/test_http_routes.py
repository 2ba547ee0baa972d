"""The REST gateway against a live lateserve server (gRPC + in-process gateway + worker processes):
vLLM's JSON shapes and error envelopes end to end, numbers checked against the independent
plain-transformers reference and against the gRPC answer for the same request."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from lateserve.v1 import common_pb2, score_service_pb2, score_service_pb2_grpc
from tests.live import LiveServer, call
from tests.reference import BertColbertReference

MODEL = "answerdotai/answerai-colbert-small-v1"
QUERY = "What is machine learning?"
DOCS = [
    "Machine learning is a subset of artificial intelligence.",
    "Python is a programming language.",
    "Deep learning uses neural networks.",
]
USAGE_KEYS = [
    "prompt_tokens",
    "total_tokens",
    "completion_tokens",
    "prompt_tokens_details",
    "completion_tokens_details",
]


def envelope(status: int, type_: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


@pytest.fixture(scope="module")
def reference(colbert_dir: Path) -> BertColbertReference:
    return BertColbertReference(colbert_dir)


def test_rerank_matches_reference_and_vllm_shape(colbert_server: LiveServer, reference: BertColbertReference) -> None:
    reply = call(colbert_server, "/rerank", {"model": MODEL, "query": QUERY, "documents": DOCS, "top_n": 2})
    assert reply.status == 200
    data = reply.json()
    assert list(data) == ["id", "model", "usage", "results"]
    assert data["id"].startswith("score-")
    assert data["model"] == MODEL
    want = [reference.maxsim(QUERY, d) for d in DOCS]
    order = sorted(range(len(DOCS)), key=lambda i: -want[i])[:2]
    assert [r["index"] for r in data["results"]] == order
    for result in data["results"]:
        assert list(result) == ["index", "document", "relevance_score"]
        assert result["document"] == {"text": DOCS[result["index"]], "multi_modal": None}
        assert result["relevance_score"] == pytest.approx(want[result["index"]], rel=1e-5)
    tokens = reference.num_tokens(QUERY) + sum(reference.num_tokens(d) for d in DOCS)
    assert data["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}  # counted before the top_n cut


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
def test_rerank_aliases_answer_like_rerank(colbert_server: LiveServer, path: str) -> None:
    body = {"query": QUERY, "documents": DOCS, "return_documents": False}
    canonical, alias = call(colbert_server, "/rerank", body).json(), call(colbert_server, path, body).json()
    assert alias["results"] == canonical["results"]
    assert alias["usage"] == canonical["usage"]


@pytest.mark.parametrize(
    "payload",
    [
        {"text_1": QUERY, "text_2": DOCS},
        {"queries": QUERY, "documents": DOCS},
        {"queries": [QUERY], "items": DOCS},
        {"data_1": QUERY, "data_2": DOCS},
    ],
)
def test_score_spellings_match_reference(
    colbert_server: LiveServer, reference: BertColbertReference, payload: dict[str, Any]
) -> None:
    reply = call(colbert_server, "/score", {"model": MODEL, **payload})
    assert reply.status == 200
    data = reply.json()
    assert list(data) == ["id", "object", "created", "model", "data", "usage"]
    assert data["id"].startswith("score-") and data["object"] == "list" and data["model"] == MODEL
    assert [d["index"] for d in data["data"]] == [0, 1, 2]
    assert all(d["object"] == "score" for d in data["data"])
    np.testing.assert_allclose(
        [d["score"] for d in data["data"]], [reference.maxsim(QUERY, d) for d in DOCS], rtol=1e-5
    )
    assert list(data["usage"]) == USAGE_KEYS
    assert data["usage"]["completion_tokens"] == 0
    assert data["usage"]["prompt_tokens_details"] is None


def test_score_over_http_equals_grpc(colbert_server: LiveServer, colbert_channel: grpc.Channel) -> None:
    stub = score_service_pb2_grpc.ScoreServiceStub(colbert_channel)
    grpc_reply = stub.Score(
        score_service_pb2.ScoreRequest(
            queries=[common_pb2.Input(text="a cat"), common_pb2.Input(text="a dog")],
            documents=[common_pb2.Input(text="the cat sat"), common_pb2.Input(text="the dog ran")],
        )
    )
    http = call(colbert_server, "/score", {"text_1": ["a cat", "a dog"], "text_2": ["the cat sat", "the dog ran"]})
    assert [d["score"] for d in http.json()["data"]] == [r.score for r in grpc_reply.results]
    assert http.json()["usage"]["prompt_tokens"] == grpc_reply.usage.prompt_tokens


def test_pooling_token_embed_float_base64_and_token_ids(
    colbert_server: LiveServer, reference: BertColbertReference
) -> None:
    reply = call(colbert_server, "/pooling", {"model": MODEL, "input": [QUERY, "Paris"], "task": "token_embed"})
    assert reply.status == 200
    data = reply.json()
    assert list(data) == ["id", "object", "created", "model", "data", "usage"]
    assert data["id"].startswith("pooling-")
    for item, text in zip(data["data"], [QUERY, "Paris"], strict=True):
        assert list(item) == ["index", "object", "data"] and item["object"] == "pooling"
        np.testing.assert_allclose(np.asarray(item["data"]), reference.token_embed(text), atol=1e-5)
    assert data["usage"]["prompt_tokens"] == reference.num_tokens(QUERY) + reference.num_tokens("Paris")

    ids = call(colbert_server, "/tokenize", {"prompt": QUERY}).json()["tokens"]
    b64 = call(colbert_server, "/pooling", {"input": [ids], "encoding_format": "base64"}).json()
    matrix = np.frombuffer(base64.b64decode(b64["data"][0]["data"]), dtype="<f4").reshape(len(ids), -1)
    np.testing.assert_allclose(matrix, np.asarray(data["data"][0]["data"], dtype=np.float32), atol=1e-6)


def test_pooling_embed_is_unsupported_like_vllm(colbert_server: LiveServer) -> None:
    reply = call(colbert_server, "/pooling", {"model": MODEL, "input": "x", "task": "embed"})
    assert reply.status == 400
    error = reply.json()["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400 and error["param"] == "task"
    assert error["message"].startswith("Unsupported task: 'embed'")


def test_pooling_dimensions_rejected(colbert_server: LiveServer) -> None:
    reply = call(colbert_server, "/pooling", {"input": "x", "dimensions": 8})
    assert reply.status == 400
    assert reply.json() == envelope(400, "BadRequestError", "dimensions is currently not supported", "dimensions")


def test_embeddings_on_a_late_interaction_model(colbert_server: LiveServer) -> None:
    reply = call(colbert_server, "/v1/embeddings", {"model": MODEL, "input": "x"})
    assert reply.status == 400
    assert reply.json()["error"]["message"].startswith("Unsupported task: 'embed'")


def test_tokenize_and_detokenize(colbert_server: LiveServer, reference: BertColbertReference) -> None:
    want = reference.tokenizer("What is ColBERT?")["input_ids"]
    reply = call(colbert_server, "/tokenize", {"model": MODEL, "prompt": "What is ColBERT?"})
    data = reply.json()
    assert data == {"count": len(want), "max_model_len": 64, "tokens": want, "token_strs": None}
    strs = call(
        colbert_server,
        "/tokenize",
        {"prompt": "What is ColBERT?", "add_special_tokens": False, "return_token_strs": True},
    )
    assert strs.json()["tokens"] == want[1:-1]
    assert strs.json()["token_strs"] == reference.tokenizer.convert_ids_to_tokens(want[1:-1])
    text = call(colbert_server, "/detokenize", {"tokens": want}).json()
    assert text == {"prompt": reference.tokenizer.decode(want)}


def test_unknown_model_is_vllm_404(colbert_server: LiveServer) -> None:
    reply = call(colbert_server, "/rerank", {"model": "nope", "query": "q", "documents": ["a"]})
    assert reply.status == 404
    assert reply.json() == envelope(404, "NotFoundError", "The model `nope` does not exist.")


def test_empty_documents_is_vllm_400(colbert_server: LiveServer) -> None:
    reply = call(colbert_server, "/rerank", {"query": "q", "documents": []})
    assert reply.status == 400
    assert reply.json() == envelope(400, "BadRequestError", "At least one text_pair element must be given")


def test_pairing_mismatch(colbert_server: LiveServer) -> None:
    reply = call(colbert_server, "/score", {"text_1": ["a", "b"], "text_2": ["x", "y", "z"]})
    assert reply.status == 400
    assert reply.json() == envelope(400, "BadRequestError", "Input lengths must be either 1:1, 1:N or N:N")


def test_over_long_input_and_truncation(colbert_server: LiveServer) -> None:
    long_doc = "word " * 200
    reply = call(colbert_server, "/rerank", {"query": "q", "documents": [long_doc]})
    assert reply.status == 400
    error = reply.json()["error"]
    assert error["param"] == "input_tokens"
    # The newest vLLM's wording (0.32, the reference's captured answer), every word, the count echoed twice.
    n = int(error["message"].rsplit("value=", 1)[1].rstrip(")"))
    assert n > 64
    assert error["message"] == (
        f"This model's maximum context length is 64 tokens. However, your prompt contains at least {n} input "
        "tokens, which exceeds this limit even without any output tokens. Please reduce the length of the input "
        f"prompt. (parameter=input_tokens, value={n})"
    )
    assert (
        call(colbert_server, "/rerank", {"query": "q", "documents": [long_doc], "truncate_prompt_tokens": -1}).status
        == 200
    )
    too_big = call(colbert_server, "/rerank", {"query": "q", "documents": ["a"], "truncate_prompt_tokens": 65})
    assert too_big.status == 400
    assert too_big.json()["error"] == {
        "message": "truncate_prompt_tokens value (65) is greater than max_model_len (64). "
        "Please, select a smaller truncation size.",
        "type": "BadRequestError",
        "param": "truncate_prompt_tokens",
        "code": 400,
    }


def test_request_id_and_timing_headers(colbert_server: LiveServer) -> None:
    reply = call(colbert_server, "/score", {"text_1": "q", "text_2": "d"}, x_request_id="it-123")
    assert reply.headers["x-request-id"] == "it-123"
    assert reply.json()["id"] == "score-it-123"
    assert int(reply.headers["x-inference-ns"]) > 0
    assert int(reply.headers["x-tokenize-ns"]) >= 0 and int(reply.headers["x-queue-ns"]) >= 0


def test_operational_routes(colbert_server: LiveServer) -> None:
    health = call(colbert_server, "/health")
    assert (health.status, health.raw) == (200, b"")
    assert call(colbert_server, "/ping").status == 200
    assert isinstance(call(colbert_server, "/version").json()["version"], str)
    models = call(colbert_server, "/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"], m["max_model_len"]) for m in models["data"]] == [
        (MODEL, "model", "lateserve", 64)
    ]
    call(colbert_server, "/rerank", {"query": "q", "documents": ["a"]})
    metrics = call(colbert_server, "/metrics").raw.decode()
    assert 'lateserve_http_requests_total{route="/rerank",status="200"}' in metrics
    assert "lateserve_queue_size" in metrics  # the server's registry, served in-process


def test_wrong_content_type(colbert_server: LiveServer) -> None:
    request = urllib.request.Request(colbert_server.http_url + "/rerank", data=b"{}", method="POST")
    request.add_header("Content-Type", "text/plain")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code == 400
    assert json.loads(info.value.read()) == envelope(
        400, "BadRequestError", "Unsupported Media Type: Only 'application/json' is allowed"
    )


@pytest.fixture(scope="module")
def sidecar(colbert_server: LiveServer) -> Any:
    """`lateserve gateway` in its own process, reaching the same server over a real gRPC channel."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lateserve.server", "gateway", "--grpc-target", colbert_server.grpc_target]
    proc = subprocess.Popen([*cmd, "--host", "127.0.0.1", "--port", str(port)], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.2)
        yield type("Sidecar", (), {"http_url": url})()
    finally:
        proc.terminate()
        proc.wait(10)


SAME_ANSWERS = [
    ("/rerank", {"model": MODEL, "query": QUERY, "documents": DOCS, "top_n": 2}, 200),
    ("/score", {"model": MODEL, "queries": [QUERY], "documents": DOCS[:2]}, 200),
    ("/pooling", {"model": MODEL, "input": DOCS[:1], "task": "token_embed", "encoding_format": "base64"}, 200),
    ("/tokenize", {"model": MODEL, "prompt": QUERY}, 200),
    ("/rerank", {"model": "no-such-model", "query": QUERY, "documents": DOCS}, 404),
    ("/rerank", {"model": MODEL, "query": "word " * 200, "documents": DOCS}, 400),  # over max_model_len
    ("/score", {"model": MODEL, "queries": [QUERY, QUERY], "documents": DOCS}, 400),  # pairing mismatch
    ("/pooling", {"model": MODEL, "input": DOCS, "task": "token_embed", "embedding_mode": "sideways"}, 400),
    ("/pooling", {"model": MODEL, "input": DOCS, "task": "embed"}, 400),  # unsupported task
]


@pytest.mark.parametrize(("path", "body", "status"), SAME_ANSWERS, ids=[f"{a[0]}-{a[2]}" for a in SAME_ANSWERS])
def test_in_process_gateway_answers_like_the_sidecar(
    colbert_server: LiveServer, sidecar: Any, path: str, body: Any, status: int
) -> None:
    """The gateway inside `lateserve serve` calls the servicers directly (no loopback channel); a
    `lateserve gateway` sidecar goes through gRPC. Same status, same bytes (but the `created` clock)."""
    inside = call(colbert_server, path, body, x_request_id="same-id")
    outside = call(sidecar, path, body, x_request_id="same-id")
    assert inside.status == outside.status == status
    a, b = inside.json(), outside.json()
    for doc in (a, b):
        doc.pop("created", None)
    assert a == b
    if inside.status != 200:
        assert a["error"]["code"] == inside.status and a["error"]["message"]
