"""The one table per lateserve.v1 enum from the lower-case names vLLM's JSON and the Python client
use to the enum values on the wire. The gateway and the client both read these; neither spells an
enum name out.

A name missing from a table has no wire value, so it cannot be sent: `value_of` raises
UnknownName (a ValueError) naming the field and the names that exist.

>>> value_of(POOLING_TASKS, "token_embed", "task") == PoolingTask.POOLING_TASK_TOKEN_EMBED
True
>>> value_of(TRUNCATION_SIDES, None, "truncation_side")  # unset: the server's default
0
>>> try:
...     value_of(DTYPES, "int8", "dtype")
... except UnknownName as error:
...     print(error)
unknown dtype 'int8'; expected one of ['bfloat16', 'float16', 'float32']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, TypeVar, cast

from lateserve.v1.common_pb2 import Dtype, EmbeddingMode, PoolingTask, TruncationSide

V = TypeVar("V", bound=int)

POOLING_TASKS: Final[Mapping[str, PoolingTask.ValueType]] = {
    "token_embed": PoolingTask.POOLING_TASK_TOKEN_EMBED,
    "token_classify": PoolingTask.POOLING_TASK_TOKEN_CLASSIFY,
    "embed": PoolingTask.POOLING_TASK_EMBED,
    "classify": PoolingTask.POOLING_TASK_CLASSIFY,
}
"""`task` of /pooling and Pool/StreamPool, in vLLM's names."""

DTYPES: Final[Mapping[str, Dtype.ValueType]] = {
    "float32": Dtype.DTYPE_FLOAT32,
    "float16": Dtype.DTYPE_FLOAT16,
    "bfloat16": Dtype.DTYPE_BFLOAT16,
}
"""Tensor element types: vLLM's `embed_dtype` names, and the client's `dtype`."""

TRUNCATION_SIDES: Final[Mapping[str, TruncationSide.ValueType]] = {
    "left": TruncationSide.TRUNCATION_SIDE_LEFT,
    "right": TruncationSide.TRUNCATION_SIDE_RIGHT,
}
"""`truncation_side`: which end truncation removes."""

EMBEDDING_MODES: Final[Mapping[str, EmbeddingMode.ValueType]] = {
    "raw": EmbeddingMode.EMBEDDING_MODE_RAW,
    "query": EmbeddingMode.EMBEDDING_MODE_QUERY,
    "document": EmbeddingMode.EMBEDDING_MODE_DOCUMENT,
}
"""`embedding_mode` (lateserve's late-interaction encoding)."""


class UnknownName(ValueError):
    """A name with no value in its enum table."""

    def __init__(self, what: str, name: str, known: list[str]) -> None:
        super().__init__(f"unknown {what} {name!r}; expected one of {sorted(known)}")
        self.what = what
        self.name = name
        self.known = known
        """The table's names in table order (vLLM lists tasks in this order)."""


def value_of(table: Mapping[str, V], name: str | None, what: str) -> V:
    """The wire value of `name`; None is 0 (every enum's UNSPECIFIED: the server's default)."""
    if name is None:
        return cast("V", 0)
    try:
        return table[name]
    except KeyError:
        raise UnknownName(what, name, list(table)) from None
