"""The sync and asyncio clients against an in-process fake server (no model, no torch).

Checks the wiring the pure tests cannot: stubs and method names, deadlines, streaming reassembly
over a real channel, and error mapping of real RpcError/AioRpcError objects (aio trailing metadata).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_status import rpc_status

from lateserve.client import (
    AsyncLateserveClient,
    InvalidArgumentError,
    LateserveClient,
    NotFoundError,
    UnavailableError,
    UnsupportedTaskError,
)
from lateserve.v1 import (
    common_pb2,
    info_service_pb2_grpc,
    pool_service_pb2,
    pool_service_pb2_grpc,
    rerank_service_pb2,
    rerank_service_pb2_grpc,
    tokenize_service_pb2,
    tokenize_service_pb2_grpc,
)
from lateserve.wire import status as wire_status
from lateserve.wire.tensors import to_tensor

ROWS, DIM = 5, 3


def _matrix(index: int) -> np.ndarray:
    return np.arange(ROWS * DIM, dtype=np.float32).reshape(ROWS, DIM) + 100 * index


class FakeRerank(rerank_service_pb2_grpc.RerankServiceServicer):
    """Scores each document by its length; an empty document is INPUT_TOO_LONG's sibling, EMPTY_INPUT."""

    def Rerank(self, request: Any, context: Any) -> Any:
        for i, doc in enumerate(request.documents):
            if doc.text == "":
                details = wire_status.ErrorDetails(
                    code=grpc.StatusCode.INVALID_ARGUMENT,
                    message=f"document {i} is empty",
                    reason=wire_status.EMPTY_INPUT,
                    field=f"documents[{i}]",
                )
                context.abort_with_status(rpc_status.to_status(wire_status.pack_status(details)))
        scored = sorted(
            (
                rerank_service_pb2.RerankResult(index=i, document=d, relevance_score=len(d.text))
                for i, d in enumerate(request.documents)
            ),
            key=lambda r: -r.relevance_score,
        )
        if request.HasField("top_n"):
            scored = scored[: request.top_n]
        return rerank_service_pb2.RerankResponse(
            id="score-x", model=request.model or "fake", results=scored, usage=common_pb2.Usage(prompt_tokens=3)
        )


class FakePool(pool_service_pb2_grpc.PoolServiceServicer):
    """StreamPool sends each input's [ROWS, DIM] matrix in 2-row chunks; Pool is not served."""

    def Pool(self, request: Any, context: Any) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Pool is not served here")

    def StreamPool(self, request: Any, context: Any) -> Iterator[Any]:
        for index in range(len(request.inputs)):
            matrix = _matrix(index)
            for start in range(0, ROWS, 2):
                message = pool_service_pb2.StreamPoolResponse(
                    index=index,
                    data=to_tensor(matrix[start : start + 2]),
                    row_offset=start,
                    total_rows=ROWS,
                    last_chunk=start + 2 >= ROWS,
                )
                if message.last_chunk and index == len(request.inputs) - 1:
                    message.usage.prompt_tokens = 7
                yield message


class FakeTokenize(tokenize_service_pb2_grpc.TokenizeServiceServicer):
    def Tokenize(self, request: Any, context: Any) -> Any:
        ids = [ord(c) for c in request.prompt]
        return tokenize_service_pb2.TokenizeResponse(count=len(ids), max_model_len=8, tokens=ids)

    def Detokenize(self, request: Any, context: Any) -> Any:
        return tokenize_service_pb2.DetokenizeResponse(prompt="".join(chr(t) for t in request.tokens))


class FakeInfo(info_service_pb2_grpc.InfoServiceServicer):
    def GetInfo(self, request: Any, context: Any) -> Any:
        details = wire_status.ErrorDetails(
            code=grpc.StatusCode.NOT_FOUND, message="no models", reason=wire_status.MODEL_NOT_FOUND
        )
        context.abort_with_status(rpc_status.to_status(wire_status.pack_status(details)))


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    rerank_service_pb2_grpc.add_RerankServiceServicer_to_server(FakeRerank(), server)
    pool_service_pb2_grpc.add_PoolServiceServicer_to_server(FakePool(), server)
    tokenize_service_pb2_grpc.add_TokenizeServiceServicer_to_server(FakeTokenize(), server)
    info_service_pb2_grpc.add_InfoServiceServicer_to_server(FakeInfo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_sync_client(target: str) -> None:
    with LateserveClient(target, timeout=10) as client:
        ranking = client.rerank("q", ["a", "abc", "ab"], top_n=2, model="m")
        assert [(r.index, r.document) for r in ranking.results] == [(1, "abc"), (2, "ab")]
        assert ranking.model == "m" and ranking.usage.prompt_tokens == 3

        streamed = list(client.pool_stream(["x", "y"]))
        assert [i for i, _ in streamed] == [0, 1]
        for index, array in streamed:
            np.testing.assert_array_equal(array, _matrix(index))

        assert client.tokenize("hi").tokens == [104, 105]
        assert client.detokenize([104, 105]) == "hi"

        with pytest.raises(InvalidArgumentError) as caught:
            client.rerank("q", ["a", ""])
        assert caught.value.field == "documents[1]" and caught.value.reason == "EMPTY_INPUT"
        with pytest.raises(NotFoundError):
            client.info()
        with pytest.raises(UnsupportedTaskError):
            client.pool("x")


async def test_async_client(target: str) -> None:
    async with AsyncLateserveClient(target, timeout=10) as client:
        ranking = await client.rerank("q", ["a", "abc"])
        assert [r.index for r in ranking.results] == [1, 0]

        streamed = [item async for item in client.pool_stream(["x", "y", "z"])]
        assert [i for i, _ in streamed] == [0, 1, 2]
        np.testing.assert_array_equal(streamed[2][1], _matrix(2))

        assert (await client.tokenize("ok")).count == 2
        assert await client.detokenize([111, 107]) == "ok"

        with pytest.raises(InvalidArgumentError) as caught:
            await client.rerank("q", [""])
        assert caught.value.field == "documents[0]"
        with pytest.raises(NotFoundError) as not_found:
            await client.info()
        assert not_found.value.reason == "MODEL_NOT_FOUND"


def test_unreachable_server_is_unavailable() -> None:
    with LateserveClient("127.0.0.1:1", timeout=5) as client, pytest.raises(UnavailableError):
        client.tokenize("x")
