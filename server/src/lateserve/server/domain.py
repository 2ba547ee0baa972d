"""The server's domain: inputs, content parts, prepared inputs, tasks, options, results, errors.

The bottom layer: every other layer of the server imports it, and it imports nothing of theirs (no
proto, grpc, torch or asyncio). Each error class fixes a gRPC status code name and a default reason;
the one mapping to google.rpc.Status is `lateserve.server.rpc.to_rpc_status`.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from lateserve.wire import reasons


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


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One chat message: a role and its content parts (text and images, in order)."""

    role: str
    parts: tuple[Part, ...]


@dataclass(frozen=True, slots=True)
class ChatItem:
    """Chat messages to render with the chat template (vLLM's `messages`); rendered during input
    preparation, off the event loop, into a RenderedChat."""

    messages: tuple[ChatMessage, ...]
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    template_kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def images(self) -> tuple[ImagePart, ...]:
        return tuple(p for m in self.messages for p in m.parts if isinstance(p, ImagePart))


@dataclass(frozen=True, slots=True)
class RenderedChat:
    """A chat rendered by its template: the prompt text, with each image's placeholder where the
    template put it, and the images in the order their placeholders appear."""

    text: str
    images: tuple[ImagePart, ...] = ()


Item = TextItem | TokenItem | MultiModalItem | ChatItem | RenderedChat


@dataclass(frozen=True, slots=True)
class EncodeOptions:
    """How inputs are tokenized. truncate_prompt_tokens None rejects over-long input; -1 = max_model_len."""

    truncate_prompt_tokens: int | None = None
    truncation_side: TruncationSide = TruncationSide.LEFT
    add_special_tokens: bool = True
    embedding_mode: EmbeddingMode = EmbeddingMode.AUTO
    mm_processor_kwargs: tuple[tuple[str, Any], ...] = ()
    """Per-request image processor settings over the server's --mm-processor-kwargs (vision families)."""


# Array dtypes that cross the worker boundary. bfloat16 has no numpy dtype: it travels as its 16-bit
# pattern (the upper half of a float32) and workers view it as torch.bfloat16.
TENSOR_DTYPES: dict[str, np.dtype[Any]] = {
    "uint8": np.dtype(np.uint8),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),
    "float32": np.dtype(np.float32),
}


@dataclass(frozen=True, slots=True)
class Tensor:
    """An array of any supported dtype as raw little-endian bytes and a shape.

    Why bytes: worker messages are pickled, and pickling bytes is one copy where a list or tuple of
    numbers is pickled element by element. Immutable and hashable, so media payloads can be cached.

    >>> t = Tensor.from_numpy(np.arange(6, dtype=np.int64).reshape(2, 3))
    >>> t.shape, t.dtype, t.to_numpy().tolist()
    ((2, 3), 'int64', [[0, 1, 2], [3, 4, 5]])
    >>> b = Tensor.bfloat16(np.array([1.0, -2.5, 3.140625], dtype=np.float32))
    >>> b.dtype, b.to_float32().tolist()
    ('bfloat16', [1.0, -2.5, 3.140625])
    """

    data: bytes
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def from_numpy(cls, array: npt.NDArray[Any], dtype: str | None = None) -> Tensor:
        name = dtype or str(np.asarray(array).dtype)
        if name not in TENSOR_DTYPES or name == "bfloat16":
            raise ValueError(f"unsupported tensor dtype {name!r} (bfloat16: use Tensor.bfloat16)")
        a = np.ascontiguousarray(array, dtype=TENSOR_DTYPES[name].newbyteorder("<"))
        return cls(a.tobytes(), tuple(int(n) for n in a.shape), name)

    @classmethod
    def bfloat16(cls, array: npt.NDArray[Any]) -> Tensor:
        """float32 -> bfloat16 with round-to-nearest-even, as torch's .to(torch.bfloat16) does."""
        f = np.ascontiguousarray(array, dtype="<f4")
        bits = f.view("<u4").astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
        return cls(rounded.tobytes(), tuple(int(n) for n in f.shape), "bfloat16")

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def to_numpy(self) -> npt.NDArray[Any]:
        """A read-only view of the bytes (bfloat16 as its uint16 bit pattern)."""
        return np.frombuffer(self.data, dtype=TENSOR_DTYPES[self.dtype].newbyteorder("<")).reshape(self.shape)

    def to_float32(self) -> npt.NDArray[np.float32]:
        """float32 as a zero-copy read-only view (outputs are unpacked on the event loop); others converted."""
        a = self.to_numpy()
        if self.dtype == "float32":
            return a
        if self.dtype == "bfloat16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float32)


class Modality(StrEnum):
    """What an input may carry besides text; each family declares the ones it reads (ModelSpec.modalities)."""

    TEXT = "text"
    IMAGE = "image"


@dataclass(frozen=True, slots=True)
class MediaPayload:
    """One prepared media item (an image): the arrays its encoder reads and where its tokens sit.

    `offset`/`length` locate the placeholder tokens in the sequence's ids that the encoder's outputs
    replace. `digest` hashes the source pixels and every setting that changed them, so the document
    cache never confuses two images with the same grid (their placeholder ids are identical).
    `cost` is the encoder's work in token units (e.g. patches), counted in batch and queue budgets.
    """

    modality: Modality
    arrays: tuple[tuple[str, Tensor], ...]
    offset: int
    length: int
    digest: bytes
    cost: int
    token_grid: tuple[int, int] | None = None
    """(rows, columns) of the placeholder tokens on the image, row-major, when they form a grid (ColQwen's
    merged patches): what similarity maps are drawn on. None when the tokens have no 2-D layout."""

    def array(self, name: str) -> Tensor:
        for key, tensor in self.arrays:
            if key == name:
                return tensor
        raise KeyError(name)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for _, t in self.arrays)


@dataclass(frozen=True, slots=True)
class Sequence:
    """One prepared input ready for a worker: token ids, what the family wants beside them, and its cost.

    `attention_mask` None means all ones; faithful ColBERT queries mask their [MASK] expansion.
    `keep` None keeps every output row; otherwise the indices of rows to return (skiplist).
    `token_type_ids` None means all zeros (cross-encoder text pairs set the second segment to 1).
    `media` holds the prepared images, in sequence order.
    """

    ids: tuple[int, ...]
    attention_mask: tuple[int, ...] | None = None
    keep: tuple[int, ...] | None = None
    prompt_tokens: int = 0
    token_type_ids: tuple[int, ...] | None = None
    media: tuple[MediaPayload, ...] = ()

    @property
    def num_tokens(self) -> int:
        return len(self.ids)

    @property
    def cost(self) -> int:
        """Budget units: text tokens plus the media encoders' work, for batching and admission."""
        return len(self.ids) + sum(m.cost for m in self.media)

    @property
    def nbytes(self) -> int:
        """Bytes held while queued (ids as int64 plus media arrays), for the queued-bytes bound."""
        return 8 * len(self.ids) + sum(m.nbytes for m in self.media)


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
    """L2-normalise embed / token_embed outputs (vLLM's `normalize`, default on)."""
    activation: bool = True
    """Apply the classifier's activation to classify outputs (vLLM's `use_activation`): sigmoid for one
    label. Workers return raw logits; the engine applies it, so cached and fresh outputs agree."""


# What a worker returns for one WorkItem: a float32 array per task asked for.
ItemOutputs = dict[Task, Array]


def trimmed_span(ids: Seq[int], bos_token_id: int | None, eos_token_id: int | None) -> tuple[int, int]:
    """[start, end) of the positions kept when a leading BOS and a trailing EOS are removed.

    Each check looks at the sequence as given, as vLLM's BOSEOSFilter does: `[0]` alone loses its BOS
    and `[2]` alone its EOS; a lone token that is both is removed once.
    """
    start = 1 if ids and bos_token_id is not None and ids[0] == bos_token_id else 0
    end = len(ids) - 1 if ids and eos_token_id is not None and ids[-1] == eos_token_id else len(ids)
    return start, max(start, end)


Role = Literal["query", "document", "input"]
"""Which side of a request an input is on (faithful encodings and the document cache differ by side)."""


@dataclass(frozen=True, slots=True)
class LexicalSpec:
    """What a sparse model's lexical weights need; ModelSpec.lexical when the model has one."""

    bos_token_id: int | None
    """Dropped from the front of token_classify outputs when the sequence starts with it."""
    eos_token_id: int | None
    """Dropped from the end of token_classify outputs when the sequence ends with it."""
    skip_ids: frozenset[int]
    """Ids never reported as lexical weights (FlagEmbedding: cls, eos, pad and unk)."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What the server knows about a model without its weights."""

    architecture: str
    kind: ModelKind
    tasks: frozenset[Task]
    default_task: Task
    token_dim: int
    embed_dim: int
    max_model_len: int
    score_modes: tuple[str, ...] = ()
    lexical: LexicalSpec | None = None
    """Present when the model has a sparse head (BGE-M3): what its lexical weights need."""
    matryoshka: bool = False
    """The embed vector may be cut to `dimensions` (Matryoshka-trained models)."""
    num_labels: int = 0
    """Classifier outputs (cross-encoders: 1, a relevance logit)."""
    modalities: frozenset[Modality] = frozenset({Modality.TEXT})
    """What the family's inputs may carry; an image sent to a text-only model is a 400."""

    @classmethod
    def late_interaction(cls, architecture: str, token_dim: int, max_model_len: int) -> ModelSpec:
        """A ColBERT-style model: token embeddings only (every ColBERT family but BGE-M3)."""
        return cls(
            architecture=architecture,
            kind=ModelKind.LATE_INTERACTION,
            tasks=frozenset({Task.TOKEN_EMBED}),
            default_task=Task.TOKEN_EMBED,
            token_dim=token_dim,
            embed_dim=0,
            max_model_len=max_model_len,
        )


# --- errors --------------------------------------------------------------------------------


class LateserveError(Exception):
    """Base of every error the server reports on purpose (anything else becomes INTERNAL)."""

    code_name = "INTERNAL"
    default_reason = reasons.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        field: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = metadata or {}
        self.field = field
        self.retry_after_s = retry_after_s


class InvalidArgument(LateserveError):
    """The request is malformed or asks for something impossible (HTTP 400)."""

    code_name = "INVALID_ARGUMENT"
    default_reason = reasons.INVALID_ARGUMENT


class InputTooLong(InvalidArgument):
    """An input has more tokens than max_model_len and no truncation was asked for."""

    default_reason = reasons.INPUT_TOO_LONG


def input_too_long(max_model_len: int, num_tokens: int, item: str) -> InputTooLong:
    """The over-long input error, worded as the newest vLLM (0.32, captured in the reference answers):
    the one place this message lives, so every route and family says the same thing and clients that
    match on "Please reduce the length of the input prompt" keep working. `item` is the request path.

    >>> input_too_long(512, 513, "documents[3]").message
    "This model's maximum context length is 512 tokens. However, your prompt contains at least 513 input tokens, \
which exceeds this limit even without any output tokens. Please reduce the length of the input prompt. \
(parameter=input_tokens, value=513)"
    """
    return InputTooLong(
        f"This model's maximum context length is {max_model_len} tokens. However, your prompt contains at least "
        f"{num_tokens} input tokens, which exceeds this limit even without any output tokens. Please reduce the "
        f"length of the input prompt. (parameter=input_tokens, value={num_tokens})",
        field=item,
        metadata={"maxModelLen": str(max_model_len), "inputTokens": str(num_tokens), "item": item},
    )


def truncation_too_large(truncate_prompt_tokens: int, max_model_len: int) -> InvalidArgument:
    """`truncate_prompt_tokens` over max_model_len, in the newest vLLM's words (which name both values).

    >>> truncation_too_large(101, 100).message
    'truncate_prompt_tokens value (101) is greater than max_model_len (100). Please, select a smaller truncation size.'
    """
    return InvalidArgument(
        f"truncate_prompt_tokens value ({truncate_prompt_tokens}) is greater than max_model_len ({max_model_len}). "
        "Please, select a smaller truncation size.",
        reason=reasons.TRUNCATION_TOO_LARGE,
        field="truncate_prompt_tokens",
        metadata={"truncatePromptTokens": str(truncate_prompt_tokens), "maxModelLen": str(max_model_len)},
    )


def truncation_cuts_image(truncate_prompt_tokens: int, num_tokens: int) -> InvalidArgument:
    """A truncation that would cut through an image's tokens (vision families refuse it rather than embed
    half a picture). vLLM has no such case; the wording follows its truncation message, both values named.

    >>> truncation_cuts_image(8, 70).message
    'truncate_prompt_tokens value (8) would cut an image: the input has 70 tokens including its image tokens. \
Please, select a larger truncation size.'
    """
    return InvalidArgument(
        f"truncate_prompt_tokens value ({truncate_prompt_tokens}) would cut an image: the input has {num_tokens} "
        "tokens including its image tokens. Please, select a larger truncation size.",
        field="truncate_prompt_tokens",
        metadata={"truncatePromptTokens": str(truncate_prompt_tokens), "inputTokens": str(num_tokens)},
    )


class UnsupportedTask(InvalidArgument):
    """The loaded model lacks the task (vLLM answers 400 "Unsupported task: ...")."""

    default_reason = reasons.UNSUPPORTED_TASK


class Unimplemented(LateserveError):
    """A capability the server or model does not have (HTTP 501)."""

    code_name = "UNIMPLEMENTED"
    default_reason = reasons.UNSUPPORTED_INPUT


class ModelNotFound(LateserveError):
    """The request names a model this server does not serve (HTTP 404)."""

    code_name = "NOT_FOUND"
    default_reason = reasons.MODEL_NOT_FOUND


class Overloaded(LateserveError):
    """The queue is full; retry later (HTTP 429 with Retry-After)."""

    code_name = "RESOURCE_EXHAUSTED"
    default_reason = reasons.QUEUE_FULL


class WorkerUnavailable(LateserveError):
    """No worker can run the work now (a worker died, or none is ready) (HTTP 503)."""

    code_name = "UNAVAILABLE"
    default_reason = reasons.WORKER_UNAVAILABLE


class ShuttingDown(WorkerUnavailable):
    """The server is draining after SIGTERM and takes no new work."""

    default_reason = reasons.SHUTTING_DOWN


class DeadlineExceeded(LateserveError):
    """The caller's deadline passed before the work finished."""

    code_name = "DEADLINE_EXCEEDED"
    default_reason = reasons.DEADLINE_EXCEEDED


class ModelLoadError(Exception):
    """A checkpoint cannot be loaded (missing/unexpected weights, unknown architecture).

    Raised at startup, never per request, so it is not a LateserveError.
    """
