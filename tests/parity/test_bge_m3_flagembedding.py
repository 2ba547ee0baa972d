"""BgeM3EmbeddingModel through a live server against FlagEmbedding 1.4.2 (the reference vLLM's
BGE-M3 test uses, vllm-spec 5.1), on the tiny bge_m3 fixture.

The oracle runs in its own venv (.refs/flagembedding, `make refs`): dense vectors, colbert vectors,
lexical weights, lexical / colbert scores and compute_score's weighted scores. The server side is
gRPC (Embed, Pool, StreamPool, Score, Rerank), plus one pass over the REST gateway.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_status import rpc_status

from lateserve.server.app import Server
from lateserve.server.config import ServerConfig
from lateserve.server.domain import ModelLoadError
from lateserve.server.families.registry import family_for, load_source
from lateserve.v1 import common_pb2 as c
from lateserve.v1 import (
    embed_service_pb2,
    embed_service_pb2_grpc,
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
from tests.fixtures.bge_m3 import write_bge_m3
from tests.fixtures.toy_vision import http_json
from tests.live import LiveServer
from tests.oracles.runner import run_oracle

OVERRIDES = {"architectures": ["BgeM3EmbeddingModel"]}
QUERIES = ["What is BGE M3?", "Defination of BM25", "Hi"]
DOCUMENTS = [
    "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector interaction.",
    "BM25 is a bag-of-words retrieval function that ranks a set of documents based on the query terms "
    "appearing in each document",
    "Hi there, how are you?",
]
TEXTS = [*QUERIES, *DOCUMENTS]
WEIGHTS = (0.4, 0.2, 0.4)
# compute_score pairs: 1:N (first query against every document), then N:N (zipped).
PAIRS = [(QUERIES[0], d) for d in DOCUMENTS] + list(zip(QUERIES, DOCUMENTS, strict=True))
COS = 0.9999
REL = 1e-4


def text(t: str) -> c.Input:
    return c.Input(text=t)


@pytest.fixture(scope="module")
def bge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bge_m3(tmp_path_factory.mktemp("bge_m3"))


@pytest.fixture(scope="module")
def oracle(bge_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    request = {
        "model_dir": str(bge_dir),
        "queries": QUERIES,
        "documents": DOCUMENTS,
        "pairs": [list(p) for p in PAIRS],
        "weights": list(WEIGHTS),
    }
    return run_oracle("flagembedding", "flagembedding_oracle.py", request, tmp_path_factory.mktemp("fe"))


@pytest.fixture(scope="module")
def server(bge_dir: Path) -> Iterator[LiveServer]:
    config = ServerConfig(model=str(bge_dir), hf_overrides=OVERRIDES, workers=1, threads_per_worker=1)
    with LiveServer(config) as live:
        yield live


@pytest.fixture(scope="module")
def channel(server: LiveServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield ch


def per_text(oracle: dict[str, np.ndarray], name: str, lengths: str) -> list[np.ndarray]:
    """Split a concatenated oracle array back into one array per text."""
    bounds = np.cumsum(oracle[lengths])[:-1]
    return list(np.split(oracle[name], bounds))


def oracle_colbert(oracle: dict[str, np.ndarray]) -> list[np.ndarray]:
    return per_text(oracle, "query_colbert", "query_colbert_len") + per_text(
        oracle, "document_colbert", "document_colbert_len"
    )


def oracle_lexical(oracle: dict[str, np.ndarray]) -> list[list[tuple[int, str, float]]]:
    out = []
    for s in ("query", "document"):
        ids = per_text(oracle, f"{s}_lex_ids", f"{s}_lex_len")
        tokens = per_text(oracle, f"{s}_lex_tokens", f"{s}_lex_len")
        weights = per_text(oracle, f"{s}_lex_weights", f"{s}_lex_len")
        for i, t, w in zip(ids, tokens, weights, strict=True):
            out.append(list(zip(i.tolist(), t.tolist(), w.tolist(), strict=True)))
    return out


def error_of(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str, str | None, str]:
    details = unpack_details(exc.code(), exc.details() or "", rpc_status.from_call(exc))  # type: ignore[arg-type]
    return details.code, details.reason, details.field, details.message


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)), dtype=np.float64)


# ---------------------------------------------------------------------------------------- vectors


def test_embed_dense_matches_flagembedding(channel: grpc.Channel, oracle: dict[str, np.ndarray]) -> None:
    stub = embed_service_pb2_grpc.EmbedServiceStub(channel)
    resp = stub.Embed(embed_service_pb2.EmbedRequest(inputs=[text(t) for t in TEXTS]))
    got = np.stack([from_tensor(e.data) for e in resp.embeddings])
    want = np.concatenate([oracle["query_dense"], oracle["document_dense"]])
    assert got.shape == want.shape == (len(TEXTS), 32)
    assert cosines(got, want).min() >= COS
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_pool_token_embed_matches_colbert_vecs(channel: grpc.Channel, oracle: dict[str, np.ndarray]) -> None:
    stub = pool_service_pb2_grpc.PoolServiceStub(channel)
    # token_embed is the /pooling default when the task is unset (vLLM picks token_embed first).
    resp = stub.Pool(pool_service_pb2.PoolRequest(inputs=[text(t) for t in TEXTS]))
    tok = tokenize_service_pb2_grpc.TokenizeServiceStub(channel)
    for out, t, want in zip(resp.outputs, TEXTS, oracle_colbert(oracle), strict=True):
        got = from_tensor(out.data)
        n = len(tok.Tokenize(tokenize_service_pb2.TokenizeRequest(prompt=t)).tokens)
        assert got.shape == want.shape == (n - 1, 32)  # BOS dropped, EOS kept
        assert cosines(got, want).min() >= COS
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_pool_token_classify_and_lexical_weights(channel: grpc.Channel, oracle: dict[str, np.ndarray]) -> None:
    stub = pool_service_pb2_grpc.PoolServiceStub(channel)
    tok = tokenize_service_pb2_grpc.TokenizeServiceStub(channel)
    resp = stub.Pool(
        pool_service_pb2.PoolRequest(
            inputs=[text(t) for t in TEXTS], task=c.POOLING_TASK_TOKEN_CLASSIFY, return_lexical_weights=True
        )
    )
    total = 0
    for out, t, want in zip(resp.outputs, TEXTS, oracle_lexical(oracle), strict=True):
        ids = list(tok.Tokenize(tokenize_service_pb2.TokenizeRequest(prompt=t)).tokens)
        total += len(ids)
        data = from_tensor(out.data)
        assert data.shape == (len(ids) - 2,)  # 1-D, BOS and EOS dropped (vLLM)
        got = [(w.token_id, w.token, w.weight) for w in out.lexical_weights]
        assert [g[:2] for g in got] == [w[:2] for w in want]  # same ids, tokens and order
        np.testing.assert_allclose([g[2] for g in got], [w[2] for w in want], rtol=REL)
        # A vLLM client's aggregation (vllm-spec 5.1): tokens minus the leading BOS, zipped with the
        # weights, max per id, specials and zeros dropped, gives the same weights.
        client: dict[int, float] = {}
        for token_id, weight in zip(ids[1:], data.tolist(), strict=False):
            if token_id > 3 and weight > 0:
                client[token_id] = max(client.get(token_id, 0.0), weight)
        assert client == pytest.approx({g[0]: g[2] for g in got}, rel=1e-6)
    assert resp.usage.prompt_tokens == total  # full prompts, filtered tokens included
    hi = resp.outputs[TEXTS.index("Hi")]
    assert len(hi.lexical_weights) == 1 and hi.lexical_weights[0].token == "\u2581Hi"
    assert hi.lexical_weights[0].weight > 0


def test_stream_pool_lexical_weights_on_last_chunk(channel: grpc.Channel) -> None:
    stub = pool_service_pb2_grpc.PoolServiceStub(channel)
    inputs = [text(t) for t in TEXTS]
    unary = stub.Pool(
        pool_service_pb2.PoolRequest(inputs=inputs, task=c.POOLING_TASK_TOKEN_CLASSIFY, return_lexical_weights=True)
    )
    chunks = list(
        stub.StreamPool(
            pool_service_pb2.StreamPoolRequest(
                inputs=inputs, task=c.POOLING_TASK_TOKEN_CLASSIFY, return_lexical_weights=True
            )
        )
    )
    streamed = {m.index: list(m.lexical_weights) for m in chunks if m.last_chunk}
    assert all(not m.lexical_weights for m in chunks if not m.last_chunk)
    assert streamed == {o.index: list(o.lexical_weights) for o in unary.outputs}


def test_weights_without_bos_eos_on_token_ids(channel: grpc.Channel) -> None:
    """Pre-tokenized input without specials: nothing is trimmed, and weights line up with the ids."""
    stub = pool_service_pb2_grpc.PoolServiceStub(channel)
    tok = tokenize_service_pb2_grpc.TokenizeServiceStub(channel)
    ids = list(tok.Tokenize(tokenize_service_pb2.TokenizeRequest(prompt="What is BGE M3?")).tokens)[1:-1]
    resp = stub.Pool(
        pool_service_pb2.PoolRequest(
            inputs=[c.Input(token_ids=c.TokenIds(ids=ids))],
            task=c.POOLING_TASK_TOKEN_CLASSIFY,
            return_lexical_weights=True,
        )
    )
    data = from_tensor(resp.outputs[0].data)
    assert data.shape == (len(ids),)
    want = {i: w for i, w in zip(ids, data.tolist(), strict=True) if w > 0}
    assert {w.token_id: w.weight for w in resp.outputs[0].lexical_weights} == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------------------- scores


def expected_scores(oracle: dict[str, np.ndarray], mode: str) -> tuple[list[float], list[float]]:
    """(1:N scores of the first query, N:N zipped scores) from FlagEmbedding's own functions."""
    n = len(DOCUMENTS)
    if mode in ("dense", "sparse", "colbert"):
        matrix = oracle[{"dense": "dense_scores", "sparse": "lexical_scores", "colbert": "colbert_scores"}[mode]]
        one_n, n_n = matrix[0].tolist(), np.diag(matrix).tolist()
        compute = oracle[f"score_{mode}"]  # compute_score agrees with the encode-side functions
        np.testing.assert_allclose(compute[:n], one_n, rtol=REL, atol=1e-6)
        np.testing.assert_allclose(compute[n:], n_n, rtol=REL, atol=1e-6)
        return one_n, n_n
    weighted = oracle["score_weighted"].tolist()
    return weighted[:n], weighted[n:]


@pytest.mark.parametrize(
    ("score_mode", "oracle_mode"),
    [("", "dense"), ("dense", "dense"), ("sparse", "sparse"), ("colbert", "colbert"), ("weighted:0.4,0.2,0.4", "w")],
)
def test_score_modes_match_flagembedding(
    channel: grpc.Channel, oracle: dict[str, np.ndarray], score_mode: str, oracle_mode: str
) -> None:
    stub = score_service_pb2_grpc.ScoreServiceStub(channel)
    want_1n, want_nn = expected_scores(oracle, oracle_mode)
    one_n = stub.Score(
        score_service_pb2.ScoreRequest(
            queries=[text(QUERIES[0])], documents=[text(d) for d in DOCUMENTS], score_mode=score_mode
        )
    )
    n_n = stub.Score(
        score_service_pb2.ScoreRequest(
            queries=[text(q) for q in QUERIES], documents=[text(d) for d in DOCUMENTS], score_mode=score_mode
        )
    )
    np.testing.assert_allclose([r.score for r in one_n.results], want_1n, rtol=REL, atol=1e-6)
    np.testing.assert_allclose([r.score for r in n_n.results], want_nn, rtol=REL, atol=1e-6)


def test_plain_weighted_is_flagembedding_default_weights(channel: grpc.Channel, oracle: dict[str, np.ndarray]) -> None:
    """ "weighted" alone uses compute_score's default weights 1,1,1: the mean of the three scores."""
    stub = score_service_pb2_grpc.ScoreServiceStub(channel)
    resp = stub.Score(
        score_service_pb2.ScoreRequest(
            queries=[text(q) for q in QUERIES], documents=[text(d) for d in DOCUMENTS], score_mode="weighted"
        )
    )
    want = (np.diag(oracle["dense_scores"]) + np.diag(oracle["lexical_scores"]) + np.diag(oracle["colbert_scores"])) / 3
    np.testing.assert_allclose([r.score for r in resp.results], want, rtol=REL)


def test_rerank_sparse_ordering(channel: grpc.Channel, oracle: dict[str, np.ndarray]) -> None:
    stub = rerank_service_pb2_grpc.RerankServiceStub(channel)
    resp = stub.Rerank(
        rerank_service_pb2.RerankRequest(
            query=text(QUERIES[0]), documents=[text(d) for d in DOCUMENTS], score_mode="sparse"
        )
    )
    want = oracle["lexical_scores"][0]
    assert [r.index for r in resp.results] == sorted(range(len(DOCUMENTS)), key=lambda i: -want[i])
    np.testing.assert_allclose([r.relevance_score for r in resp.results], sorted(want, reverse=True), rtol=REL)
    assert resp.results[0].index == 0  # the BGE M3 document shares the query's terms


# ------------------------------------------------------------------------------------------ HTTP


def post(server: LiveServer, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    return http_json(server.http_url, path, body)


def test_http_routes_from_the_vllm_docs(server: LiveServer, channel: grpc.Channel) -> None:
    """The commands of vLLM's BAAI/bge-m3 docs: /v1/embeddings, /pooling token_classify and token_embed."""
    if not server.config.gateway or not server.server.http_port:
        pytest.skip("the REST gateway is not running in this server")
    inputs = ["What is BGE M3?", "Definition of BM25"]
    tok = tokenize_service_pb2_grpc.TokenizeServiceStub(channel)
    lengths = [len(tok.Tokenize(tokenize_service_pb2.TokenizeRequest(prompt=t)).tokens) for t in inputs]
    status, body = post(server, "/v1/embeddings", {"input": inputs})
    assert status == 200, body
    assert [len(d["embedding"]) for d in body["data"]] == [32, 32]
    status, body = post(server, "/pooling", {"task": "token_classify", "input": inputs})
    assert status == 200, body
    assert [len(d["data"]) for d in body["data"]] == [n - 2 for n in lengths]
    assert all(isinstance(x, float) for x in body["data"][0]["data"])
    assert body["usage"]["prompt_tokens"] == sum(lengths)
    assert "lexical_weights" not in body["data"][0]
    body_lw = {"task": "token_classify", "input": inputs, "return_lexical_weights": True}
    status, body = post(server, "/pooling", body_lw)
    assert status == 200, body
    first = body["data"][0]["lexical_weights"]
    assert first and {"token_id", "token", "weight"} == set(first[0]) and all(w["weight"] > 0 for w in first)
    status, body = post(server, "/pooling", {"task": "token_embed", "input": inputs})
    assert status == 200, body
    assert [(len(d["data"]), len(d["data"][0])) for d in body["data"]] == [(n - 1, 32) for n in lengths]


# ------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("score_mode", ["nope", "weighted:1,2", "weighted:1,-1,1", "weighted:0,0,0", "dense:1"])
def test_bad_score_mode_is_invalid_argument(channel: grpc.Channel, score_mode: str) -> None:
    stub = score_service_pb2_grpc.ScoreServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(score_service_pb2.ScoreRequest(queries=[text("a")], documents=[text("b")], score_mode=score_mode))
    code, _, field, message = error_of(err.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and field == "score_mode", message
    assert score_mode in message


def test_lexical_weights_need_token_classify(channel: grpc.Channel) -> None:
    stub = pool_service_pb2_grpc.PoolServiceStub(channel)
    for task in (c.POOLING_TASK_TOKEN_EMBED, c.POOLING_TASK_EMBED):
        with pytest.raises(grpc.RpcError) as err:
            stub.Pool(pool_service_pb2.PoolRequest(inputs=[text("Hi")], task=task, return_lexical_weights=True))
        code, _, field, message = error_of(err.value)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and field == "return_lexical_weights", message


def test_lexical_weights_on_a_model_without_sparse_head(colbert_channel: grpc.Channel) -> None:
    stub = pool_service_pb2_grpc.PoolServiceStub(colbert_channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.Pool(
            pool_service_pb2.PoolRequest(
                inputs=[text("Hi")], task=c.POOLING_TASK_TOKEN_CLASSIFY, return_lexical_weights=True
            )
        )
    code, reason, field, _ = error_of(err.value)
    assert (code, reason, field) == (grpc.StatusCode.INVALID_ARGUMENT, "UNSUPPORTED_TASK", "task")
    with pytest.raises(grpc.RpcError) as err:
        stub.Pool(pool_service_pb2.PoolRequest(inputs=[text("Hi")], return_lexical_weights=True))
    code, _, field, _ = error_of(err.value)
    assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "return_lexical_weights")
    score = score_service_pb2_grpc.ScoreServiceStub(colbert_channel)
    with pytest.raises(grpc.RpcError) as err:
        score.Score(score_service_pb2.ScoreRequest(queries=[text("a")], documents=[text("b")], score_mode="sparse"))
    code, _, field, _ = error_of(err.value)
    assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "score_mode")


# ---------------------------------------------------------------------------------------- loading


def test_without_the_override_startup_fails_loudly(bge_dir: Path) -> None:
    """config.json says XLMRobertaModel: never served as a headless model with random heads."""
    with pytest.raises(ModelLoadError, match=r'XLMRobertaModel.*\["BgeM3EmbeddingModel"\]'):
        asyncio.run(Server(ServerConfig(model=str(bge_dir), workers=1, threads_per_worker=1)).start())


@pytest.mark.parametrize("missing", ["colbert_linear.pt", "sparse_linear.pt"])
def test_missing_head_file_is_named(bge_dir: Path, tmp_path: Path, missing: str) -> None:
    broken = tmp_path / "bge"
    shutil.copytree(bge_dir, broken)
    (broken / missing).unlink()
    family = family_for(load_source(str(broken), hf_overrides=OVERRIDES))
    with pytest.raises(ModelLoadError, match=missing):
        family.spec()
    with pytest.raises(ModelLoadError, match=missing):
        family.runner("cpu", "float32")


def test_wrong_head_shape_or_keys_fail_strictly(bge_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "bge"
    shutil.copytree(bge_dir, broken)
    torch.save({"weight": torch.zeros(1, 32)}, broken / "sparse_linear.pt")  # no bias
    family = family_for(load_source(str(broken), hf_overrides=OVERRIDES))
    with pytest.raises(ModelLoadError, match=r"missing weights: 1: sparse_linear\.bias"):
        family.runner("cpu", "float32")
    torch.save({"weight": torch.zeros(2, 32), "bias": torch.zeros(2)}, broken / "sparse_linear.pt")
    with pytest.raises(ModelLoadError, match="sparse_linear"):
        family.runner("cpu", "float32")
