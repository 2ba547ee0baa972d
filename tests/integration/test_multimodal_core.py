"""The multimodal path end to end, through a live server (gateway + gRPC + a real worker process) serving
ToyVisionModel (tests/fixtures/toy_vision.py): image inputs over HTTP and gRPC, numbers checked against a
numpy reference computed from the checkpoint, the document cache keyed by image content, image work
counted in batch budgets, uint8 + bfloat16 payload transport, and image preparation off the event loop."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from lateserve.server.config import ServerConfig
from lateserve.server.families.registry import EXTRA_FAMILIES_ENV
from lateserve.v1 import common_pb2 as c
from lateserve.v1 import pool_service_pb2, pool_service_pb2_grpc, rerank_service_pb2, rerank_service_pb2_grpc
from lateserve.wire.tensors import from_tensor
from tests.fixtures.toy_vision import (
    COST_PER_PATCH,
    DIM,
    EXTRA_FAMILIES,
    data_url,
    http_json,
    image_part,
    patch_grid,
    reference_rows,
    solid,
    write_toy_vision,
)
from tests.live import LiveServer


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_vision(tmp_path_factory.mktemp("toy_vision"))


@pytest.fixture(scope="module")
def vision_server(toy_dir: Path) -> Iterator[LiveServer]:
    config = ServerConfig(model=str(toy_dir), workers=1, threads_per_worker=1, prepare_threads=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(EXTRA_FAMILIES_ENV, EXTRA_FAMILIES)  # the server and its spawned worker read it
        with LiveServer(config) as live:
            yield live


@pytest.fixture(scope="module")
def channel(vision_server: LiveServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(vision_server.grpc_target) as ch:
        yield ch


def http(server: LiveServer, path: str, body: Any = None) -> tuple[int, Any]:
    return http_json(server.http_url, path, body)


def chat_pooling(server: LiveServer, *content: dict[str, Any]) -> np.ndarray:
    status, body = http(
        server, "/pooling", {"messages": [{"role": "user", "content": list(content)}], "task": "token_embed"}
    )
    assert status == 200, body
    return np.asarray(body["data"][0]["data"], dtype=np.float32)


def content_input(*parts: str | Image.Image) -> c.Input:
    proto = [
        c.ContentPart(text=p) if isinstance(p, str) else c.ContentPart(image_url=c.ImageUrl(url=data_url(p)))
        for p in parts
    ]
    return c.Input(content=c.MultiModalContent(parts=proto))


def grpc_pool(channel: grpc.Channel, *inputs: c.Input) -> list[np.ndarray]:
    stub = pool_service_pb2_grpc.PoolServiceStub(channel)
    resp = stub.Pool(pool_service_pb2.PoolRequest(inputs=list(inputs)), timeout=60)
    return [from_tensor(o.data) for o in resp.outputs]


def sample(name: str) -> float:
    value = REGISTRY.get_sample_value(name)
    return 0.0 if value is None else value


RED, BLUE = solid((220, 20, 30)), solid((20, 40, 230))  # same size (32x16: 4x2 patches)


def test_pooling_http_and_grpc_return_text_rows_plus_patch_rows(
    vision_server: LiveServer, channel: grpc.Channel, toy_dir: Path
) -> None:
    cols, rows = patch_grid(*RED.size)
    text = "the cat sat on the mat"
    want = reference_rows(toy_dir, [text, RED], special=False)  # chat form: no special tokens (vLLM)
    got = chat_pooling(vision_server, {"type": "text", "text": text}, image_part(data_url(RED)))
    assert got.shape == (want.shape[0], DIM) and want.shape[0] > cols * rows
    np.testing.assert_allclose(got, want, atol=1e-5)

    # gRPC content input: the completion form adds [CLS] ... [SEP]; image first, then text.
    (grpc_rows,) = grpc_pool(channel, content_input(RED, text))
    want = reference_rows(toy_dir, [RED, text], special=True)
    assert grpc_rows.shape == want.shape
    np.testing.assert_allclose(grpc_rows, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(grpc_rows, axis=1), 1.0, atol=1e-5)


def test_different_images_of_one_size_give_different_rows(vision_server: LiveServer, toy_dir: Path) -> None:
    red = chat_pooling(vision_server, image_part(data_url(RED)))
    blue = chat_pooling(vision_server, image_part(data_url(BLUE)))
    assert red.shape == blue.shape == (8, DIM)
    assert not np.allclose(red, blue, atol=1e-3)
    np.testing.assert_allclose(blue, reference_rows(toy_dir, [BLUE], special=False), atol=1e-5)


def test_rgba_grayscale_and_jpeg_inputs(vision_server: LiveServer, channel: grpc.Channel, toy_dir: Path) -> None:
    white = solid((255, 255, 255), (40, 24))
    transparent = solid((10, 200, 10, 0), (40, 24), "RGBA")  # composited onto white
    gray = solid((90,), (40, 24), "L")
    jpeg = Image.fromarray(np.tile(np.arange(0, 240, 5, dtype=np.uint8)[None, :, None], (24, 1, 3)))
    a, b = (
        chat_pooling(vision_server, image_part(data_url(transparent))),
        chat_pooling(vision_server, image_part(data_url(white))),
    )
    np.testing.assert_array_equal(a, b)
    assert a.shape == (15, DIM)  # 40x24 -> 5x3 patches
    g = chat_pooling(vision_server, image_part(data_url(gray)))
    np.testing.assert_allclose(g, reference_rows(toy_dir, [solid((90, 90, 90), (40, 24))], special=False), atol=1e-5)
    (j,) = grpc_pool(
        channel,
        c.Input(content=c.MultiModalContent(parts=[c.ContentPart(image_url=c.ImageUrl(url=data_url(jpeg, "JPEG")))])),
    )
    assert j.shape == (2 + 6 * 3, DIM) and np.isfinite(j).all()  # [CLS] + 48x24 -> 6x3 patches + [SEP]


def test_same_image_twice_gives_identical_outputs(vision_server: LiveServer, channel: grpc.Channel) -> None:
    """The runner raises unless the bfloat16 array equals torch's rounding of the uint8 one, so a successful
    answer already proves both dtypes crossed intact; outputs must also be bit-identical across requests."""
    image = Image.fromarray(np.random.default_rng(7).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    first = chat_pooling(vision_server, image_part(data_url(image)))
    second = chat_pooling(vision_server, image_part(data_url(image)))
    np.testing.assert_array_equal(first, second)
    (a,), (b,) = grpc_pool(channel, content_input(image)), grpc_pool(channel, content_input(image))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[1:-1], first)


def test_rerank_image_documents_ranks_and_caches_by_image_content(vision_server: LiveServer) -> None:
    green, purple = solid((30, 210, 60), (48, 16)), solid((150, 20, 160), (48, 16))  # unique to this test
    query = "what colour is the picture"

    def rerank(*images: Image.Image) -> tuple[list[dict[str, Any]], float, float]:
        hits, misses = sample("lateserve_doc_cache_hits_total"), sample("lateserve_doc_cache_misses_total")
        documents = [{"content": [image_part(data_url(i))]} for i in images]
        status, body = http(
            vision_server, "/rerank", {"query": query, "documents": ["the weather is sunny", *documents]}
        )
        assert status == 200, body
        return (
            body["results"],
            sample("lateserve_doc_cache_hits_total") - hits,
            sample("lateserve_doc_cache_misses_total") - misses,
        )

    results, hits, misses = rerank(green)
    assert (hits, misses) == (0, 2)
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and sorted(r["index"] for r in results) == [0, 1]
    by_index = {r["index"]: r for r in results}
    assert by_index[1]["document"] == {"text": None, "multi_modal": [image_part(data_url(green))]}
    green_score = by_index[1]["relevance_score"]

    # Same size, different pixels: identical placeholder ids, so only the digest tells them apart.
    results, hits, misses = rerank(purple)
    assert (hits, misses) == (1, 1)  # the text document hit; the purple image did not share green's entry
    purple_score = {r["index"]: r["relevance_score"] for r in results}[1]
    assert purple_score != pytest.approx(green_score, abs=1e-4)

    results, hits, misses = rerank(green, purple)
    assert (hits, misses) == (3, 0)
    again = {r["index"]: r["relevance_score"] for r in results}
    assert again[1] == pytest.approx(green_score, abs=1e-6) and again[2] == pytest.approx(purple_score, abs=1e-6)
    assert [r["index"] for r in results] == sorted(again, key=lambda i: -again[i])


def test_grpc_rerank_image_query_finds_the_same_image(channel: grpc.Channel) -> None:
    """An image query against [blue image, text, red image]: the red document holds every query row exactly
    ([CLS], 8 red patches, [SEP]), so it ranks first with MaxSim = 10, the number of query rows."""
    stub = rerank_service_pb2_grpc.RerankServiceStub(channel)
    resp = stub.Rerank(
        rerank_service_pb2.RerankRequest(
            query=content_input(RED),
            documents=[content_input(BLUE), c.Input(text="Paris"), content_input(RED)],
        ),
        timeout=60,
    )
    assert resp.results[0].index == 2 and sorted(r.index for r in resp.results) == [0, 1, 2]
    scores = [r.relevance_score for r in resp.results]
    assert scores[0] == pytest.approx(10.0, abs=1e-4) and scores[1] < 10.0 - 1e-3
    assert scores == sorted(scores, reverse=True)
    assert resp.results[0].document.content.parts[0].image_url.url == data_url(RED)


def test_batch_budget_counts_image_patches(vision_server: LiveServer) -> None:
    """lateserve_batch_tokens sums Sequence.cost: the ids (placeholders included) plus COST_PER_PATCH per patch."""
    image = solid((5, 5, 250), (64, 64))  # 8x8 = 64 patches
    before = (sample("lateserve_batch_tokens_sum"), sample("lateserve_batch_tokens_count"))
    rows = chat_pooling(vision_server, {"type": "text", "text": "a blue square"}, image_part(data_url(image)))
    after = (sample("lateserve_batch_tokens_sum"), sample("lateserve_batch_tokens_count"))
    assert after[1] - before[1] == 1
    assert after[0] - before[0] == rows.shape[0] + COST_PER_PATCH * 64
    assert rows.shape[0] > 64


def big_image(seed: int) -> Image.Image:
    """4000x4000 with structure (compresses to well under a MB as PNG, decodes in a fraction of a second)."""
    x = np.linspace(0, 255, 4000, dtype=np.float32)
    planes = [np.add.outer(x, x * (seed + 1)) % 256, np.add.outer(x, -x) % 256, np.outer(np.ones(4000), x)]
    return Image.fromarray(np.stack(planes, -1).astype(np.uint8))


def test_image_preparation_runs_off_the_event_loop(vision_server: LiveServer, channel: grpc.Channel) -> None:
    """While a request with three 4000x4000 PNGs is being decoded and resized in the prepare pool, a small
    text request and /health are answered: the small one finishes first and faster than the big one."""
    big = content_input(*(big_image(i) for i in range(3)))
    engine = vision_server.server.engine
    assert engine is not None and engine.active_requests == 0
    times: dict[str, float] = {}
    errors: list[BaseException] = []

    def send_big() -> None:
        times["big_start"] = time.perf_counter()
        try:
            (rows,) = grpc_pool(channel, big)
            assert rows.shape == (2 + 3 * 64, DIM)
        except BaseException as exc:
            errors.append(exc)
        times["big_end"] = time.perf_counter()

    thread = threading.Thread(target=send_big)
    thread.start()
    deadline = time.monotonic() + 30
    while engine.active_requests == 0 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.002)
    assert engine.active_requests == 1, "the big request never started"
    times["small_start"] = time.perf_counter()
    status, body = http(vision_server, "/pooling", {"input": "a small text", "task": "token_embed"})
    times["small_end"] = time.perf_counter()
    health, _ = http(vision_server, "/health")
    times["health_end"] = time.perf_counter()
    big_running = thread.is_alive()
    thread.join(60)
    assert not errors, errors
    assert status == 200 and len(body["data"][0]["data"]) >= 3, body
    assert health == 200
    assert big_running and times["health_end"] < times["big_end"], times
    assert times["small_end"] < times["big_end"], times
    assert times["small_end"] - times["small_start"] < times["big_end"] - times["big_start"], times


def test_the_runner_check_catches_a_corrupted_bfloat16_payload(toy_dir: Path) -> None:
    """Guards the guard: the transport check in the runner is not vacuous (in-process, no server)."""
    from dataclasses import replace

    from lateserve.server.domain import EncodeOptions, ImagePart, MultiModalItem, Task, Tensor, WorkItem
    from lateserve.server.families.registry import load_source
    from tests.fixtures.toy_vision import ToyVision

    family = ToyVision(load_source(str(toy_dir)))
    seq = family.processor().encode(MultiModalItem((ImagePart(data_url(RED)),)), EncodeOptions(), "input")
    runner = family.runner("cpu", "float32")
    good = runner.forward([WorkItem(seq, frozenset({Task.TOKEN_EMBED}))])[0][Task.TOKEN_EMBED]
    assert good.shape == (2 + 8, DIM)
    (payload,) = seq.media
    pixels = payload.array("pixels").to_numpy().astype(np.float32) / 255
    pixels[0, 0, 0] += 0.05
    broken = replace(payload, arrays=(("pixels", payload.array("pixels")), ("pixels_bf16", Tensor.bfloat16(pixels))))
    with pytest.raises(ValueError, match="transport bug"):
        runner.forward([WorkItem(replace(seq, media=(broken,)), frozenset({Task.TOKEN_EMBED}))])
