"""Media limits, SSRF refusals and cost admission through live servers serving ToyVisionModel: every
refusal is HTTP 400 with vLLM's envelope and gRPC INVALID_ARGUMENT with a BadRequest field path naming
the content part at fault; http(s) image URLs never reach loopback or metadata addresses unless allowed."""

from __future__ import annotations

import http.server
import io
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_status import rpc_status
from PIL import Image

from lateserve.server.config import ServerConfig
from lateserve.server.families.registry import EXTRA_FAMILIES_ENV
from lateserve.server.media import MediaPolicy
from lateserve.v1 import common_pb2 as c
from lateserve.v1 import pool_service_pb2, pool_service_pb2_grpc
from lateserve.wire import reasons
from lateserve.wire.status import unpack_details
from lateserve.wire.tensors import from_tensor
from tests.fixtures.toy_vision import (
    COST_PER_PATCH,
    EXTRA_FAMILIES,
    SLOW_TOKEN,
    data_url,
    http_json,
    image_part,
    solid,
    write_toy_vision,
)
from tests.live import LiveServer

MAX_BYTES = 50_000
LIMIT = 400  # max_queued_tokens of private_server


@pytest.fixture(scope="module")
def media_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(allowed, outside): a PNG in each; only the first is under --allowed-local-media-path."""
    root = tmp_path_factory.mktemp("media")
    allowed, outside = root / "allowed", root / "outside"
    for d in (allowed, outside):
        d.mkdir()
        solid((40, 90, 200), (16, 16)).save(d / "x.png")
    return allowed, outside


def toy_server(toy_dir: Path, **config: Any) -> Iterator[LiveServer]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(EXTRA_FAMILIES_ENV, EXTRA_FAMILIES)
        with LiveServer(ServerConfig(model=str(toy_dir), workers=1, threads_per_worker=1, **config)) as live:
            yield live


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_vision(tmp_path_factory.mktemp("toy_vision"))


@pytest.fixture(scope="module")
def limits_server(toy_dir: Path, media_dirs: tuple[Path, Path]) -> Iterator[LiveServer]:
    policy = MediaPolicy(
        allowed_media_domains=("localhost",),
        allowed_local_media_path=media_dirs[0],
        max_image_bytes=MAX_BYTES,
        max_image_pixels=1_000_000,
        max_images_per_prompt=2,
        max_aspect_ratio=8.0,
    )
    yield from toy_server(toy_dir, media=policy)


@pytest.fixture(scope="module")
def private_server(toy_dir: Path) -> Iterator[LiveServer]:
    """Private addresses allowed (an internal image store); metadata addresses stay refused. A small
    max_queued_tokens for the cost-admission test."""
    policy = MediaPolicy(allowed_media_domains=("localhost", "169.254.169.254"), allow_private_addresses=True)
    yield from toy_server(toy_dir, media=policy, max_queued_tokens=LIMIT)


# --- helpers ----------------------------------------------------------------------------------------


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def raw_data_url(data: bytes, mime: str = "image/png") -> str:
    import base64

    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def content(*parts: str) -> c.Input:
    """Text parts as given; a part starting with one of the URL schemes is an image_url part."""
    proto = [
        c.ContentPart(image_url=c.ImageUrl(url=p))
        if p.split(":", 1)[0] in ("data", "http", "file", "ftp")
        else c.ContentPart(text=p)
        for p in parts
    ]
    return c.Input(content=c.MultiModalContent(parts=proto))


def grpc_pool(target: str, *inputs: c.Input) -> list[np.ndarray]:
    with grpc.insecure_channel(target) as channel:
        stub = pool_service_pb2_grpc.PoolServiceStub(channel)
        resp = stub.Pool(pool_service_pb2.PoolRequest(inputs=list(inputs)), timeout=60)
    return [from_tensor(o.data) for o in resp.outputs]


def grpc_error(target: str, *inputs: c.Input) -> tuple[grpc.StatusCode, str, str | None, str]:
    with pytest.raises(grpc.RpcError) as info:
        grpc_pool(target, *inputs)
    call: Any = info.value
    details = unpack_details(call.code(), call.details() or "", rpc_status.from_call(call))
    return details.code, details.reason, details.field, details.message


def http_rerank_error(server: LiveServer, *parts: dict[str, Any]) -> dict[str, Any]:
    """A /rerank whose second document carries `parts`; asserts 400 and returns the envelope's error."""
    body = {"query": "a picture", "documents": ["a text document", {"content": list(parts)}]}
    status, reply = http_json(server.http_url, "/rerank", body)
    assert status == 400, reply
    error = reply["error"]
    assert list(error) == ["message", "type", "param", "code"]
    assert error["type"] == "BadRequestError" and error["code"] == 400
    return dict(error)


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


# --- limits -------------------------------------------------------------------------------------------

NOISE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8))  # ~77 KB PNG

CASES: dict[str, tuple[Callable[[tuple[Path, Path]], str], str, str]] = {
    "bad_base64": (lambda _: "data:image/png;base64,@@not*base64@@", reasons.IMAGE_INVALID, "not valid base64"),
    "not_an_image": (lambda _: raw_data_url(b"just some text, not an image " * 8), reasons.IMAGE_INVALID, "not a PNG"),
    "not_image_mime": (lambda _: raw_data_url(b"hello", "text/plain"), reasons.IMAGE_INVALID, "not image/*"),
    "too_many_bytes": (lambda _: data_url(NOISE), reasons.MEDIA_LIMIT, f"over the limit of {MAX_BYTES}"),
    "too_many_pixels": (lambda _: data_url(solid((0, 0, 0), (1100, 1000))), reasons.MEDIA_LIMIT, "1100000 pixels"),
    "aspect_ratio": (lambda _: data_url(solid((0, 0, 0), (400, 20))), reasons.MEDIA_LIMIT, "aspect ratio 20"),
    "file_outside": (lambda d: (d[1] / "x.png").as_uri(), reasons.MEDIA_NOT_ALLOWED, "outside"),
    "file_escape": (lambda d: (d[0] / ".." / "outside" / "x.png").as_uri(), reasons.MEDIA_NOT_ALLOWED, "outside"),
    "host_not_allowed": (
        lambda _: "http://images.example.com/x.png",
        reasons.MEDIA_NOT_ALLOWED,
        "not in --allowed-media-domains",
    ),
    "scheme": (lambda _: "ftp://localhost/x.png", reasons.MEDIA_NOT_ALLOWED, "scheme 'ftp'"),
}


def test_the_limit_cases_are_under_the_byte_limit_or_not_as_intended() -> None:
    assert len(png_bytes(NOISE)) > MAX_BYTES
    assert len(png_bytes(solid((0, 0, 0), (1100, 1000)))) < MAX_BYTES


@pytest.mark.parametrize("case", sorted(CASES))
def test_media_refusals_name_the_image_part(
    case: str, limits_server: LiveServer, media_dirs: tuple[Path, Path]
) -> None:
    make_url, reason, words = CASES[case]
    url = make_url(media_dirs)
    error = http_rerank_error(limits_server, text_part("caption"), image_part(url))
    assert error["param"] == "documents[1].content[1].image_url"
    assert words in error["message"]

    code, got_reason, field, message = grpc_error(limits_server.grpc_target, content("caption", url))
    assert (code, got_reason, field) == (grpc.StatusCode.INVALID_ARGUMENT, reason, "input[0].content[1].image_url")
    assert words in message


def test_second_input_and_chat_paths(limits_server: LiveServer) -> None:
    """The engine puts the family's relative path under the right input / message."""
    bad = "data:image/png;base64,@@"
    ok = data_url(solid((1, 2, 3)))
    _, _, field, _ = grpc_error(limits_server.grpc_target, content("fine", ok), content(ok, "x", bad))
    assert field == "input[1].content[2].image_url"
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [image_part(ok), text_part("and"), image_part(bad)]},
    ]
    status, reply = http_json(limits_server.http_url, "/pooling", {"messages": messages, "task": "token_embed"})
    assert status == 400 and reply["error"]["param"] == "messages[1].content[2].image_url", reply


def test_file_url_under_the_allowed_path_works(limits_server: LiveServer, media_dirs: tuple[Path, Path]) -> None:
    (rows,) = grpc_pool(limits_server.grpc_target, content((media_dirs[0] / "x.png").as_uri()))
    (same,) = grpc_pool(limits_server.grpc_target, content(data_url(solid((40, 90, 200), (16, 16)))))
    np.testing.assert_array_equal(rows, same)
    assert rows.shape[0] == 2 + 4


def test_too_many_images_per_prompt(limits_server: LiveServer) -> None:
    url = data_url(solid((9, 9, 9)))
    error = http_rerank_error(limits_server, image_part(url), image_part(url), image_part(url))
    assert error["param"] == "documents[1]" and "3 images" in error["message"]
    code, reason, field, _ = grpc_error(limits_server.grpc_target, content(url, url, url))
    assert (code, reason, field) == (grpc.StatusCode.INVALID_ARGUMENT, reasons.MEDIA_LIMIT, "input[0]")
    (rows,) = grpc_pool(limits_server.grpc_target, content(url, url))  # two is the limit, and allowed
    assert rows.shape[0] == 2 + 2 * 8


def test_image_to_a_text_only_model(colbert_server: LiveServer) -> None:
    url = data_url(solid((9, 9, 9)))
    status, reply = http_json(
        colbert_server.http_url, "/rerank", {"query": "q", "documents": ["text", {"content": [image_part(url)]}]}
    )
    assert status == 400 and reply["error"]["param"] == "documents[1].content[0]", reply
    assert "text only" in reply["error"]["message"]
    messages = [{"role": "user", "content": [text_part("look"), image_part(url)]}]
    status, reply = http_json(colbert_server.http_url, "/pooling", {"messages": messages})
    assert status == 400 and reply["error"]["param"] == "messages[0].content[1]", reply
    code, reason, field, _ = grpc_error(colbert_server.grpc_target, content("look", url))
    assert (code, reason, field) == (grpc.StatusCode.INVALID_ARGUMENT, reasons.UNSUPPORTED_INPUT, "input[0].content[1]")


# --- SSRF -----------------------------------------------------------------------------------------------


class ImageStore:
    """An http.server on 127.0.0.1 answering every GET with a PNG, recording the paths asked for."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.body = png_bytes(solid((200, 200, 20)))
        store = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                store.requests.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(store.body)))
                self.end_headers()
                self.wfile.write(store.body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> ImageStore:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def store() -> Iterator[ImageStore]:
    with ImageStore() as s:
        yield s


def test_ssrf_refused_before_any_connection(limits_server: LiveServer, store: ImageStore) -> None:
    urls = {
        f"http://localhost:{store.port}/x.png": "loopback address",  # allowed name, loopback address
        f"http://127.0.0.1:{store.port}/x.png": "not in --allowed-media-domains",
        "http://169.254.169.254/latest/meta-data/": "not in --allowed-media-domains",
    }
    for url, words in urls.items():
        error = http_rerank_error(limits_server, image_part(url))
        assert error["param"] == "documents[1].content[0].image_url" and words in error["message"], error
        code, reason, field, message = grpc_error(limits_server.grpc_target, content(url))
        assert (code, reason, field) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            reasons.MEDIA_NOT_ALLOWED,
            "input[0].content[0].image_url",
        )
        assert words in message
    assert store.requests == []


def test_private_addresses_when_allowed(private_server: LiveServer, store: ImageStore) -> None:
    url = f"http://localhost:{store.port}/x.png"
    (rows,) = grpc_pool(private_server.grpc_target, content(url))
    assert store.requests == ["/x.png"]
    (same,) = grpc_pool(private_server.grpc_target, content(data_url(solid((200, 200, 20)))))
    np.testing.assert_array_equal(rows, same)
    # Cloud metadata stays refused even with private addresses allowed and the host listed.
    code, reason, field, message = grpc_error(private_server.grpc_target, content("http://169.254.169.254/x.png"))
    assert (code, reason, field) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        reasons.MEDIA_NOT_ALLOWED,
        "input[0].content[0].image_url",
    )
    assert "cloud metadata" in message
    assert store.requests == ["/x.png"]


# --- cost admission --------------------------------------------------------------------------------------


def test_queued_cost_counts_image_patches(private_server: LiveServer) -> None:
    """max_queued_tokens=400. Two 64-patch images (130 ids) never fit: 400 REQUEST_TOO_LARGE. With a slow
    ~120-token request in flight, one such image (66 ids) would fit by its ids but not by its cost
    (66 + 64 * COST_PER_PATCH): 429 QUEUE_FULL; a text input with more ids than it is admitted."""
    engine = private_server.server.engine
    assert engine is not None and engine.queued_tokens == 0
    target = private_server.grpc_target
    square = data_url(solid((7, 7, 7), (64, 64)))  # 64 patches
    image_ids, image_cost = 2 + 64, 2 + 64 + COST_PER_PATCH * 64

    code, reason, field, message = grpc_error(target, content(square, square))
    assert (code, reason, field) == (grpc.StatusCode.INVALID_ARGUMENT, reasons.REQUEST_TOO_LARGE, "input")
    assert f"needs {image_cost + 64 + COST_PER_PATCH * 64} tokens" in message

    held: list[Any] = []
    slow = c.Input(text=f"{SLOW_TOKEN} " + "machine learning " * 60)
    thread = threading.Thread(target=lambda: held.append(grpc_pool(target, slow)))
    thread.start()
    deadline = time.monotonic() + 30
    while engine.queued_tokens == 0 and time.monotonic() < deadline:
        time.sleep(0.002)
    in_flight = engine.queued_tokens
    assert in_flight + image_ids + 80 <= LIMIT < in_flight + image_cost, in_flight

    code, reason, _, message = grpc_error(target, content(square))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, reasons.QUEUE_FULL)
    assert f"({in_flight} + {image_cost})" in message
    messages = [{"role": "user", "content": [image_part(square)]}]
    status, reply = http_json(private_server.http_url, "/pooling", {"messages": messages})
    assert status == 429 and reply["error"]["code"] == 429, reply

    (text_rows,) = grpc_pool(target, c.Input(text="machine learning " * 36))  # admitted while the slow one runs
    assert image_ids <= text_rows.shape[0] <= 80
    thread.join(30)
    assert held and held[0][0].shape[0] == in_flight
    (rows,) = grpc_pool(target, content(square))  # once the queue drained it is admitted
    assert rows.shape[0] == image_ids
