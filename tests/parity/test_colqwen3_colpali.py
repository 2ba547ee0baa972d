"""ColQwen3 / ColQwen3.5 faithful modes (embedding_mode "query" / "document") against colpali-engine 0.3.18.

Oracle: tests/oracles/colpali_oracle.py in .refs/colpali (tools/oracles/colpali.sh): colpali's ColQwen3 on the
Tomoro layout (key mapping) and on the Ops layout (OpenSearch's prompt strings set on colpali's processor),
and ColQwen3_5 on the causal ColQwen3.5 fixture, each fed by process_queries / process_images /
process_texts with transformers' PIL image backend (lateserve's image preparation is bit-identical to it;
one check runs colpali's default torchvision backend on an image that needs no resize).

Checked: the token ids lateserve builds equal the ids colpali feeds its model; every token's cosine >= 0.9999
(float32) and MaxSim relative error <= 1e-4 against colpali's score_multi_vector; in process (one padded
batch mixing queries, image documents and text documents) and through live servers started with
--scoring-embedding-mode faithful: HTTP /pooling with embedding_mode and with vLLM's input_type (an image
document sent as a one-message chat), /rerank and /score, gRPC Pool / Rerank / Score. Raw mode stays the
default and unchanged (test_colqwen3_transformers.py checks it against plain transformers).

Images are made here, opaque (an alpha band is composited onto white by lateserve's decoder in every
mode, while colpali's process_images drops it: see qwen_vl/faithful.py).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from lateserve.server.domain import (
    ChatItem,
    ChatMessage,
    EmbeddingMode,
    EncodeOptions,
    ImagePart,
    InvalidArgument,
    Item,
    MultiModalItem,
    Task,
    TextItem,
    TextPart,
    TokenItem,
    WorkItem,
)
from lateserve.server.families.base import InputProcessor, ModelRunner
from lateserve.server.families.qwen_vl import faithful
from lateserve.server.families.registry import family_for, known_architectures, load_source
from lateserve.v1 import common_pb2 as c
from lateserve.v1 import (
    pool_service_pb2,
    pool_service_pb2_grpc,
    rerank_service_pb2,
    rerank_service_pb2_grpc,
    score_service_pb2,
    score_service_pb2_grpc,
)
from lateserve.wire.tensors import from_tensor
from tests.fixtures.colqwen3 import write_colqwen3_tomoro, write_nemotron_colembed, write_ops_colqwen3
from tests.fixtures.toy_vision import http_json
from tests.live import LiveServer
from tests.oracles.runner import run_oracle
from tests.parity.common import TOKEN_EMBED, check_close, check_rel, data_url, image_bytes, live_server

QUERY, DOCUMENT, RAW = EmbeddingMode.QUERY, EmbeddingMode.DOCUMENT, EmbeddingMode.RAW


def _colqwen3_5_writer() -> Callable[[Path], Path] | None:
    """The ColQwen3.5 fixture (causal variant: colpali's ColQwen3_5 is not bidirectional as served), when
    both it and the family exist."""
    if importlib.util.find_spec("tests.fixtures.colqwen3_5") is None or "ColQwen3_5" not in known_architectures():
        return None
    from tests.fixtures.colqwen3_5 import write_colqwen3_5

    return lambda path: write_colqwen3_5(path, is_causal=True)


WRITERS: dict[str, Callable[[Path], Path]] = {"tomoro": write_colqwen3_tomoro, "ops": write_ops_colqwen3}
LAYOUTS: dict[str, str] = {"tomoro": "tomoro", "ops": "ops"}
_C35 = _colqwen3_5_writer()
if _C35 is not None:
    WRITERS["colqwen3_5"] = _C35
    LAYOUTS["colqwen3_5"] = "colqwen3_5"


IMAGES: list[bytes] = [
    image_bytes((97, 61), 1),
    image_bytes((50, 130), 2, "RGBA", opaque=True),  # opaque: see the module docstring
    image_bytes((73, 45), 3, "L"),
    image_bytes((120, 88), 4, "RGB", "JPEG"),
    image_bytes((96, 64), 5),  # a multiple of 32 within the pixel bounds: no resize at all
]
EXACT = 4
"""The image both image backends prepare identically (no resampling)."""
QUERIES = ["What is machine learning?", "Retrieve the city of Beijing", "Describe the image."]
TEXTS = ["The capital of France is Paris.", "Machine learning is a subset of artificial intelligence."]


def image_item(data: bytes, *texts: str) -> MultiModalItem:
    return MultiModalItem((ImagePart(data_url(data)), *(TextPart(t) for t in texts)))


def image_content(data: bytes) -> list[dict[str, Any]]:
    return [{"type": "image_url", "image_url": {"url": data_url(data)}}]


def maxsim(q: np.ndarray, d: np.ndarray) -> float:
    return float((q.astype(np.float64) @ d.astype(np.float64).T).max(axis=1).sum())


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("colqwen3_colpali")
    return {name: write(root / name) for name, write in WRITERS.items()}


@pytest.fixture(scope="module")
def oracle(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    work = tmp_path_factory.mktemp("colpali_oracle")
    paths = []
    for k, data in enumerate(IMAGES):
        suffix = "jpg" if data[:2] == b"\xff\xd8" else "png"
        path = work / f"image{k}.{suffix}"
        path.write_bytes(data)
        paths.append(str(path))
    models: dict[str, dict[str, str]] = {
        name: {"dir": str(path), "layout": LAYOUTS[name]} for name, path in model_dirs.items()
    }
    models["tomoro_torchvision"] = {
        "dir": str(model_dirs["tomoro"]),
        "layout": "tomoro",
        "image_backend": "torchvision",
    }
    request = {"models": models, "queries": QUERIES, "images": paths, "texts": TEXTS}
    return run_oracle("colpali", "colpali_oracle.py", request, work)


_LOADED: dict[str, tuple[InputProcessor, ModelRunner]] = {}


@pytest.fixture(params=list(WRITERS))
def loaded(request: pytest.FixtureRequest, model_dirs: dict[str, Path]) -> tuple[str, InputProcessor, ModelRunner]:
    name = request.param
    if name not in _LOADED:
        family = family_for(load_source(str(model_dirs[name])))
        _LOADED[name] = (family.processor(), family.runner("cpu", "float32"))
    return (name, *_LOADED[name])


def _items() -> list[tuple[str, Item, EmbeddingMode]]:
    """(oracle array name, item, mode) for every query, image document and text document."""
    out: list[tuple[str, Item, EmbeddingMode]] = [(f"query/{i}", TextItem(q), QUERY) for i, q in enumerate(QUERIES)]
    out += [(f"document/{j}", image_item(data), DOCUMENT) for j, data in enumerate(IMAGES)]
    out += [(f"text/{k}", TextItem(t), DOCUMENT) for k, t in enumerate(TEXTS)]
    return out


# --- in process -------------------------------------------------------------------------------


def test_faithful_ids_are_colpalis(loaded: tuple[str, InputProcessor, ModelRunner], oracle: dict[str, Any]) -> None:
    name, processor, _ = loaded
    for array, item, mode in _items():
        seq = processor.encode(item, EncodeOptions(embedding_mode=mode), "query" if mode is QUERY else "document")
        expected = oracle[f"{name}/{array.replace('/', '_ids/')}"]
        assert list(seq.ids) == expected.tolist(), array
        assert seq.prompt_tokens == len(expected) and seq.attention_mask is None and seq.keep is None


def test_faithful_vectors_and_scores_match_colpali_in_a_padded_batch(
    loaded: tuple[str, InputProcessor, ModelRunner], oracle: dict[str, Any]
) -> None:
    name, processor, runner = loaded
    items = _items()
    seqs = [processor.encode(item, EncodeOptions(embedding_mode=mode), "input") for _, item, mode in items]
    outputs = runner.forward([WorkItem(s, TOKEN_EMBED) for s in seqs])
    ours = {array: out[Task.TOKEN_EMBED] for (array, _, _), out in zip(items, outputs, strict=True)}
    worst = min(check_close(ours[a], oracle[f"{name}/{a}"]) for a in ours)
    rels = []
    for i in range(len(QUERIES)):
        for j in range(len(IMAGES)):
            rels.append(check_rel(maxsim(ours[f"query/{i}"], ours[f"document/{j}"]), oracle[f"{name}/scores"][i, j]))
        for k in range(len(TEXTS)):
            rels.append(check_rel(maxsim(ours[f"query/{i}"], ours[f"text/{k}"]), oracle[f"{name}/text_scores"][i, k]))
    print(f"{name}: worst cosine {worst:.8f}, worst score rel {max(rels):.2e}")


def test_colpalis_torchvision_backend_agrees_where_nothing_is_resampled(
    oracle: dict[str, Any], model_dirs: dict[str, Path]
) -> None:
    family = family_for(load_source(str(model_dirs["tomoro"])))
    seq = family.processor().encode(image_item(IMAGES[EXACT]), EncodeOptions(embedding_mode=DOCUMENT), "document")
    (out,) = family.runner("cpu", "float32").forward([WorkItem(seq, TOKEN_EMBED)])
    assert list(seq.ids) == oracle[f"tomoro_torchvision/document_ids/{EXACT}"].tolist()
    check_close(out[Task.TOKEN_EMBED], oracle[f"tomoro_torchvision/document/{EXACT}"])


def test_prompts_per_architecture(model_dirs: dict[str, Path]) -> None:
    """The variants colpali cannot express: Tomoro strips queries and takes a text beside its image; Ops
    prefixes "Query: " and adds the assistant turn; raw mode is vLLM's prompt, unchanged."""
    tomoro = family_for(load_source(str(model_dirs["tomoro"]))).processor()
    ops = family_for(load_source(str(model_dirs["ops"]))).processor()

    def ids(processor: InputProcessor, item: Item, mode: EmbeddingMode) -> list[int]:
        return list(processor.encode(item, EncodeOptions(embedding_mode=mode), "input").ids)

    def text_ids(processor: InputProcessor, text: str) -> list[int]:
        return ids(processor, TextItem(text), RAW)

    eot = "<|endoftext|>" * 10
    assert ids(tomoro, TextItem("  Beijing \n"), QUERY) == text_ids(tomoro, "Beijing" + eot)
    assert ids(ops, TextItem(" Beijing"), QUERY) == text_ids(ops, "Query:  Beijing" + eot)
    assert ids(tomoro, TextItem("Beijing"), RAW) == text_ids(tomoro, "Beijing")
    assert ids(tomoro, TextItem("Paris."), DOCUMENT) == text_ids(tomoro, "Paris.")

    with_text = tomoro.encode(image_item(IMAGES[0], "a page"), EncodeOptions(embedding_mode=DOCUMENT), "document")
    alone = tomoro.encode(image_item(IMAGES[0]), EncodeOptions(embedding_mode=DOCUMENT), "document")
    pads = alone.media[0].length
    head = "<|im_start|>user\n<|vision_start|>"
    tail = "<|vision_end|>Describe the image. a page<|im_end|><|endoftext|>"
    assert list(with_text.ids) == text_ids(tomoro, head) + [alone.ids[alone.media[0].offset]] * pads + text_ids(
        tomoro, tail
    )
    ops_doc = ops.encode(image_item(IMAGES[0]), EncodeOptions(embedding_mode=DOCUMENT), "document")
    after = ops_doc.ids[ops_doc.media[0].offset + pads :]
    assert list(after) == text_ids(
        ops, "<|vision_end|>Describe the image.<|im_end|><|im_start|>assistant\n<|endoftext|>"
    )
    # A one-message chat is its content parts; the chat template is not used.
    chat = ChatItem((ChatMessage("user", (ImagePart(data_url(IMAGES[0])),)),))
    assert ids(ops, ops.render(chat), DOCUMENT) == list(ops_doc.ids)


def test_colqwen3_5_takes_colpalis_prompts() -> None:
    assert faithful.faithful_prompts("ColQwen3_5") is faithful.COLPALI
    assert faithful.COLPALI.query("q") == "q" + "<|endoftext|>" * 10
    assert faithful.COLPALI.image_document(None) == faithful.COLPALI_IMAGE_PROMPT


def test_what_faithful_modes_cannot_encode_is_a_400_on_embedding_mode(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    ops = family_for(load_source(str(model_dirs["ops"]))).processor()
    tomoro = family_for(load_source(str(model_dirs["tomoro"]))).processor()
    two = MultiModalItem((ImagePart(data_url(IMAGES[0])), ImagePart(data_url(IMAGES[2]))))
    chat = ChatItem((ChatMessage("system", (TextPart("x"),)), ChatMessage("user", (ImagePart(data_url(IMAGES[0])),))))
    cases: list[tuple[InputProcessor, Item, EmbeddingMode, str]] = [
        (ops, image_item(IMAGES[0]), QUERY, "text queries"),
        (ops, two, DOCUMENT, "one image per document"),
        (tomoro, two, DOCUMENT, "one image per document"),
        (ops, image_item(IMAGES[0], "caption"), DOCUMENT, "the image alone"),
        (ops, TokenItem((1, 2, 3)), QUERY, "token ids"),
        (ops, ops.render(chat), DOCUMENT, "one message"),
    ]
    for processor, item, mode, message in cases:
        with pytest.raises(InvalidArgument, match=message) as err:
            processor.encode(item, EncodeOptions(embedding_mode=mode), "input")
        assert err.value.field == "embedding_mode"
    with pytest.raises(InvalidArgument, match="image_pad"):
        ops.encode(TextItem("a <|image_pad|> b"), EncodeOptions(embedding_mode=QUERY), "query")

    nemotron = family_for(load_source(str(write_nemotron_colembed(tmp_path / "nemotron")))).processor()
    for mode in (QUERY, DOCUMENT):
        with pytest.raises(InvalidArgument, match=r"Qwen3VLNemotronEmbedModel.*not public") as refused:
            nemotron.encode(TextItem("q"), EncodeOptions(embedding_mode=mode), "input")
        assert refused.value.field == "embedding_mode"
    assert nemotron.encode(TextItem("q"), EncodeOptions(embedding_mode=RAW), "input").ids


# --- live servers (--scoring-embedding-mode faithful) ------------------------------------------


@pytest.fixture(scope="module", params=["tomoro", "ops"])
def live(request: pytest.FixtureRequest, model_dirs: dict[str, Path]) -> Iterator[tuple[str, LiveServer]]:
    with live_server(model_dirs[request.param], f"tiny-{request.param}", scoring_embedding_mode="faithful") as server:
        yield request.param, server


def _pool(server: LiveServer, body: dict[str, Any]) -> list[np.ndarray]:
    status, reply = http_json(server.http_url, "/pooling", {"task": "token_embed", **body})
    assert status == 200, reply
    return [np.asarray(d["data"], dtype=np.float32) for d in reply["data"]]


def test_http_pooling_embedding_mode_and_input_type(live: tuple[str, LiveServer], oracle: dict[str, Any]) -> None:
    name, server = live
    for key in ("embedding_mode", "input_type"):
        got = _pool(server, {"input": QUERIES[:2], key: "query"})
        for i, vectors in enumerate(got):
            check_close(vectors, oracle[f"{name}/query/{i}"])
        chat = [{"role": "user", "content": image_content(IMAGES[3])}]
        (doc,) = _pool(server, {"messages": chat, key: "document"})
        check_close(doc, oracle[f"{name}/document/3"])
    (both,) = _pool(server, {"input": QUERIES[0], "input_type": "query", "embedding_mode": "query"})
    check_close(both, oracle[f"{name}/query/0"])
    status, body = http_json(
        server.http_url,
        "/pooling",
        {"input": QUERIES[0], "task": "token_embed", "input_type": "query", "embedding_mode": "document"},
    )
    assert status == 400 and body["error"]["param"] == "input_type", body
    status, body = http_json(
        server.http_url, "/pooling", {"input": QUERIES[0], "task": "token_embed", "input_type": "passage"}
    )
    assert status == 400 and "input_type" in str(body), body
    # /pooling without a mode stays raw (vLLM's prompt: no prefix, no augmentation) on this server too.
    (raw,) = _pool(server, {"input": QUERIES[0]})
    assert raw.shape[0] < oracle[f"{name}/query/0"].shape[0]


def test_http_rerank_and_score_encode_faithfully(live: tuple[str, LiveServer], oracle: dict[str, Any]) -> None:
    name, server = live
    docs = [0, 2, 3]
    status, body = http_json(
        server.http_url,
        "/rerank",
        {"query": QUERIES[1], "documents": [{"content": image_content(IMAGES[j])} for j in docs], "top_n": 3},
    )
    assert status == 200, body
    expected = [float(oracle[f"{name}/scores"][1, j]) for j in docs]
    assert [r["index"] for r in body["results"]] == sorted(range(len(docs)), key=lambda i: -expected[i])
    for result in body["results"]:
        check_rel(result["relevance_score"], expected[result["index"]])
    tokens = len(oracle[f"{name}/query_ids/1"]) + sum(len(oracle[f"{name}/document_ids/{j}"]) for j in docs)
    assert body["usage"]["prompt_tokens"] == tokens

    status, body = http_json(
        server.http_url,
        "/score",
        {"data_1": QUERIES[0], "data_2": [TEXTS[0], {"content": image_content(IMAGES[4])}]},
    )
    assert status == 200, body
    check_rel(body["data"][0]["score"], float(oracle[f"{name}/text_scores"][0, 0]))
    check_rel(body["data"][1]["score"], float(oracle[f"{name}/scores"][0, 4]))
    # An explicit raw mode on the request overrides the server's faithful scoring.
    status, raw = http_json(
        server.http_url, "/score", {"data_1": QUERIES[0], "data_2": TEXTS[0], "embedding_mode": "raw"}
    )
    assert status == 200, raw
    assert abs(raw["data"][0]["score"] - body["data"][0]["score"]) > 1e-3


def _image_input(data: bytes) -> c.Input:
    return c.Input(content=c.MultiModalContent(parts=[c.ContentPart(image_url=c.ImageUrl(url=data_url(data)))]))


def test_grpc_pool_rerank_and_score(live: tuple[str, LiveServer], oracle: dict[str, Any]) -> None:
    name, server = live
    with grpc.insecure_channel(server.grpc_target) as channel:
        pool = pool_service_pb2_grpc.PoolServiceStub(channel)
        queries = pool.Pool(
            pool_service_pb2.PoolRequest(
                inputs=[c.Input(text=q) for q in QUERIES],
                options=c.EncodeOptions(embedding_mode=c.EMBEDDING_MODE_QUERY),
            ),
            timeout=120,
        )
        for i, output in enumerate(queries.outputs):
            check_close(from_tensor(output.data), oracle[f"{name}/query/{i}"])
        documents = pool.Pool(
            pool_service_pb2.PoolRequest(
                inputs=[_image_input(IMAGES[1]), c.Input(text=TEXTS[1])],
                options=c.EncodeOptions(embedding_mode=c.EMBEDDING_MODE_DOCUMENT),
            ),
            timeout=120,
        )
        check_close(from_tensor(documents.outputs[0].data), oracle[f"{name}/document/1"])
        check_close(from_tensor(documents.outputs[1].data), oracle[f"{name}/text/1"])
        refused = None
        try:
            pool.Pool(
                pool_service_pb2.PoolRequest(
                    inputs=[_image_input(IMAGES[1])], options=c.EncodeOptions(embedding_mode=c.EMBEDDING_MODE_QUERY)
                ),
                timeout=120,
            )
        except grpc.RpcError as error:
            refused = error
        assert refused is not None and refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "embedding_mode" in (refused.details() or "")

        rerank = rerank_service_pb2_grpc.RerankServiceStub(channel).Rerank(
            rerank_service_pb2.RerankRequest(
                query=c.Input(text=QUERIES[2]), documents=[_image_input(IMAGES[j]) for j in range(len(IMAGES))]
            ),
            timeout=120,
        )
        expected = [float(oracle[f"{name}/scores"][2, j]) for j in range(len(IMAGES))]
        assert [r.index for r in rerank.results] == sorted(range(len(IMAGES)), key=lambda j: -expected[j])
        for result in rerank.results:
            check_rel(result.relevance_score, expected[result.index])

        score = score_service_pb2_grpc.ScoreServiceStub(channel).Score(
            score_service_pb2.ScoreRequest(
                queries=[c.Input(text=QUERIES[0])], documents=[c.Input(text=t) for t in TEXTS]
            ),
            timeout=120,
        )
        assert [r.index for r in score.results] == list(range(len(TEXTS)))
        for k, result in enumerate(score.results):
            check_rel(result.score, float(oracle[f"{name}/text_scores"][0, k]))
