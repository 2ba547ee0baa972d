"""vLLM's remaining API surface against live servers (issue 11): encoding_format bytes / bytes_only and
fp8 embed_dtype, /invocations routed by body shape, max_tokens_per_doc and max_tokens_per_query, Cohere v1
document objects, GET /v1/models/{id}, and the request's field path in gRPC BadRequest for over-long inputs."""

from __future__ import annotations

import base64
import json
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_status import rpc_status

from lateserve.gateway.common.fp8 import float32_to_e4m3fn, float32_to_e5m2
from lateserve.v1 import (
    common_pb2,
    pool_service_pb2,
    pool_service_pb2_grpc,
    rerank_service_pb2,
    rerank_service_pb2_grpc,
    score_service_pb2,
    score_service_pb2_grpc,
)
from lateserve.v1.tokenize_service_pb2 import DetokenizeRequest, TokenizeRequest
from lateserve.v1.tokenize_service_pb2_grpc import TokenizeServiceStub
from lateserve.wire.status import unpack_details
from tests.integration.test_http_routes import DOCS, MODEL, QUERY, envelope
from tests.live import LiveServer, call

DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}


def without_id(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in ("id", "created")}


def floats(server: LiveServer, path: str, body: dict[str, Any], key: str) -> list[np.ndarray]:
    reply = call(server, path, {**body, "encoding_format": "float"})
    assert reply.status == 200, reply.raw
    return [np.asarray(item[key], dtype=np.float32) for item in reply.json()["data"]]


# ---------------------------------------------------------------- bytes / bytes_only / fp8


@pytest.mark.parametrize(
    ("embed_dtype", "endianness"), [("float32", "native"), ("float16", "big"), ("bfloat16", "little")]
)
def test_pooling_bytes_body_and_metadata(colbert_server: LiveServer, embed_dtype: str, endianness: str) -> None:
    body = {"input": [QUERY, DOCS[0]], "task": "token_embed", "embed_dtype": embed_dtype, "endianness": endianness}
    want = floats(colbert_server, "/pooling", body, "data")
    reply = call(colbert_server, "/pooling", {**body, "encoding_format": "bytes"}, x_request_id="bytes-1")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/octet-stream"
    meta = json.loads(reply.headers["metadata"])
    assert meta["id"] == "pooling-bytes-1" and meta["model"] == MODEL and isinstance(meta["created"], int)
    assert meta["usage"]["prompt_tokens"] == meta["usage"]["total_tokens"] > 0
    assert [m["index"] for m in meta["data"]] == [0, 1]
    assert meta["data"][0]["start"] == 0 and meta["data"][-1]["end"] == len(reply.raw)
    for item, expected in zip(meta["data"], want, strict=True):
        assert (item["embed_dtype"], item["endianness"]) == (embed_dtype, endianness)
        assert item["shape"] == list(expected.shape)
        chunk = reply.raw[item["start"] : item["end"]]
        if embed_dtype == "bfloat16":
            words = np.frombuffer(chunk, dtype="<u2").astype(np.uint32) << 16
            got = words.view(np.float32).reshape(expected.shape)
            np.testing.assert_allclose(got, expected, atol=1e-2)
        else:
            dtype = DTYPES[embed_dtype].newbyteorder(">" if endianness == "big" else "<")
            got = np.frombuffer(chunk, dtype=dtype).reshape(expected.shape)
            np.testing.assert_allclose(got, expected, atol=1e-3 if embed_dtype == "float16" else 0)
    only = call(colbert_server, "/pooling", {**body, "encoding_format": "bytes_only"})
    assert only.status == 200 and "metadata" not in only.headers
    assert only.raw == reply.raw


@pytest.mark.parametrize(("embed_dtype", "convert"), [("fp8_e4m3", float32_to_e4m3fn), ("fp8_e5m2", float32_to_e5m2)])
def test_fp8_base64_and_bytes(colbert_server: LiveServer, embed_dtype: str, convert: Any) -> None:
    body = {"input": QUERY, "task": "token_embed", "embed_dtype": embed_dtype}
    (want,) = floats(colbert_server, "/pooling", body, "data")
    reply = call(colbert_server, "/pooling", {**body, "encoding_format": "base64"})
    assert reply.status == 200
    raw = base64.b64decode(reply.json()["data"][0]["data"])
    assert raw == convert(want).tobytes()
    assert len(raw) == want.size  # one byte per element
    packed = call(colbert_server, "/pooling", {**body, "encoding_format": "bytes"})
    assert packed.raw == raw and json.loads(packed.headers["metadata"])["data"][0]["embed_dtype"] == embed_dtype


def test_embeddings_bytes(minilm_server: LiveServer) -> None:
    body = {"input": ["a small test", "another"], "embed_dtype": "float16"}
    want = floats(minilm_server, "/v1/embeddings", body, "embedding")
    reply = call(minilm_server, "/v1/embeddings", {**body, "encoding_format": "bytes"})
    assert reply.status == 200 and reply.headers["Content-Type"] == "application/octet-stream"
    meta = json.loads(reply.headers["metadata"])
    assert meta["id"].startswith("embd-")
    for item, expected in zip(meta["data"], want, strict=True):
        assert item["shape"] == [expected.size]
        got = np.frombuffer(reply.raw[item["start"] : item["end"]], dtype="<f2")
        np.testing.assert_allclose(got, expected, atol=1e-3)


def test_lexical_weights_need_json(colbert_server: LiveServer) -> None:
    body = {"input": "x", "task": "token_classify", "return_lexical_weights": True, "encoding_format": "bytes"}
    reply = call(colbert_server, "/pooling", body)
    assert reply.status == 400 and reply.json()["error"]["param"] == "encoding_format"


# ---------------------------------------------------------------- /invocations


def test_invocations_routes_by_shape(colbert_server: LiveServer) -> None:
    rerank = {"query": QUERY, "documents": DOCS, "top_n": 2}
    assert without_id(call(colbert_server, "/invocations", rerank).json()) == without_id(
        call(colbert_server, "/rerank", rerank).json()
    )
    for score in ({"text_1": QUERY, "text_2": DOCS}, {"queries": QUERY, "documents": DOCS}):
        assert without_id(call(colbert_server, "/invocations", score).json()) == without_id(
            call(colbert_server, "/score", score).json()
        )
    pooling = {"input": QUERY}  # no embed task here: /pooling, as vLLM
    got = call(colbert_server, "/invocations", pooling)
    assert got.status == 200 and got.json()["data"][0]["object"] == "pooling"
    assert without_id(got.json()) == without_id(call(colbert_server, "/pooling", pooling).json())
    bad = call(colbert_server, "/invocations", {"prompt": "x"})
    assert bad.status == 400
    assert bad.json() == envelope(
        400,
        "BadRequestError",
        "Cannot find suitable handler for request. Expected one of: "
        "['RerankRequest', 'ScoreRequest', 'PoolingRequest']",
    )
    assert call(colbert_server, "/invocations", {"query": "q", "documents": []}).status == 400


def test_invocations_prefers_embeddings_when_the_model_embeds(minilm_server: LiveServer) -> None:
    got = call(minilm_server, "/invocations", {"input": "hello"})
    assert got.status == 200 and got.json()["data"][0]["object"] == "embedding"


# ---------------------------------------------------------------- max_tokens_per_doc


def test_max_tokens_per_doc_truncates_each_document(colbert_server: LiveServer) -> None:
    long_doc = "learning machines " * 100  # over max_model_len 64
    assert call(colbert_server, "/rerank", {"query": "machines", "documents": [long_doc]}).status == 400
    cut = call(
        colbert_server,
        "/v2/rerank",
        {"query": "machines", "documents": [long_doc, DOCS[1]], "max_tokens_per_doc": 5},
    )
    assert cut.status == 200
    # The same as keeping [CLS] + the first 5 text tokens + [SEP] by right truncation (the query is shorter).
    right = call(
        colbert_server,
        "/rerank",
        {
            "query": "machines",
            "documents": [long_doc, DOCS[1]],
            "truncate_prompt_tokens": 7,
            "truncation_side": "right",
        },
    )
    assert [r["relevance_score"] for r in cut.json()["results"]] == pytest.approx(
        [r["relevance_score"] for r in right.json()["results"]], rel=1e-6
    )
    (first,) = [r for r in cut.json()["results"] if r["index"] == 0]
    assert first["document"]["text"] == long_doc  # echoed as sent
    score = call(colbert_server, "/score", {"text_1": "machines", "text_2": [long_doc], "max_tokens_per_doc": 5})
    assert score.json()["data"][0]["score"] == pytest.approx(first["relevance_score"], rel=1e-6)
    negative = call(colbert_server, "/score", {"text_1": QUERY, "text_2": ["x"], "max_tokens_per_doc": -1})
    assert negative.status == 400 and negative.json()["error"]["param"] == "max_tokens_per_doc"


def test_max_tokens_per_doc_over_grpc(colbert_channel: grpc.Channel) -> None:
    rerank = rerank_service_pb2_grpc.RerankServiceStub(colbert_channel).Rerank
    long_doc = common_pb2.Input(text="learning machines " * 100)
    query = common_pb2.Input(text="machines")
    reply = rerank(rerank_service_pb2.RerankRequest(query=query, documents=[long_doc], max_tokens_per_doc=5))
    options = common_pb2.EncodeOptions(
        truncate_prompt_tokens=7, truncation_side=common_pb2.TruncationSide.TRUNCATION_SIDE_RIGHT
    )
    same = rerank(rerank_service_pb2.RerankRequest(query=query, documents=[long_doc], options=options))
    assert reply.results[0].relevance_score == pytest.approx(same.results[0].relevance_score, rel=1e-6)
    score = score_service_pb2_grpc.ScoreServiceStub(colbert_channel).Score
    got = score(score_service_pb2.ScoreRequest(queries=[query], documents=[long_doc], max_tokens_per_doc=5))
    assert got.results[0].score == pytest.approx(same.results[0].relevance_score, rel=1e-6)


# ---------------------------------------------------------------- max_tokens_per_query


def first_tokens(server: LiveServer, text: str, n: int) -> str:
    """The text of `text`'s first n tokens (special tokens not counted), through /tokenize and /detokenize."""
    ids = call(server, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()["tokens"][:n]
    prompt: str = call(server, "/detokenize", {"tokens": ids}).json()["prompt"]
    assert call(server, "/tokenize", {"prompt": prompt, "add_special_tokens": False}).json()["tokens"] == ids
    return prompt


def test_max_tokens_per_query_truncates_each_query(colbert_server: LiveServer) -> None:
    long_query = "learning machines " * 100  # over max_model_len 64
    short_query = first_tokens(colbert_server, long_query, 5)
    assert call(colbert_server, "/rerank", {"query": long_query, "documents": DOCS}).status == 400
    cut = call(colbert_server, "/rerank", {"query": long_query, "documents": DOCS, "max_tokens_per_query": 5})
    assert cut.status == 200, cut.raw
    # The same as the query's first 5 text tokens sent as the query: special tokens are not counted.
    short = call(colbert_server, "/rerank", {"query": short_query, "documents": DOCS})
    assert without_id(cut.json()) == without_id(short.json())
    # Documents are not touched: a long document is still over-long.
    both = call(
        colbert_server,
        "/score",
        {"queries": [long_query, QUERY], "documents": [DOCS[0], "word " * 200], "max_tokens_per_query": 5},
    )
    assert both.status == 400 and both.json()["error"]["param"] == "input_tokens"
    pairwise = call(
        colbert_server,
        "/score",
        {"queries": [long_query, QUERY], "documents": DOCS[:2], "max_tokens_per_query": 5, "max_tokens_per_doc": 3},
    )
    plain = call(
        colbert_server,
        "/score",
        {
            "queries": [short_query, QUERY],
            "documents": DOCS[:2],
            "max_tokens_per_doc": 3,
        },
    )
    assert pairwise.status == 200 and plain.status == 200
    assert [d["score"] for d in pairwise.json()["data"]] == pytest.approx(
        [d["score"] for d in plain.json()["data"]], rel=1e-6
    )
    negative = call(colbert_server, "/rerank", {"query": QUERY, "documents": ["x"], "max_tokens_per_query": -2})
    assert negative.status == 400
    assert (
        negative.json()["error"]
        == envelope(
            400,
            "BadRequestError",
            "max_tokens_per_query must be >= 0 (0: no truncation), got -2",
            "max_tokens_per_query",
        )["error"]
    )


def test_max_tokens_per_query_over_grpc(colbert_channel: grpc.Channel) -> None:
    long_query = common_pb2.Input(text="learning machines " * 100)
    documents = [common_pb2.Input(text=d) for d in DOCS]
    ids = (
        TokenizeServiceStub(colbert_channel)
        .Tokenize(TokenizeRequest(prompt="learning machines " * 100, add_special_tokens=False))
        .tokens[:5]
    )
    text = TokenizeServiceStub(colbert_channel).Detokenize(DetokenizeRequest(tokens=ids)).prompt
    short = common_pb2.Input(text=text)
    rerank = rerank_service_pb2_grpc.RerankServiceStub(colbert_channel).Rerank
    got = rerank(rerank_service_pb2.RerankRequest(query=long_query, documents=documents, max_tokens_per_query=5))
    want = rerank(rerank_service_pb2.RerankRequest(query=short, documents=documents))
    assert [(r.index, r.relevance_score) for r in got.results] == [(r.index, r.relevance_score) for r in want.results]
    assert got.usage.prompt_tokens == want.usage.prompt_tokens
    score = score_service_pb2_grpc.ScoreServiceStub(colbert_channel).Score
    with pytest.raises(grpc.RpcError) as info:
        score(score_service_pb2.ScoreRequest(queries=[short], documents=documents, max_tokens_per_query=-1))
    error = info.value
    details = unpack_details(error.code(), error.details(), rpc_status.from_call(error))
    assert (error.code(), details.field) == (grpc.StatusCode.INVALID_ARGUMENT, "max_tokens_per_query")


# ---------------------------------------------------------------- Cohere v1 document objects


def test_cohere_v1_document_objects(colbert_server: LiveServer) -> None:
    plain = call(colbert_server, "/rerank", {"query": QUERY, "documents": DOCS}).json()
    objects = call(
        colbert_server, "/v1/rerank", {"query": QUERY, "documents": [{"text": d, "id": i} for i, d in enumerate(DOCS)]}
    )
    assert objects.status == 200
    assert without_id(objects.json()) == without_id(plain)
    assert objects.json()["results"][0]["document"] == {"text": DOCS[plain["results"][0]["index"]], "multi_modal": None}
    fields = call(
        colbert_server,
        "/rerank",
        {"query": QUERY, "documents": [{"title": "ML", "text": DOCS[0]}], "rank_fields": ["title", "text"]},
    )
    joined = call(colbert_server, "/rerank", {"query": QUERY, "documents": [f"title: ML\ntext: {DOCS[0]}"]})
    assert fields.json()["results"][0]["relevance_score"] == pytest.approx(
        joined.json()["results"][0]["relevance_score"], rel=1e-6
    )
    missing = call(colbert_server, "/rerank", {"query": QUERY, "documents": [{"text": "a"}], "rank_fields": ["title"]})
    assert missing.status == 400 and missing.json()["error"]["param"] == "documents[0]"
    # An object with content stays multimodal (refused by this text-only model, naming the item).
    image = call(
        colbert_server, "/rerank", {"query": QUERY, "documents": [{"content": [{"type": "text", "text": "x"}]}]}
    )
    assert image.status in (400, 501)


# ---------------------------------------------------------------- GET /v1/models/{id}


def test_model_card_and_unknown_model(colbert_server: LiveServer) -> None:
    card = call(colbert_server, f"/v1/models/{MODEL}")
    assert card.status == 200
    assert card.json() == {**call(colbert_server, "/v1/models").json()["data"][0], "created": card.json()["created"]}
    missing = call(colbert_server, "/v1/models/nope")
    assert missing.status == 404
    assert missing.json() == envelope(404, "NotFoundError", "The model `nope` does not exist.", "model")


# ---------------------------------------------------------------- BadRequest.field of over-long inputs


def field_of(fn: Any, request: Any) -> tuple[str, str | None]:
    with pytest.raises(grpc.RpcError) as info:
        fn(request)
    call_ = info.value
    details = unpack_details(call_.code(), call_.details() or "", rpc_status.from_call(call_))  # type: ignore[arg-type]
    return details.reason, details.field


def test_over_long_field_is_the_request_path(colbert_server: LiveServer, colbert_channel: grpc.Channel) -> None:
    long_text = common_pb2.Input(text="machine " * 100)
    short = common_pb2.Input(text="x")
    rerank = rerank_service_pb2_grpc.RerankServiceStub(colbert_channel).Rerank
    assert field_of(rerank, rerank_service_pb2.RerankRequest(query=long_text, documents=[short])) == (
        "INPUT_TOO_LONG",
        "query",
    )
    docs = [short, short, short, long_text]
    assert field_of(rerank, rerank_service_pb2.RerankRequest(query=short, documents=docs)) == (
        "INPUT_TOO_LONG",
        "documents[3]",
    )
    score = score_service_pb2_grpc.ScoreServiceStub(colbert_channel).Score
    assert field_of(score, score_service_pb2.ScoreRequest(queries=[short, long_text], documents=[short, short])) == (
        "INPUT_TOO_LONG",
        "queries[1]",
    )
    pool = pool_service_pb2_grpc.PoolServiceStub(colbert_channel).Pool
    assert field_of(pool, pool_service_pb2.PoolRequest(inputs=[long_text])) == ("INPUT_TOO_LONG", "input[0]")
    for body in ({"query": "machine " * 100, "documents": ["x"]}, {"query": "x", "documents": ["x", "machine " * 100]}):
        error = call(colbert_server, "/rerank", body).json()["error"]
        assert error["param"] == "input_tokens"  # vLLM's param, whatever item it is
