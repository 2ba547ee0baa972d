"""Typed messages that cross the worker process boundary.

Token ids travel as tuples of ints; outputs travel as raw float32 bytes plus shape (one memcpy,
no per-float pickling). Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lateserve.server.domain import Array, ItemOutputs, Task, WorkItem


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
class EncodeBatch:
    """A batch of work for one forward pass."""

    batch_id: int
    items: list[WorkItem]


@dataclass(frozen=True, slots=True)
class RawArray:
    """A float32 array as bytes and shape."""

    data: bytes
    shape: tuple[int, ...]

    @classmethod
    def pack(cls, array: Array) -> RawArray:
        a = np.ascontiguousarray(array, dtype=np.float32)
        return cls(a.tobytes(), tuple(a.shape))

    def unpack(self) -> Array:
        return np.frombuffer(self.data, dtype=np.float32).reshape(self.shape)


@dataclass(frozen=True, slots=True)
class BatchResult:
    """The outputs of a batch, in item order."""

    batch_id: int
    outputs: list[dict[Task, RawArray]]
    inference_ns: int

    @staticmethod
    def pack_outputs(outputs: list[ItemOutputs]) -> list[dict[Task, RawArray]]:
        return [{task: RawArray.pack(arr) for task, arr in out.items()} for out in outputs]

    def unpack_outputs(self) -> list[ItemOutputs]:
        return [{task: raw.unpack() for task, raw in out.items()} for out in self.outputs]


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
