"""Domain types shared by services, engine, scheduler and families. No proto, no torch, no asyncio."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt


class Task(StrEnum):
    """Pooling tasks, named as vLLM names them."""

    TOKEN_EMBED = "token_embed"
    TOKEN_CLASSIFY = "token_classify"
    EMBED = "embed"
    CLASSIFY = "classify"


class ModelKind(StrEnum):
    """How a model scores a pair; picks the /score and /rerank procedure (vllm-spec 2.2)."""

    LATE_INTERACTION = "late-interaction"
    BI_ENCODER = "bi-encoder"
    CROSS_ENCODER = "cross-encoder"


class EmbeddingMode(StrEnum):
    """Late-interaction input encoding: vLLM's raw text, or faithful ColBERT query/document.

    AUTO is the server's choice: raw, except that /score and /rerank on a server started with
    --scoring-embedding-mode faithful encode queries as QUERY and documents as DOCUMENT. The
    engine resolves it, so families never see AUTO."""

    AUTO = "auto"
    RAW = "raw"
    QUERY = "query"
    DOCUMENT = "document"


class TruncationSide(StrEnum):
    """Which end truncation removes: left keeps the last N tokens (vLLM's default)."""

    LEFT = "left"
    RIGHT = "right"


@dataclass(frozen=True, slots=True)
class TextPart:
    """A text content part."""

    text: str


@dataclass(frozen=True, slots=True)
class ImagePart:
    """An image content part, by URL (data: URLs always; http only where allowed)."""

    url: str


Part = TextPart | ImagePart


@dataclass(frozen=True, slots=True)
class TextItem:
    """Plain text to tokenize."""

    text: str


@dataclass(frozen=True, slots=True)
class TokenItem:
    """Pre-tokenized input, used as given."""

    ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class MultiModalItem:
    """Text and media parts (vision families)."""

    parts: tuple[Part, ...]


Item = TextItem | TokenItem | MultiModalItem


@dataclass(frozen=True, slots=True)
class EncodeOptions:
    """How inputs are tokenized. truncate_prompt_tokens None rejects over-long input; -1 = max_model_len."""

    truncate_prompt_tokens: int | None = None
    truncation_side: TruncationSide = TruncationSide.LEFT
    add_special_tokens: bool = True
    embedding_mode: EmbeddingMode = EmbeddingMode.AUTO


@dataclass(frozen=True, slots=True)
class Sequence:
    """One tokenized input ready for a worker: ids plus the attention mask the family wants.

    `attention_mask` None means all ones; faithful ColBERT queries mask their [MASK] expansion.
    `keep` None keeps every output row; otherwise the indices of rows to return (skiplist).
    """

    ids: tuple[int, ...]
    attention_mask: tuple[int, ...] | None = None
    keep: tuple[int, ...] | None = None
    prompt_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.ids)


@dataclass(slots=True)
class Timings:
    """Where a request's time went, in nanoseconds."""

    tokenize_ns: int = 0
    queue_ns: int = 0
    inference_ns: int = 0
    total_ns: int = 0

    def merge_max(self, other: Timings) -> None:
        """Items run in parallel, so a request waits as long as its slowest item."""
        self.queue_ns = max(self.queue_ns, other.queue_ns)
        self.inference_ns = max(self.inference_ns, other.inference_ns)


Array = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One sequence and what to compute for it: the unit the scheduler batches."""

    sequence: Sequence
    tasks: frozenset[Task]
    normalize: bool = True


# What a worker returns for one WorkItem: a float32 array per task asked for.
ItemOutputs = dict[Task, Array]
