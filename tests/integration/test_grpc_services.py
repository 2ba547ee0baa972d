"""Every gRPC service against a live server with real worker processes, checked against an
independent plain-transformers reference (tests/reference.py)."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from lateserve.v1 import common_pb2 as c
from lateserve.v1 import (
    embed_service_pb2,
    embed_service_pb2_grpc,
    info_service_pb2,
    info_service_pb2_grpc,
    pool_service_pb2,
    pool_service_pb2_grpc,
    rerank_service_pb2,
    rerank_service_pb2_grpc,
    score_service_pb2,
    score_service_pb2_grpc,
    tokenize_service_pb2,
    tokenize_service_pb2_grpc,
)
from lateserve.wire.status import unpack_details
from lateserve.wire.tensors import from_tensor
from tests.reference import BertColbertReference

MODEL = "answerdotai/answerai-colbert-small-v1"
QUERY = "What is machine learning?"
DOCS = [
    "Machine learning is a subset of artificial intelligence.",
    "Python is a programming language.",
    "Deep learning uses neural networks.",
]


def text(t: str) -> c.Input:
    return c.Input(text=t)


@pytest.fixture(scope="module")
def reference(colbert_dir: Path) -> BertColbertReference:
    return BertColbertReference(colbert_dir)


def error_of(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str, str | None, str]:
    call = exc
    details = unpack_details(call.code(), call.details() or "", rpc_status.from_call(call))  # type: ignore[arg-type]
    return details.code, details.reason, details.field, details.message


def test_pool_token_embed_matches_transformers(colbert_channel: grpc.Channel, reference: BertColbertReference) -> None:
    stub = pool_service_pb2_grpc.PoolServiceStub(colbert_channel)
    texts = [QUERY, *DOCS, "Paris"]
    resp = stub.Pool(pool_service_pb2.PoolRequest(model=MODEL, inputs=[text(t) for t in texts]))
    assert resp.id.startswith("pooling-") and resp.model == MODEL
    assert [o.index for o in resp.outputs] == list(range(len(texts)))
    for out, t in zip(resp.outputs, texts, strict=True):
        got, want = from_tensor(out.data), reference.token_embed(t)
        assert got.shape == want.shape == (reference.num_tokens(t), 24)
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert resp.usage.prompt_tokens == sum(reference.num_tokens(t) for t in texts)
    assert resp.timings.total_ns > 0 and resp.timings.inference_ns > 0


def test_score_one_to_n_and_n_to_n_match_reference(
    colbert_channel: grpc.Channel, reference: BertColbertReference
) -> None:
    stub = score_service_pb2_grpc.ScoreServiceStub(colbert_channel)
    one_n = stub.Score(score_service_pb2.ScoreRequest(queries=[text(QUERY)], documents=[text(d) for d in DOCS]))
    want = [reference.maxsim(QUERY, d) for d in DOCS]
    np.testing.assert_allclose([r.score for r in one_n.results], want, rtol=1e-5)
    # The query is encoded once and counted once (vLLM 0.32: query + sum of documents).
    assert one_n.usage.prompt_tokens == reference.num_tokens(QUERY) + sum(reference.num_tokens(d) for d in DOCS)
    queries = ["what is python", "neural networks", QUERY]
    n_n = stub.Score(
        score_service_pb2.ScoreRequest(queries=[text(q) for q in queries], documents=[text(d) for d in DOCS])
    )
    np.testing.assert_allclose(
        [r.score for r in n_n.results], [reference.maxsim(q, d) for q, d in zip(queries, DOCS, strict=True)], rtol=1e-5
    )
    one_one = stub.Score(score_service_pb2.ScoreRequest(queries=[text(QUERY)], documents=[text(DOCS[0])]))
    assert one_one.results[0].score == pytest.approx(want[0], rel=1e-5)


def test_rerank_sorts_cuts_and_echoes(colbert_channel: grpc.Channel, reference: BertColbertReference) -> None:
    stub = rerank_service_pb2_grpc.RerankServiceStub(colbert_channel)
    req = rerank_service_pb2.RerankRequest(model=MODEL, query=text(QUERY), documents=[text(d) for d in DOCS], top_n=2)
    resp = stub.Rerank(req)
    want = [reference.maxsim(QUERY, d) for d in DOCS]
    order = sorted(range(3), key=lambda i: -want[i])[:2]
    assert [r.index for r in resp.results] == order
    assert [r.document.text for r in resp.results] == [DOCS[i] for i in order]
    np.testing.assert_allclose([r.relevance_score for r in resp.results], [want[i] for i in order], rtol=1e-5)
    assert resp.id.startswith("score-")
    assert resp.usage.prompt_tokens == reference.num_tokens(QUERY) + sum(reference.num_tokens(d) for d in DOCS)
    everything = stub.Rerank(rerank_service_pb2.RerankRequest(query=text(QUERY), documents=[text(d) for d in DOCS]))
    assert len(everything.results) == 3


def test_stream_pool_chunks_reassemble_to_unary(colbert_channel: grpc.Channel) -> None:
    pool = pool_service_pb2_grpc.PoolServiceStub(colbert_channel)
    texts = [" ".join(DOCS), QUERY]
    unary = pool.Pool(pool_service_pb2.PoolRequest(inputs=[text(t) for t in texts]))
    rows: dict[int, list[np.ndarray]] = {0: [], 1: []}
    messages = list(
        pool.StreamPool(pool_service_pb2.StreamPoolRequest(inputs=[text(t) for t in texts], max_chunk_bytes=200))
    )
    for m in messages:
        assert m.row_offset == sum(len(r) for r in rows[m.index])
        rows[m.index].append(from_tensor(m.data))
    assert len(messages) > 2  # 200 bytes is 2 rows of 24 floats: items were split
    assert messages[-1].last_chunk and messages[-1].usage.prompt_tokens == unary.usage.prompt_tokens
    for i, out in enumerate(unary.outputs):
        np.testing.assert_array_equal(np.concatenate(rows[i]), from_tensor(out.data))


@pytest.mark.parametrize("dtype", [c.DTYPE_FLOAT16, c.DTYPE_BFLOAT16])
def test_pool_half_precision_outputs(colbert_channel: grpc.Channel, dtype: int) -> None:
    pool = pool_service_pb2_grpc.PoolServiceStub(colbert_channel)
    full = from_tensor(pool.Pool(pool_service_pb2.PoolRequest(inputs=[text(QUERY)])).outputs[0].data)
    half = pool.Pool(pool_service_pb2.PoolRequest(inputs=[text(QUERY)], dtype=dtype)).outputs[0].data
    assert half.dtype == dtype and len(half.data) == full.size * 2
    np.testing.assert_allclose(from_tensor(half), full, atol=1e-2)


def test_tokenize_detokenize_and_info(colbert_channel: grpc.Channel, reference: BertColbertReference) -> None:
    tok = tokenize_service_pb2_grpc.TokenizeServiceStub(colbert_channel)
    resp = tok.Tokenize(tokenize_service_pb2.TokenizeRequest(prompt=QUERY, return_token_strs=True))
    assert list(resp.tokens) == reference.tokenizer(QUERY)["input_ids"]
    assert resp.count == len(resp.tokens) and resp.max_model_len == 64
    assert resp.token_strs[0] == "[CLS]" and resp.token_strs[-1] == "[SEP]"
    bare = tok.Tokenize(tokenize_service_pb2.TokenizeRequest(prompt=QUERY, add_special_tokens=False))
    assert list(bare.tokens) == list(resp.tokens[1:-1])
    back = tok.Detokenize(tokenize_service_pb2.DetokenizeRequest(tokens=bare.tokens))
    assert back.prompt == QUERY.lower().replace("?", " ?") or back.prompt.startswith("what is machine")
    info = info_service_pb2_grpc.InfoServiceStub(colbert_channel).GetInfo(info_service_pb2.GetInfoRequest())
    (model,) = info.models
    assert model.id == MODEL and model.architecture == "HF_ColBERT"
    assert model.kind == c.MODEL_KIND_LATE_INTERACTION and model.token_dim == 24 and model.max_model_len == 64
    assert list(model.tasks) == [c.POOLING_TASK_TOKEN_EMBED] and model.workers == 1 and model.device == "cpu"


def test_health_per_service_and_reflection(colbert_channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(colbert_channel)
    status = {
        name: health.Check(health_pb2.HealthCheckRequest(service=name)).status
        for name in ("", "lateserve.v1.RerankService", "lateserve.v1.PoolService", "lateserve.v1.EmbedService")
    }
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert status == {
        "": serving,
        "lateserve.v1.RerankService": serving,
        "lateserve.v1.PoolService": serving,
        "lateserve.v1.EmbedService": not_serving,  # a ColBERT model has no embed task
    }
    refl = reflection_pb2_grpc.ServerReflectionStub(colbert_channel)
    (answer,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in answer.list_services_response.service}
    assert {"lateserve.v1.RerankService", "lateserve.v1.ScoreService", "grpc.health.v1.Health"} <= names


def expect_error(fn, *args) -> tuple[grpc.StatusCode, str, str | None, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        fn(*args)
    return error_of(info.value)


def test_bad_input_gets_the_right_status(colbert_channel: grpc.Channel) -> None:
    score = score_service_pb2_grpc.ScoreServiceStub(colbert_channel).Score
    pool = pool_service_pb2_grpc.PoolServiceStub(colbert_channel).Pool
    embed = embed_service_pb2_grpc.EmbedServiceStub(colbert_channel).Embed
    rerank = rerank_service_pb2_grpc.RerankServiceStub(colbert_channel).Rerank
    S = score_service_pb2.ScoreRequest
    code, reason, field, msg = expect_error(score, S(queries=[text("a"), text("b")], documents=[text("c")]))
    assert (code, reason, msg) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "PAIRING_MISMATCH",
        "Input lengths must be either 1:1, 1:N or N:N",
    )
    code, reason, field, msg = expect_error(rerank, rerank_service_pb2.RerankRequest(query=text("q")))
    assert (code, msg) == (grpc.StatusCode.INVALID_ARGUMENT, "At least one text_pair element must be given")
    code, reason, field, msg = expect_error(score, S(model="nope", queries=[text("a")], documents=[text("b")]))
    assert (code, reason, msg) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", "The model `nope` does not exist.")
    code, reason, field, msg = expect_error(
        pool, pool_service_pb2.PoolRequest(inputs=[text("x")], task=c.POOLING_TASK_EMBED)
    )
    assert (code, reason, field) == (grpc.StatusCode.INVALID_ARGUMENT, "UNSUPPORTED_TASK", "task")
    assert msg.startswith("Unsupported task: 'embed'")
    code, reason, field, msg = expect_error(embed, embed_service_pb2.EmbedRequest(inputs=[text("x")]))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "UNSUPPORTED_TASK")
    long_text = "machine " * 100
    code, reason, field, msg = expect_error(pool, pool_service_pb2.PoolRequest(inputs=[text(long_text)]))
    assert (code, reason, field) == (grpc.StatusCode.INVALID_ARGUMENT, "INPUT_TOO_LONG", "input[0]")
    assert "Please reduce the length of the input prompt" in msg and "maximum context length is 64" in msg
    opts = c.EncodeOptions(truncate_prompt_tokens=65)
    code, reason, field, msg = expect_error(pool, pool_service_pb2.PoolRequest(inputs=[text("x")], options=opts))
    assert (reason, field) == ("TRUNCATION_TOO_LARGE", "truncate_prompt_tokens")
    assert "Please, select a smaller truncation size." in msg
    code, reason, field, msg = expect_error(pool, pool_service_pb2.PoolRequest(inputs=[c.Input()]))
    assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "input[0]")
    image = c.Input(
        content=c.MultiModalContent(parts=[c.ContentPart(image_url=c.ImageUrl(url="data:image/png;base64,"))])
    )
    code, reason, field, msg = expect_error(pool, pool_service_pb2.PoolRequest(inputs=[image]))
    # An image sent to a text-only model is bad input (400), naming the part (issue 8; was UNIMPLEMENTED).
    assert (code, reason, field) == (grpc.StatusCode.INVALID_ARGUMENT, "UNSUPPORTED_INPUT", "input[0].content[0]")


def test_truncation_keeps_the_requested_end(colbert_channel: grpc.Channel, reference: BertColbertReference) -> None:
    pool = pool_service_pb2_grpc.PoolServiceStub(colbert_channel).Pool
    long_text = "machine learning " * 50
    # As HF tokenizers truncate (and vLLM with them): text tokens go, [CLS] and [SEP] stay.
    cls, *body, sep = reference.tokenizer(long_text)["input_ids"]
    for side, keep in (
        (c.TRUNCATION_SIDE_LEFT, [cls, *body[-62:], sep]),
        (c.TRUNCATION_SIDE_RIGHT, [cls, *body[:62], sep]),
    ):
        opts = c.EncodeOptions(truncate_prompt_tokens=-1, truncation_side=side)
        got = pool(pool_service_pb2.PoolRequest(inputs=[text(long_text)], options=opts))
        want = pool(pool_service_pb2.PoolRequest(inputs=[c.Input(token_ids=c.TokenIds(ids=keep))]))
        np.testing.assert_allclose(from_tensor(got.outputs[0].data), from_tensor(want.outputs[0].data), atol=1e-6)
        assert got.usage.prompt_tokens == 64
