"""vLLM's `input_type` on /pooling: an alias of lateserve's `embedding_mode` ("query" / "document")."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from lateserve.gateway.errors import GatewayError
from lateserve.gateway.pooling.protocol import PoolingRequest
from lateserve.gateway.pooling.translate import pool_request_to_proto
from lateserve.v1 import common_pb2


def translate(body: dict[str, Any]) -> common_pb2.EncodeOptions:
    return pool_request_to_proto(PoolingRequest.model_validate({"input": "q", **body}), "rid").options


@pytest.mark.parametrize(
    ("body", "mode"),
    [
        ({"input_type": "query"}, common_pb2.EMBEDDING_MODE_QUERY),
        ({"input_type": "document"}, common_pb2.EMBEDDING_MODE_DOCUMENT),
        ({"input_type": "query", "embedding_mode": "query"}, common_pb2.EMBEDDING_MODE_QUERY),
        ({"embedding_mode": "document"}, common_pb2.EMBEDDING_MODE_DOCUMENT),
        ({}, common_pb2.EMBEDDING_MODE_UNSPECIFIED),
    ],
)
def test_input_type_is_embedding_mode(body: dict[str, Any], mode: int) -> None:
    options = translate(body)
    assert options.embedding_mode == mode


@pytest.mark.parametrize("mode", ["document", "raw"])
def test_input_type_contradicting_embedding_mode_is_a_400_on_input_type(mode: str) -> None:
    with pytest.raises(GatewayError) as info:
        translate({"input_type": "query", "embedding_mode": mode})
    assert info.value.api_error.status == 400
    assert info.value.api_error.param == "input_type"
    assert "embedding_mode" in info.value.api_error.message


@pytest.mark.parametrize("value", ["passage", "raw", ""])
def test_input_type_takes_query_or_document_only(value: str) -> None:
    with pytest.raises(pydantic.ValidationError, match="input_type"):
        PoolingRequest.model_validate({"input": "q", "input_type": value})
