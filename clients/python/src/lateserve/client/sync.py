"""Blocking client: one gRPC channel, one method per lateserve.v1 RPC.

The methods are written once, in _core.ClientCore, for this client and the asyncio one (aio.py);
this class only opens and closes the channel and runs calls blocking, turning grpc.RpcError into
typed LateserveError.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc

from lateserve.client import responses
from lateserve.client._core import Chunk, ClientCore, Stream, Unary, rpc_errors

_R = TypeVar("_R")


class LateserveClient(ClientCore[grpc.Channel]):
    """Blocking lateserve client. Use as a context manager, or call close().

    `timeout` is the deadline in seconds of every call (None: no deadline); `max_message_bytes`
    caps messages both ways (64 MiB default; use pool_stream for larger outputs); `credentials` opens a TLS
    channel; `api_key` is sent with every call as `authorization: Bearer <key>` metadata, what a server started
    with --api-key requires (a missing or wrong key raises UnauthenticatedError).
    """

    def _connect(
        self, target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, int]]
    ) -> grpc.Channel:
        if credentials is None:
            return grpc.insecure_channel(target, options=options)
        return grpc.secure_channel(target, credentials, options=options)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel; in-flight calls are cancelled."""
        self._channel.close()

    @staticmethod
    def _unary_method(build: Callable[..., Unary[_R]]) -> Callable[..., _R]:
        def method(self: LateserveClient, /, *args: Any, **kwargs: Any) -> _R:
            call = build(self, *args, **kwargs)
            with rpc_errors():
                response = call.method(call.request, timeout=self._timeout, metadata=self._metadata)
            return call.convert(response)

        return method

    def _stream(self, call: Stream) -> Iterator[Chunk]:
        assembler = responses.StreamAssembler()
        stream = call.method(call.request, timeout=self._timeout, metadata=self._metadata)
        with rpc_errors(cancel=stream.cancel):
            for message in stream:
                done = assembler.feed(message)
                if done is not None:
                    yield done
            assembler.finish()
