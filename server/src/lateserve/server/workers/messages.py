"""Typed messages that cross the worker process boundary.

Token ids, masks, media arrays and outputs travel as `domain.Tensor` (raw bytes, shape, dtype: one
memcpy each, nothing pickled element by element). Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lateserve.server.domain import ItemOutputs, MediaPayload, Sequence, Task, Tensor, WorkItem


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything a child needs to load its replica; built in the parent, applied before torch loads."""

    model: str
    hf_overrides: dict[str, Any]
    trust_remote_code: bool
    max_model_len: int | None
    device: str
    dtype: str
    threads: int
    worker_id: int
    cuda_device: int | None = None


@dataclass(frozen=True, slots=True)
class PackedItem:
    """A WorkItem as it crosses the pipe: every int list as one int64 Tensor (bytes + shape), media
    payloads as their Tensors, so pickling copies a few buffers instead of one object per token."""

    ids: Tensor
    attention_mask: Tensor | None
    keep: Tensor | None
    token_type_ids: Tensor | None
    media: tuple[MediaPayload, ...]
    prompt_tokens: int
    tasks: tuple[Task, ...]
    normalize: bool
    activation: bool

    @classmethod
    def pack(cls, item: WorkItem) -> PackedItem:
        seq = item.sequence
        return cls(
            ids=_ints(seq.ids),
            attention_mask=None if seq.attention_mask is None else _ints(seq.attention_mask),
            keep=None if seq.keep is None else _ints(seq.keep),
            token_type_ids=None if seq.token_type_ids is None else _ints(seq.token_type_ids),
            media=seq.media,
            prompt_tokens=seq.prompt_tokens,
            tasks=tuple(sorted(item.tasks)),
            normalize=item.normalize,
            activation=item.activation,
        )

    def unpack(self) -> WorkItem:
        sequence = Sequence(
            ids=_tuple(self.ids),
            attention_mask=None if self.attention_mask is None else _tuple(self.attention_mask),
            keep=None if self.keep is None else _tuple(self.keep),
            prompt_tokens=self.prompt_tokens,
            token_type_ids=None if self.token_type_ids is None else _tuple(self.token_type_ids),
            media=self.media,
        )
        return WorkItem(sequence, frozenset(self.tasks), self.normalize, self.activation)


def _ints(values: tuple[int, ...]) -> Tensor:
    return Tensor.from_numpy(np.asarray(values, dtype=np.int64), "int64")


def _tuple(tensor: Tensor) -> tuple[int, ...]:
    return tuple(tensor.to_numpy().tolist())


@dataclass(frozen=True, slots=True)
class EncodeBatch:
    """A batch of work for one forward pass. `threads` > 0: compute it with that many CPU threads (the
    worker's own plus those lent by idle workers); 0: the worker's own count."""

    batch_id: int
    items: list[PackedItem]
    threads: int = 0

    @classmethod
    def pack(cls, batch_id: int, items: list[WorkItem], threads: int = 0) -> EncodeBatch:
        return cls(batch_id, [PackedItem.pack(item) for item in items], threads)

    def unpack(self) -> list[WorkItem]:
        return [item.unpack() for item in self.items]


@dataclass(frozen=True, slots=True)
class BatchResult:
    """The outputs of a batch, in item order, each array as a Tensor in the dtype the runner produced."""

    batch_id: int
    outputs: list[dict[Task, Tensor]]
    inference_ns: int
    threads: int = 1  # CPU threads the forward ran with (as torch reported them)

    @staticmethod
    def pack_outputs(outputs: list[ItemOutputs]) -> list[dict[Task, Tensor]]:
        return [{task: Tensor.from_numpy(np.asarray(arr)) for task, arr in out.items()} for out in outputs]

    def unpack_outputs(self) -> list[ItemOutputs]:
        return [{task: t.to_float32() for task, t in out.items()} for out in self.outputs]


@dataclass(frozen=True, slots=True)
class BatchFailed:
    """The forward pass raised; the batch's requests fail, the worker lives on."""

    batch_id: int
    message: str


@dataclass(frozen=True, slots=True)
class WorkerReady:
    """Sent once the replica is loaded and warmed up."""

    pid: int
    device: str
    dtype: str


@dataclass(frozen=True, slots=True)
class LoadFailed:
    """The replica could not be loaded; the pool reports it and does not retry forever."""

    message: str


@dataclass(frozen=True, slots=True)
class Ping:
    """Liveness probe: the child answers with Pong after a tiny device op."""

    nonce: int = 0


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer to Ping."""

    nonce: int = 0


ChildMessage = BatchResult | BatchFailed | WorkerReady | LoadFailed | Pong
ParentMessage = EncodeBatch | Ping | None
