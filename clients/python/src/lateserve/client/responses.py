"""Pure response converters: lateserve.v1 response messages in, client result types out.

Shared by the sync and the asyncio client (including the StreamPool reassembly), so decoding
rules are written once and unit-tested without a server.
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from lateserve.client.errors import ProtocolError
from lateserve.client.types import (
    Document,
    LexicalWeight,
    Limits,
    ModelInfo,
    Pooled,
    Ranking,
    RerankResult,
    Scores,
    ServerInfo,
    Timings,
    TokenizeResult,
    Usage,
)
from lateserve.v1 import common_pb2, info_service_pb2, pool_service_pb2
from lateserve.v1.embed_service_pb2 import EmbedResponse
from lateserve.v1.rerank_service_pb2 import RerankResponse
from lateserve.v1.score_service_pb2 import ScoreResponse
from lateserve.v1.tokenize_service_pb2 import DetokenizeResponse, TokenizeResponse
from lateserve.wire import status as wire_status
from lateserve.wire.tensors import from_tensor

Array = npt.NDArray[np.float32]


def usage(message: common_pb2.Usage) -> Usage:
    """Usage dataclass of a Usage message."""
    return Usage(prompt_tokens=message.prompt_tokens, total_tokens=message.total_tokens)


def timings(message: common_pb2.Timings) -> Timings:
    """Timings dataclass of a Timings message."""
    return Timings(
        tokenize_ns=message.tokenize_ns,
        queue_ns=message.queue_ns,
        inference_ns=message.inference_ns,
        total_ns=message.total_ns,
    )


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    """ "late_interaction" for MODEL_KIND_LATE_INTERACTION; the number as text for values this client predates."""
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix).lower()


def document(message: common_pb2.Input) -> Document:
    """An Input back in the form the caller sent it: str, list of token ids, or {"content": [...]}."""
    kind = message.WhichOneof("kind")
    if kind == "token_ids":
        return list(message.token_ids.ids)
    if kind == "content":
        parts: list[dict[str, object]] = []
        for part in message.content.parts:
            if part.WhichOneof("kind") == "image_url":
                parts.append({"type": "image_url", "image_url": {"url": part.image_url.url}})
            else:
                parts.append({"type": "text", "text": part.text})
        return {"content": parts}
    return message.text


def ranking(response: RerankResponse) -> Ranking:
    """Ranking of a RerankResponse, keeping the server's order (best first)."""
    results = [
        RerankResult(index=r.index, relevance_score=r.relevance_score, document=document(r.document))
        for r in response.results
    ]
    return Ranking(
        results=results,
        usage=usage(response.usage),
        id=response.id,
        model=response.model,
        timings=timings(response.timings),
    )


def scores(response: ScoreResponse) -> Scores:
    """Scores of a ScoreResponse, in pair order."""
    ordered = sorted(response.results, key=lambda r: r.index)
    return Scores(
        scores=[r.score for r in ordered],
        usage=usage(response.usage),
        id=response.id,
        model=response.model,
        timings=timings(response.timings),
    )


def lexical_weights(weights: Any) -> list[LexicalWeight]:
    """LexicalWeight dataclasses of repeated LexicalWeight messages."""
    return [LexicalWeight(token_id=w.token_id, token=w.token, weight=w.weight) for w in weights]


def pooled(response: pool_service_pb2.PoolResponse) -> Pooled:
    """Pooled of a PoolResponse: one float32 array per input, in input order."""
    ordered = sorted(response.outputs, key=lambda o: o.index)
    return Pooled(
        arrays=[from_tensor(o.data) for o in ordered],
        usage=usage(response.usage),
        id=response.id,
        model=response.model,
        timings=timings(response.timings),
        lexical_weights=[lexical_weights(o.lexical_weights) for o in ordered],
    )


def embedded(response: EmbedResponse) -> Pooled:
    """Pooled of an EmbedResponse: one [dim] float32 vector per input, in input order."""
    ordered = sorted(response.embeddings, key=lambda e: e.index)
    return Pooled(
        arrays=[from_tensor(e.data) for e in ordered],
        usage=usage(response.usage),
        id=response.id,
        model=response.model,
        timings=timings(response.timings),
        lexical_weights=[[] for _ in ordered],
    )


def tokenized(response: TokenizeResponse) -> TokenizeResult:
    """TokenizeResult of a TokenizeResponse."""
    return TokenizeResult(
        tokens=list(response.tokens),
        count=response.count,
        max_model_len=response.max_model_len,
        token_strs=list(response.token_strs),
    )


def detokenized(response: DetokenizeResponse) -> str:
    """The text of a DetokenizeResponse."""
    return response.prompt


def model_info(message: info_service_pb2.ModelInfo) -> ModelInfo:
    """ModelInfo of a ModelInfo message, enums as lower-case names."""
    return ModelInfo(
        id=message.id,
        source=message.source,
        architecture=message.architecture,
        kind=_enum_name(common_pb2.ModelKind, message.kind, "MODEL_KIND_"),
        token_dim=message.token_dim,
        embed_dim=message.embed_dim,
        max_model_len=message.max_model_len,
        tasks=[_enum_name(common_pb2.PoolingTask, t, "POOLING_TASK_") for t in message.tasks],
        score_modes=list(message.score_modes),
        dtype=message.dtype,
        device=message.device,
        workers=message.workers,
    )


def server_info(response: info_service_pb2.GetInfoResponse) -> ServerInfo:
    """ServerInfo of a GetInfoResponse."""
    limits = response.limits
    return ServerInfo(
        models=[model_info(m) for m in response.models],
        version=response.version,
        limits=Limits(
            max_num_batched_tokens=limits.max_num_batched_tokens,
            max_num_seqs=limits.max_num_seqs,
            max_queued_requests=limits.max_queued_requests,
            max_message_bytes=limits.max_message_bytes,
        ),
    )


def _protocol_error(message: str) -> ProtocolError:
    return ProtocolError(grpc.StatusCode.INTERNAL, wire_status.INTERNAL, message)


class StreamAssembler:
    """Reassembles StreamPool row chunks into one array per input.

    Chunks of an input arrive in row order and inputs in input order; anything else is a
    ProtocolError, because silently misplacing rows would corrupt embeddings. Feed every message;
    `feed` returns (index, array) when an input completes. Usage and timings are kept from the
    last message that carries them.
    """

    def __init__(self) -> None:
        self._chunks: dict[int, list[Array]] = {}
        self._rows: dict[int, int] = {}
        self._done: set[int] = set()
        self.usage = Usage()
        self.timings = Timings()

    def feed(self, message: pool_service_pb2.StreamPoolResponse) -> tuple[int, Array] | None:
        """Takes one message; returns the completed (index, array) on an input's last chunk."""
        if message.HasField("usage"):
            self.usage = usage(message.usage)
        if message.HasField("timings"):
            self.timings = timings(message.timings)
        index = message.index
        if index in self._done:
            raise _protocol_error(f"StreamPool sent input {index} again after its last chunk")
        if message.HasField("data"):
            chunk = from_tensor(message.data)
            received = self._rows.get(index, 0)
            if message.row_offset != received:
                raise _protocol_error(
                    f"StreamPool chunk of input {index} starts at row {message.row_offset}, expected {received}"
                )
            self._chunks.setdefault(index, []).append(chunk)
            self._rows[index] = received + (chunk.shape[0] if chunk.ndim else 1)
        if not message.last_chunk:
            return None
        return index, self._complete(index, message.total_rows)

    def _complete(self, index: int, total_rows: int) -> Array:
        chunks = self._chunks.pop(index, [])
        self._rows.pop(index, None)
        self._done.add(index)
        if not chunks:
            raise _protocol_error(f"StreamPool ended input {index} without data")
        array = chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=0)
        # 1-D outputs travel whole; only matrices are split into rows, so only they are checked.
        if array.ndim >= 2 and total_rows and array.shape[0] != total_rows:
            raise _protocol_error(f"StreamPool input {index} has {array.shape[0]} rows, expected {total_rows}")
        return array

    def finish(self) -> None:
        """Call at the end of the stream: an input left half-sent is a ProtocolError."""
        if self._chunks:
            raise _protocol_error(f"StreamPool ended before inputs {sorted(self._chunks)} were complete")
