"""The Python client (sync and asyncio) against a live server with real workers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lateserve.client import (
    AsyncLateserveClient,
    InvalidArgumentError,
    LateserveClient,
    NotFoundError,
    UnsupportedTaskError,
)
from tests.live import LiveServer
from tests.reference import BertColbertReference

QUERY = "What is machine learning?"
DOCS = ["Machine learning is a subset of artificial intelligence.", "The weather is sunny."]


@pytest.fixture(scope="module")
def reference(colbert_dir: Path) -> BertColbertReference:
    return BertColbertReference(colbert_dir)


def test_sync_client_round_trip(colbert_server: LiveServer, reference: BertColbertReference) -> None:
    with LateserveClient(colbert_server.grpc_target, timeout=30) as client:
        ranking = client.rerank(QUERY, DOCS, top_n=1)
        want = [reference.maxsim(QUERY, d) for d in DOCS]
        best = int(np.argmax(want))
        assert [r.index for r in ranking.results] == [best]
        assert ranking.results[0].relevance_score == pytest.approx(want[best], rel=1e-5)
        scores = client.score(QUERY, DOCS)
        np.testing.assert_allclose(scores.scores, want, rtol=1e-5)
        pooled = client.pool([QUERY, DOCS[0]])
        for array, text in zip(pooled.arrays, [QUERY, DOCS[0]], strict=True):
            np.testing.assert_allclose(array, reference.token_embed(text), atol=1e-5)
        streamed = dict(client.pool_stream([QUERY, DOCS[0]], max_chunk_bytes=100))
        np.testing.assert_array_equal(streamed[1], pooled.arrays[1])
        tokens = client.tokenize(QUERY, return_token_strs=True)
        assert tokens.tokens == reference.tokenizer(QUERY)["input_ids"]
        info = client.info()
        assert info.models[0].architecture == "HF_ColBERT"
        with pytest.raises(UnsupportedTaskError):
            client.embed(["x"])
        with pytest.raises(NotFoundError):
            client.score(QUERY, DOCS, model="nope")


async def test_async_client_round_trip(colbert_server: LiveServer, reference: BertColbertReference) -> None:
    async with AsyncLateserveClient(colbert_server.grpc_target, timeout=30) as client:
        ranking = await client.rerank(QUERY, DOCS)
        assert ranking.results[0].document in DOCS
        assert ranking.usage.prompt_tokens == sum(reference.num_tokens(t) for t in [QUERY, *DOCS])
        pooled = await client.pool([QUERY])
        np.testing.assert_allclose(pooled.arrays[0], reference.token_embed(QUERY), atol=1e-5)
        chunks = [item async for item in client.pool_stream([QUERY, DOCS[1]], max_chunk_bytes=100)]
        assert [i for i, _ in chunks] == [0, 1]


def test_client_per_side_token_limits(colbert_server: LiveServer, reference: BertColbertReference) -> None:
    long_query, long_doc = "learning machines " * 100, "deep learning " * 100  # both over max_model_len 64
    ids = reference.tokenizer(long_query, add_special_tokens=False)["input_ids"][:5]
    short_query = reference.tokenizer.decode(ids)
    doc_ids = reference.tokenizer(long_doc, add_special_tokens=False)["input_ids"][:4]
    short_doc = reference.tokenizer.decode(doc_ids)
    want = reference.maxsim(short_query, short_doc)
    with LateserveClient(colbert_server.grpc_target, timeout=30) as client:
        with pytest.raises(InvalidArgumentError):
            client.score(long_query, [long_doc])
        got = client.score(long_query, [long_doc], max_tokens_per_query=5, max_tokens_per_doc=4)
        assert got.scores[0] == pytest.approx(want, rel=1e-5)
        ranking = client.rerank(long_query, [long_doc], max_tokens_per_query=5, max_tokens_per_doc=4)
        assert ranking.results[0].relevance_score == pytest.approx(want, rel=1e-5)
        with pytest.raises(InvalidArgumentError) as info:
            client.rerank(QUERY, DOCS, max_tokens_per_query=-1)
        assert info.value.field == "max_tokens_per_query"
        assert info.value.message == "max_tokens_per_query must be >= 0 (0: no truncation), got -1"
