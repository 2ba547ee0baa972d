"""Similarity maps on /score and gRPC Score: per pair, each query token's dot product with each image
token, laid out on the image's token grid. Checked against the toy family's numpy reference rows (computed
from the checkpoint, not by the server), over HTTP and gRPC; refused where they cannot exist."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from lateserve.server.config import ServerConfig
from lateserve.server.families.registry import EXTRA_FAMILIES_ENV
from lateserve.v1 import common_pb2 as c
from lateserve.v1 import score_service_pb2, score_service_pb2_grpc
from lateserve.wire.tensors import from_tensor
from tests.fixtures.toy_vision import (
    EXTRA_FAMILIES,
    data_url,
    http_json,
    image_part,
    patch_grid,
    reference_rows,
    write_toy_vision,
)
from tests.live import LiveServer

QUERY = "blue sky over the sea"


def page(seed: int, size: tuple[int, int] = (40, 24)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, object]]:
    model = write_toy_vision(tmp_path_factory.mktemp("toy_vision"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(EXTRA_FAMILIES_ENV, EXTRA_FAMILIES)
        with LiveServer(ServerConfig(model=str(model), workers=1, threads_per_worker=1)) as live:
            yield live, model


def expected(model: object, image: Image.Image, query: str) -> np.ndarray:
    q = reference_rows(model, [query], special=True)  # type: ignore[arg-type]
    patches = reference_rows(model, [image], special=False)  # type: ignore[arg-type]
    cols, rows = patch_grid(image.width, image.height)
    return (q @ patches.T).reshape(len(q), rows, cols)


def test_http_similarity_maps_equal_the_reference(toy: tuple[LiveServer, object]) -> None:
    live, model = toy
    images = [page(1), page(2, (24, 40))]
    documents = {"content": [image_part(data_url(images[0])), {"type": "text", "text": "a caption"}]}
    second = {"content": [image_part(data_url(images[1]))]}
    status, body = http_json(
        live.http_url,
        "/score",
        {"queries": QUERY, "documents": [documents, second], "return_similarity_maps": True},
    )
    assert status == 200, body
    for entry, image in zip(body["data"], images, strict=True):
        (smap,) = entry["similarity_maps"]
        want = expected(model, image, QUERY)
        assert (smap["height"], smap["width"]) == want.shape[1:]
        assert (
            smap["image_index"] == 0 and smap["query_tokens"][0] == "[CLS]" and len(smap["query_tokens"]) == len(want)
        )
        np.testing.assert_allclose(np.array(smap["data"]), want, atol=2e-5)
        # MaxSim over the image part only can't exceed the document's score: the maps are the image rows
        assert float(np.max(want, axis=(1, 2)).sum()) <= entry["score"] + 1e-4
    status, plain = http_json(live.http_url, "/score", {"queries": QUERY, "documents": [second]})
    assert status == 200 and "similarity_maps" not in plain["data"][0]


def test_grpc_similarity_maps(toy: tuple[LiveServer, object]) -> None:
    live, model = toy
    image = page(3)
    request = score_service_pb2.ScoreRequest(
        queries=[c.Input(text=QUERY)],
        documents=[
            c.Input(content=c.MultiModalContent(parts=[c.ContentPart(image_url=c.ImageUrl(url=data_url(image)))])),
            c.Input(text="no image here"),
        ],
        return_similarity_maps=True,
    )
    with grpc.insecure_channel(live.grpc_target) as channel:
        response = score_service_pb2_grpc.ScoreServiceStub(channel).Score(request)
    (smap,) = response.results[0].similarity_maps
    np.testing.assert_allclose(from_tensor(smap.data), expected(model, image, QUERY), atol=2e-5)
    assert list(response.results[1].similarity_maps) == []  # a text document has no image grid


def test_a_text_model_returns_no_maps(colbert_server: LiveServer) -> None:
    """Late interaction without images: the request is valid and no document has a map."""
    status, body = http_json(
        colbert_server.http_url, "/score", {"text_1": "a", "text_2": ["b"], "return_similarity_maps": True}
    )
    assert status == 200 and body["data"][0].get("similarity_maps") is None


def test_the_example_script_draws_the_heatmap(toy: tuple[LiveServer, object], tmp_path: Path) -> None:
    """examples/similarity_map.py end to end: the PNG has the page's size and is red where the map is high."""
    import importlib.util

    live, model = toy
    image = Image.new("RGB", (64, 32), (255, 255, 255))
    image.paste((0, 0, 255), (0, 0, 32, 32))  # the left half blue, the right half white
    image_file = tmp_path / "page.png"
    image.save(image_file)
    spec = importlib.util.spec_from_file_location(
        "similarity_map", Path(__file__).parents[2] / "examples/similarity_map.py"
    )
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(
        ["--url", live.http_url, "--image", str(image_file), "--query", QUERY, "--out", str(tmp_path / "h.png")]
    )
    heat = np.asarray(Image.open(out).convert("RGB"), dtype=np.int32)
    assert heat.shape == (32, 64, 3)
    grid = expected(model, image, QUERY).max(axis=0)  # rows x cols of the page's patches
    hot = np.unravel_index(int(grid.argmax()), grid.shape)
    cold = np.unravel_index(int(grid.argmin()), grid.shape)
    rows, cols = grid.shape

    def redness(cell: tuple[int, ...]) -> float:
        r0, c0 = int(cell[0] * 32 / rows), int(cell[1] * 64 / cols)
        patch = heat[r0 : r0 + 32 // rows, c0 : c0 + 64 // cols]
        original = np.asarray(image, dtype=np.int32)[r0 : r0 + 32 // rows, c0 : c0 + 64 // cols]
        return float((patch[..., 0] - original[..., 0]).mean() - (patch[..., 2] - original[..., 2]).mean())

    assert redness(hot) > redness(cold)
