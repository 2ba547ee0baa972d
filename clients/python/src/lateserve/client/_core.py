"""The one definition of every client method, shared by the blocking and the asyncio client.

Each RPC method is written here once, as a builder: it takes the public parameters, builds (and
so validates) the request with requests.py, and names the stub method to call and, for unary
RPCs, the responses.py converter of the reply. LateserveClient (sync.py) and AsyncLateserveClient
(aio.py) differ only in how they run such a call, blocking or awaited, and in closing the
channel: each client class turns every builder into its own real method (a def or an async def)
with the builder's name, parameters, defaults and docstring.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import MethodType
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeAlias, TypeVar, overload

import grpc

from lateserve.client import requests, responses
from lateserve.client.errors import from_rpc_error
from lateserve.client.types import (
    EmbeddingModeName,
    InputLike,
    Pooled,
    Ranking,
    Scores,
    ServerInfo,
    Task,
    TokenizeResult,
    WireDtype,
)
from lateserve.v1 import (
    embed_service_pb2_grpc,
    info_service_pb2_grpc,
    pool_service_pb2_grpc,
    rerank_service_pb2_grpc,
    score_service_pb2_grpc,
    tokenize_service_pb2_grpc,
)
from lateserve.v1.pool_service_pb2 import StreamPoolRequest

if TYPE_CHECKING:
    from lateserve.client.aio import AsyncLateserveClient
    from lateserve.client.sync import LateserveClient

_P = ParamSpec("_P")
_R = TypeVar("_R")
_Channel = TypeVar("_Channel", grpc.Channel, grpc.aio.Channel)

# What pool_stream yields: (input index, float32 array) as each input completes.
Chunk: TypeAlias = tuple[int, responses.Array]


@contextmanager
def rpc_errors(cancel: Callable[[], object] | None = None) -> Iterator[None]:
    """Raises a grpc.RpcError (grpc.aio's too) from inside as its typed LateserveError.

    `cancel` is called on the way out: a no-op once the call has finished, it stops the server
    when the caller leaves a stream early.
    """
    try:
        yield
    except grpc.RpcError as error:
        raise from_rpc_error(error) from error
    finally:
        if cancel is not None:
            cancel()


@dataclass(frozen=True, slots=True)
class Unary(Generic[_R]):
    """A unary call to make: the stub's method, its request, and the converter of its response."""

    method: Callable[..., Any]
    request: Any
    convert: Callable[[Any], _R]


@dataclass(frozen=True, slots=True)
class Stream:
    """A StreamPool call to make: the stub's server-streaming method and its request."""

    method: Callable[..., Any]
    request: StreamPoolRequest


class _Rpc:
    """A client method written once, as a builder; each client class gets its own real method of it.

    The method is made (`_make`) for the class in the accessed class's MRO that defines how to run
    this kind of call (`_runner`: LateserveClient or AsyncLateserveClient), as if written there,
    and carries the builder's name, signature and docstring with that client's return annotation.
    """

    _runner: str  # the name of the client class attribute that runs this kind of call

    def __init__(self, build: Callable[..., Any]) -> None:
        self.build = build
        self.__doc__ = build.__doc__
        self._methods: dict[type, Callable[..., Any] | None] = {}  # accessed class: its method

    def _make(self, client: type[ClientCore[Any]]) -> tuple[Callable[..., Any], Any]:
        """The bare method for the client class, and its return annotation."""
        raise NotImplementedError

    def _method(self, cls: type[ClientCore[Any]]) -> Callable[..., Any] | None:
        """The method of `cls` (None for ClientCore itself, which runs no calls)."""
        if cls not in self._methods:
            client = next(c for c in cls.__mro__ if self._runner in vars(c))
            if client is ClientCore:
                method = None
            elif client is cls:
                method = self._finish(cls)
            else:
                method = self._method(client)
            self._methods[cls] = method
        return self._methods[cls]

    def _finish(self, client: type[ClientCore[Any]]) -> Callable[..., Any]:
        method, returns = self._make(client)
        functools.update_wrapper(method, self.build)
        method.__module__ = client.__module__
        method.__qualname__ = f"{client.__qualname__}.{self.build.__name__}"
        method.__annotations__ = {**self.build.__annotations__, "return": returns}
        method.__signature__ = inspect.signature(self.build).replace(  # type: ignore[attr-defined]
            return_annotation=returns
        )
        return method

    def _bind(self, obj: ClientCore[Any] | None, owner: type[ClientCore[Any]] | None) -> Any:
        cls = type(obj) if obj is not None else owner
        method = None if cls is None else self._method(cls)
        if method is None:
            return self
        return method if obj is None else MethodType(method, obj)


class _UnaryRpc(_Rpc, Generic[_P, _R]):
    """A unary RPC method: returns the converted reply, or (asyncio client) an awaitable of it."""

    _runner = "_unary_method"

    def __init__(self, build: Callable[Concatenate[Any, _P], Unary[_R]]) -> None:
        super().__init__(build)

    def _make(self, client: type[ClientCore[Any]]) -> tuple[Callable[..., Any], Any]:
        returns = typing.get_args(typing.get_type_hints(self.build)["return"])[0]  # R of Unary[R]
        return client._unary_method(self.build), returns

    @overload
    def __get__(self, obj: None, owner: type[LateserveClient]) -> Callable[Concatenate[LateserveClient, _P], _R]: ...
    @overload
    def __get__(
        self, obj: None, owner: type[AsyncLateserveClient]
    ) -> Callable[Concatenate[AsyncLateserveClient, _P], Coroutine[Any, Any, _R]]: ...
    @overload
    def __get__(self, obj: LateserveClient, owner: type[Any] | None = None) -> Callable[_P, _R]: ...
    @overload
    def __get__(
        self, obj: AsyncLateserveClient, owner: type[Any] | None = None
    ) -> Callable[_P, Coroutine[Any, Any, _R]]: ...
    def __get__(self, obj: ClientCore[Any] | None, owner: type[ClientCore[Any]] | None = None) -> Any:
        return self._bind(obj, owner)


class _StreamRpc(_Rpc, Generic[_P]):
    """A StreamPool method: returns an iterator (asyncio client: an async iterator) of chunks.

    The request is built, and so validated, when the method is called, in either client.
    """

    _runner = "_stream"

    def __init__(self, build: Callable[Concatenate[Any, _P], Stream]) -> None:
        super().__init__(build)

    def _make(self, client: type[ClientCore[Any]]) -> tuple[Callable[..., Any], Any]:
        build = self.build

        def method(self: ClientCore[Any], /, *args: Any, **kwargs: Any) -> Any:
            return self._stream(build(self, *args, **kwargs))

        return method, typing.get_type_hints(client._stream)["return"]

    @overload
    def __get__(
        self, obj: None, owner: type[LateserveClient]
    ) -> Callable[Concatenate[LateserveClient, _P], Iterator[Chunk]]: ...
    @overload
    def __get__(
        self, obj: None, owner: type[AsyncLateserveClient]
    ) -> Callable[Concatenate[AsyncLateserveClient, _P], AsyncIterator[Chunk]]: ...
    @overload
    def __get__(self, obj: LateserveClient, owner: type[Any] | None = None) -> Callable[_P, Iterator[Chunk]]: ...
    @overload
    def __get__(
        self, obj: AsyncLateserveClient, owner: type[Any] | None = None
    ) -> Callable[_P, AsyncIterator[Chunk]]: ...
    def __get__(self, obj: ClientCore[Any] | None, owner: type[ClientCore[Any]] | None = None) -> Any:
        return self._bind(obj, owner)


def _arguments(builder_locals: dict[str, Any]) -> dict[str, Any]:
    """A builder's arguments by name, read from its `locals()` before it binds anything else, for the
    requests.py function of the same parameters: the parameter list is spelled once, in the signature."""
    return {name: value for name, value in builder_locals.items() if name != "self"}


class ClientCore(Generic[_Channel]):
    """What the blocking and the asyncio client share: the channel's stubs, the per-call metadata (the API
    key) and every RPC method.

    A client class supplies `_connect` (open its kind of channel), `_unary_method` (make the
    method that runs a builder's unary call, blocking or awaited) and `_stream` (run a
    StreamPool call as an iterator or an async iterator).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        max_message_bytes: int = 64 << 20,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
    ) -> None:
        self._channel: _Channel = self._connect(target, credentials, requests.channel_options(max_message_bytes))
        self._timeout = timeout
        # Sent with every call rather than as call credentials, which gRPC only allows on TLS channels: a
        # server behind a TLS-terminating proxy, or on loopback, still gets its key.
        self._metadata: tuple[tuple[str, str], ...] = requests.auth_metadata(api_key)
        self._rerank = rerank_service_pb2_grpc.RerankServiceStub(self._channel)
        self._score = score_service_pb2_grpc.ScoreServiceStub(self._channel)
        self._pool = pool_service_pb2_grpc.PoolServiceStub(self._channel)
        self._embed = embed_service_pb2_grpc.EmbedServiceStub(self._channel)
        self._tokenize = tokenize_service_pb2_grpc.TokenizeServiceStub(self._channel)
        self._info = info_service_pb2_grpc.InfoServiceStub(self._channel)

    def _connect(
        self, target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, int]]
    ) -> _Channel:
        """The channel to `target`: insecure when credentials is None."""
        raise NotImplementedError

    @staticmethod
    def _unary_method(build: Callable[..., Unary[Any]]) -> Callable[..., Any]:
        """The method of a unary builder: builds the call, runs it and converts the reply."""
        raise NotImplementedError

    def _stream(self, call: Stream) -> Iterator[Chunk] | AsyncIterator[Chunk]:
        """Runs a StreamPool call, yielding each input's array as it completes."""
        raise NotImplementedError

    @_UnaryRpc
    def rerank(
        self,
        query: InputLike,
        documents: Sequence[InputLike],
        *,
        top_n: int | None = None,
        model: str = "",
        truncate_prompt_tokens: int | None = None,
        embedding_mode: EmbeddingModeName | None = None,
        score_mode: str = "",
        request_id: str = "",
        max_tokens_per_doc: int | None = None,
        max_tokens_per_query: int | None = None,
    ) -> Unary[Ranking]:
        """Ranks documents against the query, best first (only the best top_n when given).

        max_tokens_per_doc / max_tokens_per_query (> 0): cut each document's / the query's text to its first
        that many tokens (special tokens not counted) before scoring, as vLLM's fields of the same names."""
        request = requests.rerank_request(**_arguments(locals()))
        return Unary(self._rerank.Rerank, request, responses.ranking)

    @_UnaryRpc
    def score(
        self,
        queries: InputLike | Sequence[InputLike],
        documents: InputLike | Sequence[InputLike],
        *,
        model: str = "",
        truncate_prompt_tokens: int | None = None,
        embedding_mode: EmbeddingModeName | None = None,
        score_mode: str = "",
        request_id: str = "",
        max_tokens_per_doc: int | None = None,
        max_tokens_per_query: int | None = None,
    ) -> Unary[Scores]:
        """Scores pairs: one query against every document, or queries and documents zipped.

        max_tokens_per_doc / max_tokens_per_query as rerank()."""
        request = requests.score_request(**_arguments(locals()))
        return Unary(self._score.Score, request, responses.scores)

    @_UnaryRpc
    def pool(
        self,
        inputs: InputLike | Sequence[InputLike],
        *,
        task: Task | None = "token_embed",
        model: str = "",
        dtype: WireDtype | None = "float32",
        normalize: bool | None = None,
        truncate_prompt_tokens: int | None = None,
        embedding_mode: EmbeddingModeName | None = None,
        return_lexical_weights: bool = False,
        request_id: str = "",
        pool_factor: int | None = None,
        mask_non_image_embeddings: bool = False,
    ) -> Unary[Pooled]:
        """Pooled outputs (float32 arrays, input order) in one message; see pool_stream for big ones.

        pool_factor (token_embed, late-interaction models): colpali-style hierarchical token pooling, at most
        n // pool_factor vectors per input; mask_non_image_embeddings: only the image tokens' vectors of
        inputs with images (applied first)."""
        request = requests.pool_request(**_arguments(locals()))
        return Unary(self._pool.Pool, request, responses.pooled)

    @_StreamRpc
    def pool_stream(
        self,
        inputs: InputLike | Sequence[InputLike],
        *,
        task: Task | None = "token_embed",
        model: str = "",
        dtype: WireDtype | None = "float32",
        normalize: bool | None = None,
        truncate_prompt_tokens: int | None = None,
        embedding_mode: EmbeddingModeName | None = None,
        max_chunk_bytes: int | None = None,
        request_id: str = "",
        pool_factor: int | None = None,
        mask_non_image_embeddings: bool = False,
    ) -> Stream:
        """Yields (input index, float32 array) as each input completes, over StreamPool; pool_factor and
        mask_non_image_embeddings as pool().

        The request is built (and validated) now; the call starts on the first iteration.
        """
        request = requests.stream_pool_request(**_arguments(locals()))
        return Stream(self._pool.StreamPool, request)

    @_UnaryRpc
    def embed(
        self,
        inputs: InputLike | Sequence[InputLike],
        *,
        model: str = "",
        dimensions: int | None = None,
        normalize: bool | None = None,
        dtype: WireDtype | None = "float32",
        truncate_prompt_tokens: int | None = None,
        request_id: str = "",
    ) -> Unary[Pooled]:
        """One [dim] vector per input (bi-encoders, BGE-M3 dense)."""
        request = requests.embed_request(**_arguments(locals()))
        return Unary(self._embed.Embed, request, responses.embedded)

    @_UnaryRpc
    def tokenize(
        self, prompt: str, *, model: str = "", add_special_tokens: bool = True, return_token_strs: bool = False
    ) -> Unary[TokenizeResult]:
        """Token ids of a prompt with the served model's tokenizer."""
        request = requests.tokenize_request(
            prompt, model=model, add_special_tokens=add_special_tokens, return_token_strs=return_token_strs
        )
        return Unary(self._tokenize.Tokenize, request, responses.tokenized)

    @_UnaryRpc
    def detokenize(self, tokens: Sequence[int], *, model: str = "") -> Unary[str]:
        """The text of token ids."""
        return Unary(self._tokenize.Detokenize, requests.detokenize_request(tokens, model=model), responses.detokenized)

    @_UnaryRpc
    def info(self) -> Unary[ServerInfo]:
        """The served models, server version and limits."""
        return Unary(self._info.GetInfo, requests.info_request(), responses.server_info)
