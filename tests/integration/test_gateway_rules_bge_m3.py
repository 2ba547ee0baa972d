"""normalize / use_activation resolved by the services, on a model with embed and token_classify (the
tiny BGE-M3 fixture): /v1/embeddings and /pooling's token_classify answer as when the gateway merged
the two names, over HTTP and gRPC."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from lateserve.server.config import ServerConfig
from lateserve.v1 import common_pb2 as c
from lateserve.v1 import embed_service_pb2, embed_service_pb2_grpc, pool_service_pb2, pool_service_pb2_grpc
from lateserve.wire.tensors import from_tensor
from tests.fixtures.bge_m3 import write_bge_m3
from tests.live import LiveServer

TEXT = "What is BGE M3?"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    model: Path = write_bge_m3(tmp_path_factory.mktemp("bge_m3_rules"))
    config = ServerConfig(
        model=str(model), hf_overrides={"architectures": ["BgeM3EmbeddingModel"]}, workers=1, threads_per_worker=1
    )
    with LiveServer(config) as live:
        yield live


@pytest.fixture(scope="module")
def channel(server: LiveServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield ch


def post(server: LiveServer, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(
        server.http_url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def vector(server: LiveServer, body: dict[str, Any]) -> Any:
    status, data = post(server, "/v1/embeddings", {"input": TEXT, **body})
    assert status == 200, data
    return np.asarray(data["data"][0]["embedding"], dtype=np.float32)


def sparse(server: LiveServer, body: dict[str, Any]) -> Any:
    status, data = post(server, "/pooling", {"input": TEXT, "task": "token_classify", **body})
    assert status == 200, data
    return np.asarray(data["data"][0]["data"], dtype=np.float32)


def test_embeddings_normalize_and_its_newer_name(server: LiveServer, channel: grpc.Channel) -> None:
    unit = vector(server, {})
    assert abs(float(np.linalg.norm(unit)) - 1.0) < 1e-5
    raw = vector(server, {"normalize": False})
    assert abs(float(np.linalg.norm(raw)) - 1.0) > 1e-3
    np.testing.assert_array_equal(vector(server, {"use_activation": False}), raw)
    np.testing.assert_array_equal(vector(server, {"use_activation": False, "normalize": False}), raw)
    np.testing.assert_array_equal(vector(server, {"use_activation": True}), unit)
    status, data = post(server, "/v1/embeddings", {"input": TEXT, "normalize": True, "use_activation": False})
    assert status == 400 and data["error"]["param"] == "use_activation"
    stub = embed_service_pb2_grpc.EmbedServiceStub(channel)
    answer = stub.Embed(embed_service_pb2.EmbedRequest(inputs=[c.Input(text=TEXT)], use_activation=False))
    np.testing.assert_array_equal(from_tensor(answer.embeddings[0].data), raw)


def test_token_classify_activation(server: LiveServer, channel: grpc.Channel) -> None:
    # BGE-M3's sparse head applies relu only with use_activation (vLLM); `normalize` is the same switch.
    with_relu = sparse(server, {})
    assert (with_relu >= 0).all()
    raw = sparse(server, {"use_activation": False})
    assert (raw < 0).any()
    np.testing.assert_array_equal(sparse(server, {"normalize": False}), raw)
    np.testing.assert_array_equal(np.maximum(raw, 0), with_relu)
    stub = pool_service_pb2_grpc.PoolServiceStub(channel)
    request = pool_service_pb2.PoolRequest(
        inputs=[c.Input(text=TEXT)], task=c.POOLING_TASK_TOKEN_CLASSIFY, use_activation=False
    )
    np.testing.assert_array_equal(from_tensor(stub.Pool(request).outputs[0].data), raw)
