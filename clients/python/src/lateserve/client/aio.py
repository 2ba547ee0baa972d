"""Asyncio client: the same API as sync.LateserveClient, with awaitable methods.

Methods only wire builders (requests.py) to converters (responses.py), exactly as the blocking
client does, so both behave identically; keep the two files in step.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

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

_R = TypeVar("_R")


class AsyncLateserveClient:
    """Asyncio lateserve client. Use as an async context manager, or await close().

    `timeout` is the deadline in seconds of every call (None: no deadline); `max_message_bytes`
    caps messages both ways (64 MiB default; use pool_stream for larger outputs).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        max_message_bytes: int = 64 << 20,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        options = requests.channel_options(max_message_bytes)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._timeout = timeout
        self._rerank = rerank_service_pb2_grpc.RerankServiceStub(self._channel)
        self._score = score_service_pb2_grpc.ScoreServiceStub(self._channel)
        self._pool = pool_service_pb2_grpc.PoolServiceStub(self._channel)
        self._embed = embed_service_pb2_grpc.EmbedServiceStub(self._channel)
        self._tokenize = tokenize_service_pb2_grpc.TokenizeServiceStub(self._channel)
        self._info = info_service_pb2_grpc.InfoServiceStub(self._channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel; in-flight calls are cancelled."""
        await self._channel.close()

    async def _unary(self, method: Callable[..., Awaitable[_R]], request: Any) -> _R:
        try:
            return await method(request, timeout=self._timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error

    async def rerank(
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
    ) -> Ranking:
        """Ranks documents against the query, best first (only the best top_n when given)."""
        request = requests.rerank_request(
            query,
            documents,
            top_n=top_n,
            model=model,
            truncate_prompt_tokens=truncate_prompt_tokens,
            embedding_mode=embedding_mode,
            score_mode=score_mode,
            request_id=request_id,
        )
        return responses.ranking(await self._unary(self._rerank.Rerank, request))

    async def score(
        self,
        queries: InputLike | Sequence[InputLike],
        documents: InputLike | Sequence[InputLike],
        *,
        model: str = "",
        truncate_prompt_tokens: int | None = None,
        embedding_mode: EmbeddingModeName | None = None,
        score_mode: str = "",
        request_id: str = "",
    ) -> Scores:
        """Scores pairs: one query against every document, or queries and documents zipped."""
        request = requests.score_request(
            queries,
            documents,
            model=model,
            truncate_prompt_tokens=truncate_prompt_tokens,
            embedding_mode=embedding_mode,
            score_mode=score_mode,
            request_id=request_id,
        )
        return responses.scores(await self._unary(self._score.Score, request))

    async def pool(
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
    ) -> Pooled:
        """Pooled outputs (float32 arrays, input order) in one message; see pool_stream for big ones."""
        request = requests.pool_request(
            inputs,
            task=task,
            model=model,
            dtype=dtype,
            normalize=normalize,
            truncate_prompt_tokens=truncate_prompt_tokens,
            embedding_mode=embedding_mode,
            return_lexical_weights=return_lexical_weights,
            request_id=request_id,
        )
        return responses.pooled(await self._unary(self._pool.Pool, request))

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
    ) -> AsyncIterator[tuple[int, responses.Array]]:
        """Yields (input index, float32 array) as each input completes, over StreamPool.

        The request is built (and validated) now; the call starts on the first iteration.
        """
        request = requests.stream_pool_request(
            inputs,
            task=task,
            model=model,
            dtype=dtype,
            normalize=normalize,
            truncate_prompt_tokens=truncate_prompt_tokens,
            embedding_mode=embedding_mode,
            max_chunk_bytes=max_chunk_bytes,
            request_id=request_id,
        )
        return self._stream_pool(request)

    async def _stream_pool(self, request: StreamPoolRequest) -> AsyncIterator[tuple[int, responses.Array]]:
        assembler = responses.StreamAssembler()
        call = self._pool.StreamPool(request, timeout=self._timeout)
        try:
            async for message in call:
                done = assembler.feed(message)
                if done is not None:
                    yield done
            assembler.finish()
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        finally:
            call.cancel()  # no-op once finished; stops the server when the caller breaks early

    async def embed(
        self,
        inputs: InputLike | Sequence[InputLike],
        *,
        model: str = "",
        dimensions: int | None = None,
        normalize: bool | None = None,
        dtype: WireDtype | None = "float32",
        truncate_prompt_tokens: int | None = None,
        request_id: str = "",
    ) -> Pooled:
        """One [dim] vector per input (bi-encoders, BGE-M3 dense)."""
        request = requests.embed_request(
            inputs,
            model=model,
            dimensions=dimensions,
            normalize=normalize,
            dtype=dtype,
            truncate_prompt_tokens=truncate_prompt_tokens,
            request_id=request_id,
        )
        return responses.embedded(await self._unary(self._embed.Embed, request))

    async def tokenize(
        self, prompt: str, *, model: str = "", add_special_tokens: bool = True, return_token_strs: bool = False
    ) -> TokenizeResult:
        """Token ids of a prompt with the served model's tokenizer."""
        request = requests.tokenize_request(
            prompt, model=model, add_special_tokens=add_special_tokens, return_token_strs=return_token_strs
        )
        return responses.tokenized(await self._unary(self._tokenize.Tokenize, request))

    async def detokenize(self, tokens: Sequence[int], *, model: str = "") -> str:
        """The text of token ids."""
        request = requests.detokenize_request(tokens, model=model)
        return responses.detokenized(await self._unary(self._tokenize.Detokenize, request))

    async def info(self) -> ServerInfo:
        """The served models, server version and limits."""
        return responses.server_info(await self._unary(self._info.GetInfo, requests.info_request()))
