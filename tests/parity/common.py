"""Scaffolding shared by the parity tests (not a test module): test images, an input's three spellings (domain
item, vLLM JSON content parts, proto `Input`), the tolerance checks, live servers, and for the Qwen-VL
families (ColQwen3 layouts, ColQwen3.5) the in-process case plus the checks they run alike in process and
over HTTP / gRPC against a `Qwen3VLReference`."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lateserve.server.config import ServerConfig
from lateserve.server.domain import EncodeOptions, ImagePart, Item, MultiModalItem, Task, TextItem, TextPart, WorkItem
from lateserve.server.families.base import Family, InputProcessor, ModelRunner
from lateserve.server.families.registry import family_for, load_source
from lateserve.v1 import common_pb2 as c
from lateserve.v1 import pool_service_pb2, pool_service_pb2_grpc, rerank_service_pb2, rerank_service_pb2_grpc
from lateserve.wire.tensors import from_tensor
from tests.fixtures.toy_vision import http_json
from tests.live import LiveServer
from tests.reference_qwen3vl import Part, Qwen3VLReference, maxsim

TOKEN_EMBED = frozenset({Task.TOKEN_EMBED})
MIN_COSINE = 0.9999
"""Every token's (or vector's) cosine with the reference, float32."""
MAX_REL = 1e-4
"""A score's (MaxSim, logit) relative error against the reference, float32."""


# --- images and inputs ------------------------------------------------------------------------


def image_bytes(
    size: tuple[int, int], seed: int, mode: str = "RGB", fmt: str = "PNG", *, opaque: bool = False
) -> bytes:
    """A blocky noise image (compressible, and not all high frequencies) of `size`, encoded as `fmt`; `opaque`
    sets an RGBA image's alpha band to 255."""
    rng = np.random.default_rng(seed)
    bands = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    base = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, bands), dtype=np.uint8)
    pixels = np.repeat(np.repeat(base, 8, axis=0), 8, axis=1)[: size[1], : size[0]]
    pixels = pixels + rng.integers(0, 24, pixels.shape, dtype=np.uint8)
    if opaque and mode == "RGBA":
        pixels[..., 3] = 255
    image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    mime = "image/jpeg" if data[:2] == b"\xff\xd8" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _text_only(parts: list[Part]) -> bool:
    return len(parts) == 1 and isinstance(parts[0], str)


def as_item(parts: list[Part]) -> Item:
    """A lone text part as a TextItem, anything else as a MultiModalItem (images as data URLs)."""
    if _text_only(parts):
        return TextItem(str(parts[0]))
    return MultiModalItem(tuple(ImagePart(data_url(p)) if isinstance(p, bytes) else TextPart(p) for p in parts))


def json_parts(parts: list[Part]) -> list[dict[str, Any]]:
    """vLLM's OpenAI content parts."""
    return [
        {"type": "image_url", "image_url": {"url": data_url(p)}}
        if isinstance(p, bytes)
        else {"type": "text", "text": p}
        for p in parts
    ]


def proto_parts(parts: list[Part]) -> list[c.ContentPart]:
    return [
        c.ContentPart(image_url=c.ImageUrl(url=data_url(p))) if isinstance(p, bytes) else c.ContentPart(text=p)
        for p in parts
    ]


def proto_input(parts: list[Part]) -> c.Input:
    """A lone text part as `text`, anything else as `content`."""
    if _text_only(parts):
        return c.Input(text=str(parts[0]))
    return c.Input(content=c.MultiModalContent(parts=proto_parts(parts)))


# --- tolerances -------------------------------------------------------------------------------


def check_close(ours: np.ndarray, expected: np.ndarray) -> float:
    """Asserts the per-token cosine bound (MIN_COSINE); returns the worst cosine."""
    assert ours.dtype == np.float32 and ours.shape == expected.shape, (ours.shape, expected.shape)
    cosines = (ours * expected).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(expected, axis=-1))
    worst = float(cosines.min())
    assert worst >= MIN_COSINE, worst
    return worst


def check_rel(ours: float, expected: float) -> float:
    """Asserts a score's relative error bound (MAX_REL); returns the relative error."""
    rel = abs(ours - expected) / abs(expected)
    assert rel <= MAX_REL, (ours, expected)
    return rel


check_maxsim = check_rel


# --- checkpoints and servers ------------------------------------------------------------------


def rewrite_weights(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Edits the checkpoint's model.safetensors in place."""
    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"), {"format": "pt"})


def live_server(model: Path, served_model_name: str, **config: Any) -> LiveServer:
    """A LiveServer (enter it) on `model`: one worker of one thread, max_model_len 4096, and `config`."""
    return LiveServer(
        ServerConfig(
            model=str(model),
            served_model_name=served_model_name,
            workers=1,
            threads_per_worker=1,
            max_model_len=4096,
            **config,
        )
    )


# --- Qwen-VL families (ColQwen3 layouts, ColQwen3.5) ------------------------------------------


IMAGES: dict[str, bytes] = {
    "odd": image_bytes((97, 61), 1),
    "rgba": image_bytes((50, 130), 2, "RGBA"),
    "gray": image_bytes((73, 45), 3, "L"),
    "jpeg": image_bytes((120, 88), 4, "RGB", "JPEG"),
    "tiny": image_bytes((9, 13), 5),
}
QUERIES = ["What is machine learning?", "Retrieve the city of Beijing"]
INPUTS: list[list[Part]] = [
    [QUERIES[0]],
    ["The capital of France is Paris. Machine learning is a subset of artificial intelligence."],
    [IMAGES["odd"]],
    [IMAGES["rgba"], "Describe the image."],
    [IMAGES["gray"], "first", "second line"],
    [IMAGES["jpeg"], IMAGES["tiny"], "Two images."],
    ["A text before", IMAGES["odd"]],  # vLLM moves the placeholder first whatever the part order
]


@dataclass
class Case:
    """One checkpoint loaded in process (family, processor, float32 runner) with its reference."""

    name: str
    path: Path
    family: Family
    processor: InputProcessor
    runner: ModelRunner
    reference: Qwen3VLReference

    @classmethod
    def load(cls, name: str, path: Path, reference: Callable[[Path], Qwen3VLReference]) -> Case:
        family = family_for(load_source(str(path)))
        return cls(name, path, family, family.processor(), family.runner("cpu", "float32"), reference(path))

    def embed(self, items: list[Item], *, normalize: bool = True) -> list[np.ndarray]:
        seqs = [self.processor.encode(i, EncodeOptions(), "input") for i in items]
        return [o[Task.TOKEN_EMBED] for o in self.runner.forward([WorkItem(s, TOKEN_EMBED, normalize) for s in seqs])]


def check_padded_batch(case: Case) -> tuple[list[np.ndarray], float, float]:
    """INPUTS in one padded batch against the reference, one at a time: every token's cosine, and MaxSim of
    both queries against every input. (our vectors, worst cosine, worst MaxSim relative error)."""
    ours = case.embed([as_item(p) for p in INPUTS])
    expected = [case.reference.vectors(p) for p in INPUTS]
    worst = min(check_close(o, e) for o, e in zip(ours, expected, strict=True))
    rels = [
        check_maxsim(maxsim(ours[q], ours[d]), maxsim(expected[q], expected[d]))
        for q in (0, 1)
        for d in range(len(INPUTS))
    ]
    return ours, worst, max(rels)


def bfloat16_errors(case: Case) -> tuple[float, float, float]:
    """A bf16 runner on INPUTS against the float32 reference: (worst token cosine, worst MaxSim error per query
    token, worst MaxSim relative error), the first input as the query. Its outputs must be float32."""
    half = case.family.runner("cpu", "bfloat16")
    seqs = [case.processor.encode(as_item(p), EncodeOptions(), "input") for p in INPUTS]
    outputs = [o[Task.TOKEN_EMBED] for o in half.forward([WorkItem(s, TOKEN_EMBED) for s in seqs])]
    expected = [case.reference.vectors(p) for p in INPUTS]
    worst = min(float((o * e).sum(-1).min()) for o, e in zip(outputs, expected, strict=True))
    per_token, rel = 0.0, 0.0
    for k in range(1, len(INPUTS)):
        ours, ref = maxsim(outputs[0], outputs[k]), maxsim(expected[0], expected[k])
        per_token = max(per_token, abs(ours - ref) / len(expected[0]))
        rel = max(rel, abs(ours - ref) / abs(ref))
    assert all(o.dtype == np.float32 for o in outputs)
    return worst, per_token, rel


def check_http_pooling(server: LiveServer, ref: Qwen3VLReference, model: str) -> None:
    """/pooling token_embed with `input` (text) and with `messages` (an image and text)."""
    status, body = http_json(server.http_url, "/pooling", {"input": QUERIES[0], "task": "token_embed"})
    assert status == 200, body
    assert body["object"] == "list" and body["model"] == model
    check_close(np.asarray(body["data"][0]["data"], dtype=np.float32), ref.vectors([QUERIES[0]]))

    content = json_parts([IMAGES["rgba"], "Describe the image."])
    status, body = http_json(
        server.http_url, "/pooling", {"messages": [{"role": "user", "content": content}], "task": "token_embed"}
    )
    assert status == 200, body
    ids, images = ref.chat_ids(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
        [IMAGES["rgba"]],
    )
    check_close(np.asarray(body["data"][0]["data"], dtype=np.float32), ref.vectors_for(ids, images))
    assert body["usage"]["prompt_tokens"] == len(ids)


def check_http_rerank(server: LiveServer, ref: Qwen3VLReference, *, keys: bool = False) -> None:
    """/rerank of image documents with top_n (`keys`: the body's and results' key order too)."""
    documents: list[list[Part]] = [[IMAGES["odd"], "Describe the image."], [IMAGES["gray"]], [IMAGES["jpeg"]]]
    request = {"query": QUERIES[1], "documents": [{"content": json_parts(d)} for d in documents], "top_n": 2}
    status, body = http_json(server.http_url, "/rerank", request)
    assert status == 200, body
    if keys:
        assert list(body) == ["id", "model", "usage", "results"] and body["id"].startswith("score-")
    q = ref.vectors([QUERIES[1]])
    expected = [maxsim(q, ref.vectors(d)) for d in documents]
    assert [r["index"] for r in body["results"]] == sorted(range(len(documents)), key=lambda i: -expected[i])[:2]
    for result in body["results"]:
        if keys:
            assert list(result) == ["index", "document", "relevance_score"]
        assert result["document"] == {"text": None, "multi_modal": request["documents"][result["index"]]["content"]}
        check_maxsim(result["relevance_score"], expected[result["index"]])
    tokens = len(ref.prompt([QUERIES[1]])[0]) + sum(len(ref.prompt(d)[0]) for d in documents)  # every input
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def check_http_score(server: LiveServer, ref: Qwen3VLReference, *, objects: bool = False) -> None:
    """/score with data_1/data_2 content lists (`objects`: the body's and items' `object` too)."""
    queries: list[list[Part]] = [[QUERIES[0]], [QUERIES[1], IMAGES["tiny"]]]
    documents: list[list[Part]] = [[IMAGES["jpeg"], "text too"], [IMAGES["rgba"]]]
    request = {
        "data_1": [{"content": json_parts(q)} for q in queries],
        "data_2": [{"content": json_parts(d)} for d in documents],
    }
    status, body = http_json(server.http_url, "/score", request)
    assert status == 200, body
    assert [d["index"] for d in body["data"]] == [0, 1]
    if objects:
        assert body["object"] == "list" and all(item["object"] == "score" for item in body["data"])
    for k, item in enumerate(body["data"]):
        check_maxsim(item["score"], maxsim(ref.vectors(queries[k]), ref.vectors(documents[k])))


def check_grpc_pool_and_rerank(server: LiveServer, ref: Qwen3VLReference, *, documents_echoed: bool = False) -> None:
    """gRPC Pool and Rerank with image content parts (`documents_echoed`: each result's document too)."""
    with grpc.insecure_channel(server.grpc_target) as channel:
        pool = pool_service_pb2_grpc.PoolServiceStub(channel)
        inputs = [INPUTS[0], INPUTS[4], INPUTS[5]]
        reply = pool.Pool(pool_service_pb2.PoolRequest(inputs=[proto_input(p) for p in inputs]), timeout=120)
        for parts, output in zip(inputs, reply.outputs, strict=True):
            check_close(from_tensor(output.data), ref.vectors(parts))
        rerank = rerank_service_pb2_grpc.RerankServiceStub(channel)
        documents = [INPUTS[2], INPUTS[3], INPUTS[1]]
        ranked = rerank.Rerank(
            rerank_service_pb2.RerankRequest(
                query=proto_input(INPUTS[0]), documents=[proto_input(d) for d in documents], top_n=3
            ),
            timeout=120,
        )
    q = ref.vectors(INPUTS[0])
    expected = [maxsim(q, ref.vectors(d)) for d in documents]
    assert [r.index for r in ranked.results] == sorted(range(3), key=lambda i: -expected[i])
    for result in ranked.results:
        check_maxsim(result.relevance_score, expected[result.index])
        if documents_echoed:
            assert result.document == proto_input(documents[result.index])
