"""Asyncio client: the same API as sync.LateserveClient, with awaitable methods.

The methods are written once, in _core.ClientCore, for this client and the blocking one (sync.py);
this class only opens and closes the channel and awaits calls, turning grpc.RpcError into typed
LateserveError, so both behave identically.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc

from lateserve.client import responses
from lateserve.client._core import Chunk, ClientCore, Stream, Unary, rpc_errors

_R = TypeVar("_R")


class AsyncLateserveClient(ClientCore[grpc.aio.Channel]):
    """Asyncio lateserve client. Use as an async context manager, or await close().

    `timeout` is the deadline in seconds of every call (None: no deadline); `max_message_bytes`
    caps messages both ways (64 MiB default; use pool_stream for larger outputs); `credentials` opens a TLS
    channel; `api_key` is sent with every call as `authorization: Bearer <key>` metadata, what a server started
    with --api-key requires (a missing or wrong key raises UnauthenticatedError).
    """

    def _connect(
        self, target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, int]]
    ) -> grpc.aio.Channel:
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, credentials, options=options)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel; in-flight calls are cancelled."""
        await self._channel.close()

    @staticmethod
    def _unary_method(build: Callable[..., Unary[_R]]) -> Callable[..., Coroutine[Any, Any, _R]]:
        async def method(self: AsyncLateserveClient, /, *args: Any, **kwargs: Any) -> _R:
            call = build(self, *args, **kwargs)
            with rpc_errors():
                response = await call.method(call.request, timeout=self._timeout, metadata=self._metadata)
            return call.convert(response)

        return method

    async def _stream(self, call: Stream) -> AsyncIterator[Chunk]:
        assembler = responses.StreamAssembler()
        stream = call.method(call.request, timeout=self._timeout, metadata=self._metadata)
        with rpc_errors(cancel=stream.cancel):
            async for message in stream:
                done = assembler.feed(message)
                if done is not None:
                    yield done
            assembler.finish()
