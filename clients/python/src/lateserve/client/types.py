"""Plain result types of the client: frozen dataclasses, so callers never touch protobuf messages.

Results are values (frozen) so they can be shared and cached safely; arrays are numpy float32
whatever dtype travelled on the wire.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

import numpy as np
import numpy.typing as npt

from lateserve.v1.common_pb2 import Input

# What callers may pass as one input: text, token ids, {"content": [parts]} (OpenAI-style parts),
# or an already-built lateserve.v1.Input message.
InputLike: TypeAlias = str | Sequence[int] | Mapping[str, object] | Input
Task: TypeAlias = Literal["token_embed", "token_classify", "embed", "classify"]
WireDtype: TypeAlias = Literal["float32", "float16", "bfloat16"]
EmbeddingModeName: TypeAlias = Literal["raw", "query", "document"]
TruncationSideName: TypeAlias = Literal["left", "right"]
# What RerankResult.document gives back: the document in the form it was sent.
Document: TypeAlias = str | list[int] | dict[str, object]


@dataclass(frozen=True, slots=True)
class Usage:
    """Token accounting, as vLLM's usage object."""

    prompt_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Timings:
    """Where the server spent the request's time, in nanoseconds."""

    tokenize_ns: int = 0
    queue_ns: int = 0
    inference_ns: int = 0
    total_ns: int = 0


@dataclass(frozen=True, slots=True)
class RerankResult:
    """One ranked document: its position in the request, its score, and the document as sent."""

    index: int
    relevance_score: float
    document: Document


@dataclass(frozen=True, slots=True)
class Ranking:
    """Documents sorted by relevance, best first (cut to top_n)."""

    results: list[RerankResult]
    usage: Usage
    id: str
    model: str
    timings: Timings = field(default_factory=Timings)


@dataclass(frozen=True, slots=True)
class Scores:
    """One score per query/document pair, in pair order."""

    scores: list[float]
    usage: Usage
    id: str
    model: str
    timings: Timings = field(default_factory=Timings)


@dataclass(frozen=True, slots=True)
class LexicalWeight:
    """A token weight in FlagEmbedding's lexical-weights form (sparse models)."""

    token_id: int
    token: str
    weight: float


@dataclass(frozen=True, slots=True)
class Pooled:
    """Pooled outputs in input order: [n_tokens, dim] for token_embed, [dim] for embed, and so on."""

    arrays: list[npt.NDArray[np.float32]]
    usage: Usage
    id: str
    model: str
    timings: Timings = field(default_factory=Timings)
    # Per input, when return_lexical_weights was asked for; otherwise empty lists.
    lexical_weights: list[list[LexicalWeight]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class TokenizeResult:
    """Token ids of a prompt, with their strings when asked for."""

    tokens: list[int]
    count: int
    max_model_len: int
    token_strs: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One served model; kind and tasks are lower-case names ("late_interaction", "token_embed")."""

    id: str
    source: str
    architecture: str
    kind: str
    token_dim: int
    embed_dim: int
    max_model_len: int
    tasks: list[str]
    score_modes: list[str]
    dtype: str
    device: str
    workers: int


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits the server enforces (0 where the server did not say)."""

    max_num_batched_tokens: int = 0
    max_num_seqs: int = 0
    max_queued_requests: int = 0
    max_message_bytes: int = 0


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """The server description: its models, version and limits."""

    models: list[ModelInfo]
    version: str
    limits: Limits
