"""LlamaNemotronVLModel (bi-encoder) against the NVIDIA-style reference (tests/reference_nemotron_vl.py).

In process (processor + runner, one right-padded batch) and through a live server: /v1/embeddings with
`input` and with `messages` through nemotron_embed_vl.jinja (float and base64), `dimensions` refused as vLLM,
/pooling embed, /score and /rerank by cosine with image documents, gRPC Embed with messages / Score / Rerank,
Info's kind, health, and the OpenAI Python SDK's `client.embeddings.create`.

Tolerance (float32): cosine >= 0.9999 with the reference vector; measured worst about 1 - 1e-7.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lateserve.server.domain import EncodeOptions, Task, TextItem, WorkItem
from lateserve.server.families.registry import family_for, load_source
from lateserve.v1 import common_pb2 as c
from lateserve.v1 import (
    embed_service_pb2,
    embed_service_pb2_grpc,
    info_service_pb2,
    info_service_pb2_grpc,
    rerank_service_pb2,
    rerank_service_pb2_grpc,
    score_service_pb2,
    score_service_pb2_grpc,
)
from lateserve.wire.tensors import from_tensor
from tests.fixtures.nemotron_vl import write_nemotron_embed_vl
from tests.fixtures.toy_vision import http_json
from tests.live import LiveServer
from tests.parity.common import MIN_COSINE, as_item, image_bytes, json_parts, live_server, proto_input, proto_parts
from tests.reference_nemotron_vl import NemotronVLReference, Part, cosine

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "examples/pooling/embed/template/nemotron_embed_vl.jinja"
EMBED = frozenset({Task.EMBED})
IMAGES = {
    "odd": image_bytes((97, 61), 1),
    "tall": image_bytes((50, 130), 2, "RGBA"),
    "gray": image_bytes((73, 45), 3, "L"),
    "jpeg": image_bytes((120, 88), 4, "RGB", "JPEG"),
    "tiny": image_bytes((9, 13), 5),
}
INPUTS: list[list[Part]] = [
    ["query: What is machine learning?"],
    ["passage: The capital of France is Paris. Machine learning is a subset of artificial intelligence."],
    [IMAGES["odd"]],
    [IMAGES["tall"], "Describe the image."],
    [IMAGES["gray"], "first", "second line"],
    [IMAGES["jpeg"], IMAGES["tiny"], "Two images."],
]


def check(ours: Any, expected: np.ndarray) -> float:
    vector = np.asarray(ours, dtype=np.float32)
    assert vector.shape == expected.shape
    value = cosine(vector, expected)
    assert value >= MIN_COSINE, value
    np.testing.assert_allclose(np.linalg.norm(vector), 1.0, atol=1e-5)
    return value


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_nemotron_embed_vl(tmp_path_factory.mktemp("nemotron_embed_vl") / "model")


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> NemotronVLReference:
    return NemotronVLReference(model_dir)


# --- in process ---------------------------------------------------------------------------------------


def test_prompt_ids_and_vectors_match_the_reference_in_a_padded_batch(
    model_dir: Path, reference: NemotronVLReference
) -> None:
    family = family_for(load_source(str(model_dir), trust_remote_code=True))
    processor, runner = family.processor(), family.runner("cpu", "float32")
    seqs = [processor.encode(as_item(p), EncodeOptions(), "input") for p in INPUTS]
    for seq, parts in zip(seqs, INPUTS, strict=True):
        assert list(seq.ids) == reference.raw_ids(parts)[0]
    outputs = runner.forward([WorkItem(s, EMBED) for s in seqs])
    worst = min(check(o[Task.EMBED], reference.embed(p)) for o, p in zip(outputs, INPUTS, strict=True))
    print(f"embed: worst cosine {worst:.9f}")
    (alone,) = runner.forward([WorkItem(seqs[3], EMBED)])
    np.testing.assert_allclose(alone[Task.EMBED], outputs[3][Task.EMBED], atol=1e-5)


def test_bidirectional_attention(model_dir: Path) -> None:
    """A later token changes the first token's state (a causal model would leave it alone)."""
    family = family_for(load_source(str(model_dir)))
    processor, runner = family.processor(), family.runner("cpu", "float32")
    tasks = frozenset({Task.TOKEN_EMBED})
    a, b = (
        runner.forward([WorkItem(processor.encode(TextItem(t), EncodeOptions(), "input"), tasks)])[0][Task.TOKEN_EMBED]
        for t in ("The capital of France is Paris.", "The capital of France is Rome.")
    )
    assert not np.allclose(a[:3], b[:3], atol=1e-3)


def test_bfloat16_stays_close(model_dir: Path, reference: NemotronVLReference) -> None:
    family = family_for(load_source(str(model_dir)))
    processor, runner = family.processor(), family.runner("cpu", "bfloat16")
    seqs = [processor.encode(as_item(p), EncodeOptions(), "input") for p in INPUTS]
    outputs = runner.forward([WorkItem(s, EMBED) for s in seqs])
    worst = min(cosine(o[Task.EMBED], reference.embed(p)) for o, p in zip(outputs, INPUTS, strict=True))
    print(f"embed bf16: worst cosine {worst:.5f}")
    assert worst > 0.995


# --- live server --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(model_dir: Path) -> Iterator[LiveServer]:
    with live_server(
        model_dir, "nvidia/llama-nemotron-embed-vl-1b-v2", trust_remote_code=True, chat_template=str(TEMPLATE)
    ) as server:
        yield server


def test_http_embeddings_input_and_messages(live: LiveServer, reference: NemotronVLReference) -> None:
    status, body = http_json(live.http_url, "/v1/embeddings", {"input": [INPUTS[0][0], INPUTS[1][0]]})
    assert status == 200, body
    assert body["model"] == "nvidia/llama-nemotron-embed-vl-1b-v2" and body["object"] == "list"
    for k in (0, 1):
        check(body["data"][k]["embedding"], reference.embed(INPUTS[k]))
    assert body["usage"]["prompt_tokens"] == sum(len(reference.raw_ids(INPUTS[k])[0]) for k in (0, 1))

    template = TEMPLATE.read_text()
    for role, parts in (
        ("query", ["What is machine learning?"]),
        ("document", [IMAGES["odd"], "Describe the image."]),
        ("document", [IMAGES["jpeg"]]),
        ("user", ["no prefix", IMAGES["tiny"]]),
    ):
        request = {"messages": [{"role": role, "content": json_parts(parts)}]}
        status, body = http_json(live.http_url, "/v1/embeddings", request)
        assert status == 200, body
        ids, images = reference.chat_ids(template, role, parts)
        check(body["data"][0]["embedding"], reference.embedding(ids, images))
        assert body["usage"]["prompt_tokens"] == len(ids)

    request = {"messages": [{"role": "document", "content": json_parts([IMAGES["tall"]])}], "encoding_format": "base64"}
    status, body = http_json(live.http_url, "/v1/embeddings", request)
    assert status == 200, body
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype=np.float32)
    check(vector, reference.embedding(*reference.chat_ids(template, "document", [IMAGES["tall"]])))

    status, body = http_json(live.http_url, "/v1/embeddings", {"input": "x", "dimensions": 8})
    assert status == 400 and "matryoshka" in body["error"]["message"], body
    two = {"messages": [{"role": "query", "content": "a"}, {"role": "document", "content": "b"}]}
    status, body = http_json(live.http_url, "/v1/embeddings", two)
    assert status == 400 and "one message at a time" in body["error"]["message"], body


def test_http_pooling_score_and_rerank(live: LiveServer, reference: NemotronVLReference) -> None:
    status, body = http_json(live.http_url, "/pooling", {"input": INPUTS[0][0], "task": "embed"})
    assert status == 200, body
    check(body["data"][0]["data"], reference.embed(INPUTS[0]))

    query = "Find diagrams about autonomous robots"
    documents: list[list[Part]] = [
        [IMAGES["odd"], "Robotics workflow diagram."],
        [IMAGES["gray"]],
        ["A text document."],
    ]
    q = reference.embed([query])
    expected = [cosine(q, reference.embed(d)) for d in documents]
    status, body = http_json(
        live.http_url,
        "/score",
        {
            "data_1": query,
            "data_2": [
                {"content": json_parts(d)} if len(d) > 1 or isinstance(d[0], bytes) else d[0] for d in documents
            ],
        },
    )
    assert status == 200, body
    for item in body["data"]:
        assert abs(item["score"] - expected[item["index"]]) <= 1e-4
    status, body = http_json(
        live.http_url,
        "/rerank",
        {"query": query, "documents": [{"content": json_parts(d)} for d in documents], "top_n": 2},
    )
    assert status == 200, body
    order = sorted(range(3), key=lambda i: -expected[i])[:2]
    assert [r["index"] for r in body["results"]] == order
    for result in body["results"]:
        assert abs(result["relevance_score"] - expected[result["index"]]) <= 1e-4


def test_grpc_embed_score_rerank_info_and_health(live: LiveServer, reference: NemotronVLReference) -> None:
    template = TEMPLATE.read_text()
    parts: list[Part] = [IMAGES["tall"], "Describe the image."]
    with grpc.insecure_channel(live.grpc_target) as channel:
        embed = embed_service_pb2_grpc.EmbedServiceStub(channel)
        reply = embed.Embed(
            embed_service_pb2.EmbedRequest(messages=[c.ChatMessage(role="document", content=proto_parts(parts))]),
            timeout=120,
        )
        check(
            from_tensor(reply.embeddings[0].data), reference.embedding(*reference.chat_ids(template, "document", parts))
        )
        reply = embed.Embed(embed_service_pb2.EmbedRequest(inputs=[proto_input(INPUTS[0])]), timeout=120)
        check(from_tensor(reply.embeddings[0].data), reference.embed(INPUTS[0]))

        q = reference.embed(INPUTS[0])
        documents = [INPUTS[2], INPUTS[1], INPUTS[5]]
        expected = [cosine(q, reference.embed(d)) for d in documents]
        scored = score_service_pb2_grpc.ScoreServiceStub(channel).Score(
            score_service_pb2.ScoreRequest(
                queries=[proto_input(INPUTS[0])], documents=[proto_input(d) for d in documents]
            ),
            timeout=120,
        )
        for result in scored.results:
            assert abs(result.score - expected[result.index]) <= 1e-4
        ranked = rerank_service_pb2_grpc.RerankServiceStub(channel).Rerank(
            rerank_service_pb2.RerankRequest(
                query=proto_input(INPUTS[0]), documents=[proto_input(d) for d in documents]
            ),
            timeout=120,
        )
        assert [r.index for r in ranked.results] == sorted(range(3), key=lambda i: -expected[i])

        info = info_service_pb2_grpc.InfoServiceStub(channel).GetInfo(info_service_pb2.GetInfoRequest(), timeout=30)
        model = info.models[0]
        assert model.kind == c.MODEL_KIND_BI_ENCODER and model.architecture == "LlamaNemotronVLModel"
        assert model.embed_dim == 48
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("EmbedService", "ScoreService", "RerankService", "PoolService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=f"lateserve.v1.{service}"), timeout=30).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service


def test_openai_sdk_embeddings_create(live: LiveServer, reference: NemotronVLReference) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.http_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    texts = [INPUTS[0][0], INPUTS[1][0]]
    result = client.embeddings.create(model="nvidia/llama-nemotron-embed-vl-1b-v2", input=texts)
    assert result.model == "nvidia/llama-nemotron-embed-vl-1b-v2" and len(result.data) == 2
    for k, item in enumerate(result.data):
        assert item.index == k
        check(item.embedding, reference.embed(INPUTS[k]))
    floats = client.embeddings.create(
        model="nvidia/llama-nemotron-embed-vl-1b-v2", input=texts[0], encoding_format="float"
    )
    check(floats.data[0].embedding, reference.embed(INPUTS[0]))
    assert result.usage.prompt_tokens == sum(len(reference.raw_ids(INPUTS[k])[0]) for k in (0, 1))
