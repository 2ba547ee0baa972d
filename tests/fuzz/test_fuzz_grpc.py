"""Hypothesis over the lateserve.v1 request messages of every gRPC method of a live server (issue 12,
item 6): every field set at random (strings, numbers at the edges of their range, unknown enum values,
oneofs, nested and repeated messages), and raw random bytes as the request. No call may end INTERNAL or
UNKNOWN, and none may hang (a deadline well past any real call fails the example)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as d
from google.protobuf import message_factory
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lateserve.v1 import (
    embed_service_pb2,
    info_service_pb2,
    pool_service_pb2,
    rerank_service_pb2,
    score_service_pb2,
    tokenize_service_pb2,
)
from tests.live import LiveServer

METHODS: dict[str, tuple[type[Message], bool]] = {
    "/lateserve.v1.RerankService/Rerank": (rerank_service_pb2.RerankRequest, False),
    "/lateserve.v1.ScoreService/Score": (score_service_pb2.ScoreRequest, False),
    "/lateserve.v1.PoolService/Pool": (pool_service_pb2.PoolRequest, False),
    "/lateserve.v1.PoolService/StreamPool": (pool_service_pb2.StreamPoolRequest, True),
    "/lateserve.v1.EmbedService/Embed": (embed_service_pb2.EmbedRequest, False),
    "/lateserve.v1.TokenizeService/Tokenize": (tokenize_service_pb2.TokenizeRequest, False),
    "/lateserve.v1.TokenizeService/Detokenize": (tokenize_service_pb2.DetokenizeRequest, False),
    "/lateserve.v1.InfoService/GetInfo": (info_service_pb2.GetInfoRequest, False),
}
DEADLINE_S = 60.0
BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
FUZZ = settings(
    max_examples=1000,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)

T = d.FieldDescriptor
INT_RANGES = {
    T.TYPE_INT32: (-(2**31), 2**31 - 1),
    T.TYPE_SINT32: (-(2**31), 2**31 - 1),
    T.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    T.TYPE_INT64: (-(2**63), 2**63 - 1),
    T.TYPE_SINT64: (-(2**63), 2**63 - 1),
    T.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    T.TYPE_UINT32: (0, 2**32 - 1),
    T.TYPE_FIXED32: (0, 2**32 - 1),
    T.TYPE_UINT64: (0, 2**64 - 1),
    T.TYPE_FIXED64: (0, 2**64 - 1),
}
texts = st.text(max_size=40) | st.sampled_from(["", "maxsim", "cosine", "token_embed", "data:image/png;base64,AAAA"])


def ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    near = st.integers(min_value=max(lo, -3), max_value=min(hi, 600))
    return near | st.sampled_from([lo, hi, 0, 1, -1 if lo < 0 else 2]) | st.integers(min_value=lo, max_value=hi)


def scalar(field: d.FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type in INT_RANGES:
        return ints(*INT_RANGES[field.type])
    if field.type == T.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values]) | st.integers(-3, 99)
    if field.type == T.TYPE_BOOL:
        return st.booleans()
    if field.type in (T.TYPE_FLOAT, T.TYPE_DOUBLE):
        return st.floats(width=32 if field.type == T.TYPE_FLOAT else 64)
    if field.type == T.TYPE_BYTES:
        return st.binary(max_size=64)
    return texts


@st.composite
def message(draw: st.DrawFn, cls: type[Message], depth: int = 0) -> Message:
    msg = cls()
    if cls.DESCRIPTOR.full_name == "google.protobuf.Struct":
        msg.update(
            draw(
                st.dictionaries(st.text(max_size=8), st.none() | st.booleans() | st.integers(-5, 5) | texts, max_size=3)
            )
        )  # type: ignore[attr-defined]
        return msg
    chosen_oneofs: set[str] = set()
    for field in cls.DESCRIPTOR.fields:
        if depth > 3 or not draw(st.booleans()):
            continue
        if field.containing_oneof is not None:
            if field.containing_oneof.name in chosen_oneofs:
                continue
            chosen_oneofs.add(field.containing_oneof.name)
        repeated = field.is_repeated
        if field.type == T.TYPE_MESSAGE:
            sub = message_factory.GetMessageClass(field.message_type)
            if field.message_type.GetOptions().map_entry:
                continue
            if repeated:
                getattr(msg, field.name).extend(draw(st.lists(message(sub, depth + 1), max_size=4)))
            else:
                getattr(msg, field.name).CopyFrom(draw(message(sub, depth + 1)))
        elif repeated:
            getattr(msg, field.name).extend(draw(st.lists(scalar(field), max_size=6)))
        else:
            setattr(msg, field.name, draw(scalar(field)))
    return msg


@pytest.fixture(scope="module")
def channel(fuzz_server: LiveServer) -> Any:
    with grpc.insecure_channel(fuzz_server.grpc_target) as ch:
        yield ch


def invoke(channel: grpc.Channel, method: str, payload: bytes, streaming: bool) -> grpc.StatusCode:
    try:
        if streaming:
            call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
            for _ in call(payload, timeout=DEADLINE_S):
                pass
        else:
            channel.unary_unary(method, request_serializer=None, response_deserializer=None)(
                payload, timeout=DEADLINE_S
            )
    except grpc.RpcError as err:
        return err.code()  # type: ignore[attr-defined,no-any-return]
    return grpc.StatusCode.OK


@FUZZ
@given(data=st.data())
def test_random_request_messages(channel: grpc.Channel, data: st.DataObject) -> None:
    method = data.draw(st.sampled_from(sorted(METHODS)))
    cls, streaming = METHODS[method]
    request = data.draw(message(cls))
    code = invoke(channel, method, request.SerializeToString(), streaming)
    assert code not in BAD, (method, code, str(request)[:500])


@FUZZ
@given(method=st.sampled_from(sorted(METHODS)), payload=st.binary(max_size=300))
def test_random_bytes(channel: grpc.Channel, method: str, payload: bytes) -> None:
    code = invoke(channel, method, payload, METHODS[method][1])
    assert code not in BAD, (method, code, payload)
