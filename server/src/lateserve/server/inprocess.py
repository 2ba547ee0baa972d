"""The gateway's channel when it runs inside `lateserve serve`: the servicers, called directly.

Why: the gateway beside the gRPC server used to reach it over a loopback gRPC channel, paying
protobuf serialization, HTTP/2 framing and grpc.aio's call machinery twice per request on the same
cores as the model (~1 ms of the ~2.4 ms the HTTP route added over direct gRPC at concurrency 1,
docs/benchmarks.md). Here the gateway hands the same lateserve.v1 request messages to the same
servicer objects the gRPC server runs, so every rule still lives behind the contract; what a channel
would raise (grpc.aio.AioRpcError with the google.rpc status in the trailing metadata) is raised the
same way, so the gateway's error mapping cannot tell the two apart. `lateserve gateway` as a sidecar
keeps using a real channel.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, cast

import grpc
from grpc.aio import AioRpcError, Metadata

from lateserve.gateway.keys import Stubs


class DirectContext:
    """The part of grpc.aio.ServicerContext the servicers use: the caller's metadata (the request id),
    trailing metadata (request id, timings) and ending the call with a status."""

    def __init__(self, metadata: Any = None) -> None:
        self._metadata = tuple(metadata or ())
        self.trailing: tuple[tuple[str, str | bytes], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self.trailing = tuple(metadata)

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        raise AioRpcError(status.code, Metadata(), Metadata(*status.trailing_metadata), status.details)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[tuple[str, str | bytes]] = ()
    ) -> NoReturn:
        raise AioRpcError(code, Metadata(), Metadata(*trailing_metadata), details)


class DirectMethod:
    """A unary method with a stub's call shape: `await method(request, metadata=..., timeout=...)`."""

    def __init__(self, handler: Callable[[Any, Any], Awaitable[Any]]) -> None:
        self._handler = handler

    async def __call__(self, request: Any, *, metadata: Any = None, timeout: float | None = None) -> Any:
        call = self._handler(request, DirectContext(metadata))
        if timeout is None:
            return await call
        try:
            return await asyncio.wait_for(call, timeout)
        except TimeoutError:
            raise AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, Metadata(), Metadata(), "Deadline Exceeded") from None


class DirectService:
    """A stub-shaped object whose attributes are the servicer's unary methods."""

    def __init__(self, servicer: Any, methods: Sequence[str]) -> None:
        for name in methods:
            setattr(self, name, DirectMethod(getattr(servicer, name)))


def direct_stubs(*, rerank: Any, score: Any, pool: Any, embed: Any, tokenize: Any, info: Any, health: Any) -> Stubs:
    """The gateway's Stubs over servicer objects (the unary methods the gateway calls)."""
    return Stubs(
        rerank=cast(Any, DirectService(rerank, ["Rerank"])),
        score=cast(Any, DirectService(score, ["Score"])),
        pool=cast(Any, DirectService(pool, ["Pool"])),
        embed=cast(Any, DirectService(embed, ["Embed"])),
        tokenize=cast(Any, DirectService(tokenize, ["Tokenize", "Detokenize"])),
        info=cast(Any, DirectService(info, ["GetInfo"])),
        health=DirectService(health, ["Check"]),
    )
