"""Token pooling (`pool_factor`) and `mask_non_image_embeddings` on /pooling and gRPC Pool / StreamPool.

Oracle: colpali-engine 0.3.18's `HierarchicalTokenPooler` (tests/oracles/colpali_oracle.py, pooling mode, in
.refs/colpali), fed the unpooled token vectors a live server returns for the tiny Tomoro ColQwen3 checkpoint
(text, one image with text, two images with text). The pooled vectors lateserve returns over HTTP, gRPC Pool
and gRPC StreamPool for pool_factor 1, 2 and 3 must match colpali's as sets (each server row paired with one
oracle row, cosine >= 0.9999); on seeded random vectors (with duplicated rows, the tie case) the in-process
pooler also reproduces colpali's cluster labels and row order exactly.

mask_non_image_embeddings: the rows returned are the unmasked rows at the `<|image_pad|>` positions of the
prompt (ids from tests/reference_qwen3vl.py, transformers' tokenizer and image processor), so their count is
the image token count; an input without images comes back whole (colpali masks only inputs with pixel
values); with pool_factor the mask applies first. Bad values are refused naming the field.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest

from lateserve.server.config import ServerConfig
from lateserve.server.domain import InvalidArgument, Modality, ModelKind, ModelSpec, Task
from lateserve.server.engine.token_pooling import cluster_tokens, pool_tokens
from lateserve.server.services.pool import token_reduction
from lateserve.v1 import common_pb2 as c
from lateserve.v1 import pool_service_pb2, pool_service_pb2_grpc
from lateserve.wire.tensors import from_tensor
from tests.fixtures.colqwen3 import token_id, write_colqwen3_tomoro
from tests.fixtures.toy_vision import http_json
from tests.live import LiveServer
from tests.oracles.runner import run_oracle
from tests.parity.common import IMAGES, QUERIES, json_parts, proto_input
from tests.reference_qwen3vl import Part, Qwen3VLReference

FACTORS = (1, 2, 3)
MIN_COSINE = 0.9999
INPUTS: list[list[Part]] = [
    [QUERIES[0]],
    [IMAGES["odd"], "Describe the image."],
    [IMAGES["jpeg"], IMAGES["rgba"], "Two images, and a longer text after them to pool."],
]
"""gRPC inputs (content parts, vLLM's raw prompt); over HTTP the same parts go as `input` (text) or as a
one-message chat (/pooling `input` takes text only)."""


def chat(parts: list[Part]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": json_parts(parts)}]


def http_body(parts: list[Part], **extra: Any) -> dict[str, Any]:
    if len(parts) == 1 and isinstance(parts[0], str):
        return {"input": parts[0], "task": "token_embed", **extra}
    return {"messages": chat(parts), "task": "token_embed", **extra}


def http_vectors(live: LiveServer, parts: list[Part], **extra: Any) -> np.ndarray:
    status, body = http_json(live.http_url, "/pooling", http_body(parts, **extra))
    assert status == 200, body
    return np.asarray(body["data"][0]["data"], dtype=np.float32)


def grpc_pool(live: LiveServer, **fields: Any) -> list[np.ndarray]:
    with grpc.insecure_channel(live.grpc_target) as channel:
        stub = pool_service_pb2_grpc.PoolServiceStub(channel)
        request = pool_service_pb2.PoolRequest(inputs=[proto_input(p) for p in INPUTS], **fields)
        reply = stub.Pool(request, timeout=120)
    return [from_tensor(o.data) for o in reply.outputs]


def grpc_stream_pool(live: LiveServer, **fields: Any) -> list[np.ndarray]:
    """StreamPool in small chunks, reassembled per input (checking total_rows)."""
    chunks: dict[int, list[np.ndarray]] = {}
    with grpc.insecure_channel(live.grpc_target) as channel:
        stub = pool_service_pb2_grpc.PoolServiceStub(channel)
        request = pool_service_pb2.StreamPoolRequest(
            inputs=[proto_input(p) for p in INPUTS], max_chunk_bytes=256, **fields
        )
        totals = {}
        for message in stub.StreamPool(request, timeout=120):
            chunks.setdefault(message.index, []).append(from_tensor(message.data))
            totals[message.index] = message.total_rows
    out = [np.concatenate(chunks[i]) for i in range(len(INPUTS))]
    assert [len(o) for o in out] == [totals[i] for i in range(len(INPUTS))]
    return out


def assert_same_set(got: np.ndarray, expected: np.ndarray) -> None:
    """Equal as sets of vectors: every row paired with a distinct expected row at cosine >= MIN_COSINE."""
    assert got.shape == expected.shape, (got.shape, expected.shape)
    g = got / np.linalg.norm(got, axis=1, keepdims=True)
    e = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    cosine = g @ e.T
    pairs = cosine.argmax(axis=1)
    assert sorted(pairs.tolist()) == list(range(len(expected))), "not a one-to-one matching"
    assert cosine[np.arange(len(got)), pairs].min() >= MIN_COSINE


@pytest.fixture(scope="module")
def tomoro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_colqwen3_tomoro(tmp_path_factory.mktemp("tomoro"))


@pytest.fixture(scope="module")
def live(tomoro: Path) -> Iterator[LiveServer]:
    config = ServerConfig(
        model=str(tomoro), served_model_name="tiny-tomoro", workers=1, threads_per_worker=1, max_model_len=4096
    )
    with LiveServer(config) as server:
        yield server


@pytest.fixture(scope="module")
def unpooled(live: LiveServer) -> dict[str, list[np.ndarray]]:
    """The vectors without either option: HTTP (input / chat) and gRPC (content parts)."""
    return {"http": [http_vectors(live, parts) for parts in INPUTS], "grpc": grpc_pool(live)}


@pytest.fixture(scope="module")
def oracle(unpooled: dict[str, list[np.ndarray]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    work = tmp_path_factory.mktemp("pool_oracle")
    rng = np.random.default_rng(7)
    arrays = {f"{how}{i}": v for how, vectors in unpooled.items() for i, v in enumerate(vectors)}
    for n in (5, 40, 257):
        random = rng.normal(size=(n, 24)).astype(np.float32)
        arrays[f"random{n}"] = random / np.linalg.norm(random, axis=1, keepdims=True)
    arrays["duplicates"] = arrays["random5"][[0, 1, 0, 2, 3, 3, 4, 1, 0, 2, 4, 4]]
    np.savez(work / "vectors.npz", **arrays)
    request = {"pool": {"vectors": str(work / "vectors.npz"), "pool_factors": [*FACTORS, 5]}}
    out = run_oracle("colpali", "colpali_oracle.py", request, work)
    return {**out, **{f"in/{k}": v for k, v in arrays.items()}}


@pytest.mark.parametrize("name", ["random5", "random40", "random257", "duplicates"])
@pytest.mark.parametrize("factor", [*FACTORS, 5])
def test_pooler_reproduces_colpali_labels_and_order(oracle: dict[str, np.ndarray], name: str, factor: int) -> None:
    vectors = oracle[f"in/{name}"]
    expected = oracle[f"pool/{name}/{factor}"]
    pooled = pool_tokens(vectors, factor)
    assert pooled.shape == expected.shape
    most = max(len(vectors) // factor, 1) if factor > 1 else len(vectors)
    # Ties in merge height (duplicated rows) can leave fewer clusters than the bound, in colpali too.
    assert len(pooled) == most if name != "duplicates" else len(pooled) <= most
    np.testing.assert_allclose(pooled, expected, atol=1e-6)
    if factor > 1:
        labels = np.empty(len(vectors), dtype=np.int64)
        for row, members in enumerate(cluster_tokens(vectors, factor)):
            labels[members] = row
        np.testing.assert_array_equal(labels, oracle[f"pool/{name}/{factor}/labels"])


@pytest.mark.parametrize("factor", FACTORS)
def test_http_and_grpc_pooling_equal_colpali(
    live: LiveServer, unpooled: dict[str, list[np.ndarray]], oracle: dict[str, np.ndarray], factor: int
) -> None:
    for i, parts in enumerate(INPUTS):
        got = http_vectors(live, parts, pool_factor=factor)
        n = len(unpooled["http"][i])
        assert len(got) == (n if factor == 1 else max(n // factor, 1))
        assert_same_set(got, oracle[f"pool/http{i}/{factor}"])
    expected = [oracle[f"pool/grpc{i}/{factor}"] for i in range(len(INPUTS))]
    for got_all in (grpc_pool(live, pool_factor=factor), grpc_stream_pool(live, pool_factor=factor)):
        for got, want in zip(got_all, expected, strict=True):
            assert_same_set(got, want)
    if factor == 1:  # no pooling: the vectors as without the option, in order
        for got, want in zip(grpc_pool(live, pool_factor=1), unpooled["grpc"], strict=True):
            np.testing.assert_allclose(got, want, atol=1e-6)


def test_unnormalized_pooling_keeps_the_plain_means(live: LiveServer) -> None:
    raw = http_vectors(live, INPUTS[1], normalize=False)
    pooled = http_vectors(live, INPUTS[1], normalize=False, pool_factor=2)
    means = [raw[m].mean(axis=0) for m in cluster_tokens(raw, 2)]
    # Clusters come from the vectors as returned (colpali's 1 - E E^T), so the server's are these.
    assert_same_set(pooled, np.stack(means))
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), np.linalg.norm(np.stack(means), axis=1), rtol=1e-5)


@pytest.fixture(scope="module")
def image_positions(tomoro: Path) -> dict[str, list[np.ndarray]]:
    """Where `<|image_pad|>` sits in each prompt: vLLM's raw prompt (gRPC content) and the chat template's."""
    reference = Qwen3VLReference(tomoro)
    pad = token_id("<|image_pad|>")
    positions: dict[str, list[np.ndarray]] = {"http": [], "grpc": []}
    for parts in INPUTS:
        positions["grpc"].append(np.flatnonzero(np.asarray(reference.prompt(parts)[0]) == pad))
        if len(parts) == 1 and isinstance(parts[0], str):
            ids = reference.prompt(parts)[0]
        else:
            template = [{"type": "image"} if isinstance(p, bytes) else {"type": "text", "text": p} for p in parts]
            images = [p for p in parts if isinstance(p, bytes)]
            ids = reference.chat_ids([{"role": "user", "content": template}], images)[0]
        positions["http"].append(np.flatnonzero(np.asarray(ids) == pad))
    return positions


def test_mask_non_image_embeddings(
    live: LiveServer, unpooled: dict[str, list[np.ndarray]], image_positions: dict[str, list[np.ndarray]]
) -> None:
    expected: dict[str, list[np.ndarray]] = {}
    for how in ("http", "grpc"):
        # No image: returned whole (colpali masks only inputs with pixel values).
        expected[how] = [
            vectors[positions] if len(positions) else vectors
            for positions, vectors in zip(image_positions[how], unpooled[how], strict=True)
        ]
        counts = [len(p) for p in image_positions[how]]
        assert counts[0] == 0 and counts[1] > 0 and counts[2] > counts[1]
        assert [len(e) for e in expected[how]] == [len(unpooled[how][0]), *counts[1:]]
    for i, parts in enumerate(INPUTS):
        got = http_vectors(live, parts, mask_non_image_embeddings=True)
        np.testing.assert_allclose(got, expected["http"][i], atol=1e-6)
    for got_all in (
        grpc_pool(live, mask_non_image_embeddings=True),
        grpc_stream_pool(live, mask_non_image_embeddings=True),
    ):
        for got, want in zip(got_all, expected["grpc"], strict=True):
            np.testing.assert_allclose(got, want, atol=1e-6)
    # Masked, then pooled: the image rows' clusters.
    both = grpc_pool(live, mask_non_image_embeddings=True, pool_factor=2)
    for got, want in zip(both, expected["grpc"], strict=True):
        assert_same_set(got, pool_tokens(want, 2))
    status, body = http_json(
        live.http_url, "/pooling", http_body(INPUTS[2], mask_non_image_embeddings=True, pool_factor=3)
    )
    assert status == 200, body
    assert_same_set(np.asarray(body["data"][0]["data"], dtype=np.float32), pool_tokens(expected["http"][2], 3))


def test_bad_values_are_refused_naming_the_field(live: LiveServer) -> None:
    for extra, param in (
        ({"pool_factor": 0}, "pool_factor"),
        ({"pool_factor": -2}, "pool_factor"),
        ({"pool_factor": 2, "task": "embed"}, "pool_factor"),
        ({"mask_non_image_embeddings": True, "task": "token_classify"}, "mask_non_image_embeddings"),
    ):
        body = {"input": QUERIES[0], "task": "token_embed", **extra}
        status, reply = http_json(live.http_url, "/pooling", body)
        assert status == 400 and reply["error"]["param"] == param, (extra, reply)
    for extra in ({"pool_factor": 2**40}, {"pool_factor": "two"}, {"mask_non_image_embeddings": "maybe"}):
        status, reply = http_json(live.http_url, "/pooling", {"input": QUERIES[0], **extra})
        assert status == 400, (extra, reply)
    with grpc.insecure_channel(live.grpc_target) as channel:
        stub = pool_service_pb2_grpc.PoolServiceStub(channel)
        for call, request in (
            (stub.Pool, pool_service_pb2.PoolRequest(inputs=[c.Input(text="x")], pool_factor=0)),
            (stub.Pool, pool_service_pb2.PoolRequest(inputs=[c.Input(text="x")], pool_factor=-1)),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                call(request, timeout=60)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "pool_factor" in (refused.value.details() or "")
        stream = pool_service_pb2.StreamPoolRequest(inputs=[c.Input(text="x")], pool_factor=0)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.StreamPool(stream, timeout=60))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _model(spec: ModelSpec) -> Any:
    return SimpleNamespace(engine=SimpleNamespace(spec=spec))


def test_only_token_embed_on_late_interaction_models() -> None:
    text_colbert = ModelSpec.late_interaction("HF_ColBERT", 96, 512)
    vision = ModelSpec(
        architecture="ColQwen3",
        kind=ModelKind.LATE_INTERACTION,
        tasks=frozenset({Task.TOKEN_EMBED}),
        default_task=Task.TOKEN_EMBED,
        token_dim=24,
        embed_dim=0,
        max_model_len=4096,
        modalities=frozenset({Modality.TEXT, Modality.IMAGE}),
    )
    bi_encoder = ModelSpec(
        architecture="BertModel",
        kind=ModelKind.BI_ENCODER,
        tasks=frozenset({Task.TOKEN_EMBED, Task.EMBED}),
        default_task=Task.EMBED,
        token_dim=384,
        embed_dim=384,
        max_model_len=512,
    )
    pool = pool_service_pb2.PoolRequest
    assert token_reduction(pool(pool_factor=3), Task.TOKEN_EMBED, _model(text_colbert)) == (3, False)
    assert token_reduction(pool(), Task.TOKEN_EMBED, _model(bi_encoder)) == (1, False)
    assert token_reduction(pool(mask_non_image_embeddings=True), Task.TOKEN_EMBED, _model(vision)) == (1, True)
    for request, task, spec, field in (
        (pool(pool_factor=2), Task.TOKEN_EMBED, bi_encoder, "pool_factor"),
        (pool(pool_factor=1), Task.EMBED, bi_encoder, "pool_factor"),
        (pool(mask_non_image_embeddings=True), Task.TOKEN_EMBED, text_colbert, "mask_non_image_embeddings"),
        (pool(mask_non_image_embeddings=True), Task.TOKEN_EMBED, bi_encoder, "mask_non_image_embeddings"),
        (pool(pool_factor=0), Task.TOKEN_EMBED, vision, "pool_factor"),
    ):
        with pytest.raises(InvalidArgument) as refused:
            token_reduction(request, task, _model(spec))
        assert refused.value.field == field
