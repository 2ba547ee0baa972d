"""A truncation that would cut through an image is refused in one wording for every vision family (issue 11):
the tiny Tomoro-layout ColQwen3 checkpoint (tests/fixtures/colqwen3.py) and the tiny Llama-Nemotron-VL embed
checkpoint (tests/fixtures/nemotron_vl.py) on live servers, HTTP 400 naming `truncate_prompt_tokens` with both
values in the message, and the same text over gRPC as INVALID_ARGUMENT with BadRequest.field."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_status import rpc_status
from PIL import Image

from lateserve.server.config import ServerConfig
from lateserve.v1 import common_pb2 as c
from lateserve.v1 import pool_service_pb2, pool_service_pb2_grpc
from lateserve.wire.status import unpack_details
from tests.fixtures.colqwen3 import write_colqwen3_tomoro
from tests.fixtures.nemotron_vl import write_nemotron_embed_vl
from tests.fixtures.toy_vision import http_json
from tests.live import LiveServer

CUT = re.compile(
    r"truncate_prompt_tokens value \(8\) would cut an image: the input has (\d+) tokens including its image "
    r"tokens\. Please, select a larger truncation size\."
)


def png_url() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (256, 192), (200, 40, 90)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


REPO = Path(__file__).resolve().parents[2]
NEMOTRON_TEMPLATE = REPO / "examples/pooling/embed/template/nemotron_embed_vl.jinja"


@pytest.fixture(scope="module", params=["colqwen3", "nemotron_vl"])
def vision(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A live server of each vision family with its own truncation check (max_model_len 4096)."""
    if request.param == "colqwen3":
        config = ServerConfig(model=str(write_colqwen3_tomoro(tmp_path_factory.mktemp("tomoro"))))
    else:
        model = write_nemotron_embed_vl(tmp_path_factory.mktemp("nemotron"))
        config = ServerConfig(model=str(model), trust_remote_code=True, chat_template=str(NEMOTRON_TEMPLATE))
    with LiveServer(replace(config, workers=1, threads_per_worker=1, max_model_len=4096)) as live:
        yield live


def test_truncating_through_an_image_is_refused_with_both_values(vision: LiveServer) -> None:
    content = [{"type": "image_url", "image_url": {"url": png_url()}}, {"type": "text", "text": "Describe it."}]
    status, body = http_json(
        vision.http_url,
        "/pooling",
        {"messages": [{"role": "user", "content": content}], "truncate_prompt_tokens": 8},
    )
    assert status == 400, body
    error = body["error"]
    assert error["param"] == "truncate_prompt_tokens" and error["type"] == "BadRequestError"
    found = CUT.fullmatch(error["message"])
    assert found is not None, error["message"]
    assert int(found.group(1)) > 8

    part = c.ContentPart(image_url=c.ImageUrl(url=png_url()))
    request = pool_service_pb2.PoolRequest(
        inputs=[c.Input(content=c.MultiModalContent(parts=[part]))], options=c.EncodeOptions(truncate_prompt_tokens=8)
    )
    with grpc.insecure_channel(vision.grpc_target) as channel, pytest.raises(grpc.RpcError) as info:
        pool_service_pb2_grpc.PoolServiceStub(channel).Pool(request)
    error_rpc = info.value
    assert error_rpc.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = unpack_details(error_rpc.code(), error_rpc.details(), rpc_status.from_call(error_rpc))
    assert details.field == "truncate_prompt_tokens"
    assert CUT.fullmatch(details.message) is not None, details.message


def test_image_models_keep_the_over_long_wording(vision: LiveServer) -> None:
    # The text path of a vision family goes through the engine's one over-long message.
    status, body = http_json(vision.http_url, "/pooling", {"input": "word " * 5000, "task": "token_embed"})
    assert status == 400 and body["error"]["param"] == "input_tokens", body
    assert body["error"]["message"].startswith("This model's maximum context length is 4096 tokens. However, ")
