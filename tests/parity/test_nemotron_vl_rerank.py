"""LlamaNemotronVLForSequenceClassification (cross-encoder) against the NVIDIA-style reference.

The reference builds NVIDIA's own prompt, `("<image> " if the document has an image) + "question:q \\n \\n
passage:d"` with BOS, runs the same backbone and `score(pooled) / temperature` (the fixture's temperature is 0.7),
then the sigmoid. lateserve builds the pair from the documented score template (nemotron-vl-rerank.jinja) or,
without --chat-template, from the config's prompt_template: both must give the reference's ids. Checked in process
and through a live server (HTTP /score and /rerank with text and image documents, `use_activation: false`, gRPC
Score and Rerank, Info's kind, health of the tasks a reranker lacks).

Tolerance: relative error <= 1e-4 on the scores (float32); measured about 1e-7.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lateserve.server.domain import (
    EncodeOptions,
    InvalidArgument,
    Task,
    TextItem,
    WorkItem,
)
from lateserve.server.families.registry import family_for, load_source
from lateserve.v1 import common_pb2 as c
from lateserve.v1 import (
    info_service_pb2,
    info_service_pb2_grpc,
    rerank_service_pb2,
    rerank_service_pb2_grpc,
    score_service_pb2,
    score_service_pb2_grpc,
)
from tests.fixtures.nemotron_vl import write_nemotron_rerank_vl
from tests.fixtures.toy_vision import http_json
from tests.live import LiveServer
from tests.parity.common import as_item, check_rel, image_bytes, json_parts, live_server, proto_input
from tests.reference_nemotron_vl import NemotronVLReference, Part

REPO = Path(__file__).resolve().parents[2]
VL_TEMPLATE = REPO / "examples/pooling/score/template/nemotron-vl-rerank.jinja"
TEXT_TEMPLATE = REPO / "examples/pooling/score/template/nemotron-rerank.jinja"
CLASSIFY = frozenset({Task.CLASSIFY})
QUERY = "Find diagrams about autonomous robots"
IMAGES = {
    "odd": image_bytes((97, 61), 11),
    "tall": image_bytes((50, 130), 12, "RGBA"),
    "jpeg": image_bytes((120, 88), 14, "RGB", "JPEG"),
    "wide": image_bytes((300, 40), 15),
}
DOCUMENTS: list[list[Part]] = [
    [IMAGES["odd"], "Robotics workflow diagram."],
    [IMAGES["tall"], "General skyline photo."],
    ["Robots learn to walk with reinforcement learning."],
    [IMAGES["jpeg"]],
    [IMAGES["wide"], "first line", "second line"],
]


def json_doc(parts: list[Part]) -> Any:
    if len(parts) == 1 and isinstance(parts[0], str):
        return parts[0]
    return {"content": json_parts(parts)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_nemotron_rerank_vl(tmp_path_factory.mktemp("nemotron_rerank_vl") / "model")


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> NemotronVLReference:
    return NemotronVLReference(model_dir)


@pytest.fixture(scope="module")
def expected(reference: NemotronVLReference) -> list[float]:
    return [reference.rerank_score(QUERY, d, activation=False) for d in DOCUMENTS]


def sigmoid(x: float) -> float:
    import math

    return 1.0 / (1.0 + math.exp(-x))


# --- in process ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", [None, str(VL_TEMPLATE)], ids=["config-prompt", "vl-template"])
def test_pairs_and_logits_match_the_reference(
    model_dir: Path, reference: NemotronVLReference, expected: list[float], template: str | None
) -> None:
    family = family_for(load_source(str(model_dir), chat_template=template, trust_remote_code=True))
    processor, runner = family.processor(), family.runner("cpu", "float32")
    seqs = [processor.encode_pair(TextItem(QUERY), as_item(d), EncodeOptions()) for d in DOCUMENTS]
    for seq, doc in zip(seqs, DOCUMENTS, strict=True):
        assert list(seq.ids) == reference.rerank_ids(QUERY, doc)[0]
    outputs = runner.forward([WorkItem(s, CLASSIFY) for s in seqs])
    worst = max(check_rel(float(o[Task.CLASSIFY][0]), e) for o, e in zip(outputs, expected, strict=True))
    print(f"rerank: worst logit rel {worst:.2e}")


def test_text_template_gives_the_text_prompt(model_dir: Path, reference: NemotronVLReference) -> None:
    family = family_for(load_source(str(model_dir), chat_template=str(TEXT_TEMPLATE)))
    seq = family.processor().encode_pair(TextItem(QUERY), TextItem("A text passage."), EncodeOptions())
    assert list(seq.ids) == reference.rerank_ids(QUERY, ["A text passage."])[0]


def test_more_images_than_the_template_places_are_refused(model_dir: Path) -> None:
    processor = family_for(load_source(str(model_dir), chat_template=str(VL_TEMPLATE))).processor()
    two = as_item([IMAGES["odd"], IMAGES["jpeg"], "two"])
    with pytest.raises(InvalidArgument, match="placeholder"):
        processor.encode_pair(TextItem(QUERY), two, EncodeOptions())
    plain = family_for(load_source(str(model_dir))).processor()
    with pytest.raises(InvalidArgument) as err:
        plain.encode_pair(as_item([IMAGES["odd"], "q"]), TextItem("d"), EncodeOptions())
    assert err.value.field == "query"


# --- live server --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(model_dir: Path) -> Iterator[LiveServer]:
    with live_server(
        model_dir, "nvidia/llama-nemotron-rerank-vl-1b-v2", trust_remote_code=True, chat_template=str(VL_TEMPLATE)
    ) as server:
        yield server


def test_http_score_and_rerank(live: LiveServer, reference: NemotronVLReference, expected: list[float]) -> None:
    status, body = http_json(live.http_url, "/score", {"data_1": QUERY, "data_2": [json_doc(d) for d in DOCUMENTS]})
    assert status == 200, body
    assert [d["index"] for d in body["data"]] == list(range(len(DOCUMENTS)))
    for item in body["data"]:
        check_rel(item["score"], sigmoid(expected[item["index"]]))
    assert body["usage"]["prompt_tokens"] == sum(len(reference.rerank_ids(QUERY, d)[0]) for d in DOCUMENTS)

    request = {"query": QUERY, "documents": [json_doc(d) for d in DOCUMENTS], "top_n": 3, "use_activation": False}
    status, body = http_json(live.http_url, "/rerank", request)
    assert status == 200, body
    order = sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])[:3]
    assert [r["index"] for r in body["results"]] == order
    for result in body["results"]:
        check_rel(result["relevance_score"], expected[result["index"]])
        document = request["documents"][result["index"]]
        if isinstance(document, str):
            assert result["document"] == {"text": document, "multi_modal": None}
        else:
            assert result["document"] == {"text": None, "multi_modal": document["content"]}

    status, body = http_json(live.http_url, "/v1/embeddings", {"input": "x"})
    assert status == 400 and "Unsupported task" in body["error"]["message"], body


def test_grpc_score_rerank_info_and_health(live: LiveServer, expected: list[float]) -> None:
    with grpc.insecure_channel(live.grpc_target) as channel:
        scored = score_service_pb2_grpc.ScoreServiceStub(channel).Score(
            score_service_pb2.ScoreRequest(
                queries=[c.Input(text=QUERY)], documents=[proto_input(d) for d in DOCUMENTS]
            ),
            timeout=120,
        )
        for result in scored.results:
            check_rel(result.score, sigmoid(expected[result.index]))
        ranked = rerank_service_pb2_grpc.RerankServiceStub(channel).Rerank(
            rerank_service_pb2.RerankRequest(
                query=c.Input(text=QUERY), documents=[proto_input(d) for d in DOCUMENTS], use_activation=False
            ),
            timeout=120,
        )
        assert [r.index for r in ranked.results] == sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])
        for result in ranked.results:
            check_rel(result.relevance_score, expected[result.index])
        info = info_service_pb2_grpc.InfoServiceStub(channel).GetInfo(info_service_pb2.GetInfoRequest(), timeout=30)
        assert info.models[0].kind == c.MODEL_KIND_CROSS_ENCODER
        assert info.models[0].architecture == "LlamaNemotronVLForSequenceClassification"
        health = health_pb2_grpc.HealthStub(channel)
        statuses = {
            s: health.Check(health_pb2.HealthCheckRequest(service=f"lateserve.v1.{s}"), timeout=30).status
            for s in ("ScoreService", "RerankService", "PoolService", "EmbedService")
        }
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert statuses == {
        "ScoreService": serving,
        "RerankService": serving,
        "PoolService": serving,
        "EmbedService": not_serving,
    }
