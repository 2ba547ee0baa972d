"""Bytes that are not the method's request message answer INVALID_ARGUMENT with google.rpc details
(rpc.DecodeErrors), for unary and streaming methods; the server keeps serving."""

from __future__ import annotations

import grpc
import pytest
from grpc_status import rpc_status

from lateserve.v1 import common_pb2 as c
from lateserve.v1 import pool_service_pb2, pool_service_pb2_grpc
from lateserve.wire.status import unpack_details
from tests.live import LiveServer

GARBAGE = [b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\x0f", bytes(range(256))]


@pytest.mark.parametrize("method", ["/lateserve.v1.PoolService/Pool", "/lateserve.v1.RerankService/Rerank"])
@pytest.mark.parametrize("payload", GARBAGE)
def test_random_bytes_are_invalid_argument(colbert_server: LiveServer, method: str, payload: bytes) -> None:
    with grpc.insecure_channel(colbert_server.grpc_target) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            call(payload, timeout=30)
    err = info.value
    details = unpack_details(err.code(), err.details() or "", rpc_status.from_call(err))  # type: ignore[arg-type]
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.reason == "INVALID_ARGUMENT" and method in details.message


def test_a_stream_with_random_bytes_is_invalid_argument(colbert_server: LiveServer) -> None:
    with grpc.insecure_channel(colbert_server.grpc_target) as channel:
        call = channel.unary_stream(
            "/lateserve.v1.PoolService/StreamPool", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as info:
            list(call(GARBAGE[0], timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # A valid request right after still works.
        pool = pool_service_pb2_grpc.PoolServiceStub(channel).Pool
        assert len(pool(pool_service_pb2.PoolRequest(inputs=[c.Input(text="hello")])).outputs) == 1
