"""Scoring math on numpy float32 arrays: MaxSim, cosine, and the 1:1 / 1:N / N:N pairing rule.

>>> import numpy as np
>>> q = np.array([[1, 0], [0, 1]], dtype=np.float32)
>>> d = np.array([[1, 0], [0.6, 0.8]], dtype=np.float32)
>>> round(maxsim(q, d), 4)
1.8
>>> pair_indices(1, 3), pair_indices(2, 2)
([(0, 0), (0, 1), (0, 2)], [(0, 0), (1, 1)])
"""

from __future__ import annotations

import numpy as np

from lateserve.server.engine.types import Array
from lateserve.server.errors import InvalidArgument
from lateserve.wire import status as reasons


def maxsim(query: Array, document: Array) -> float:
    """Sum over query tokens of the best dot product with any document token (vLLM 2.1).

    Parameters
    ----------
    query : [Lq, dim] float32
    document : [Ld, dim] float32
    """
    sims = query.astype(np.float32, copy=False) @ document.astype(np.float32, copy=False).T
    return float(sims.max(axis=1).sum(dtype=np.float32))


def cosine(a: Array, b: Array) -> float:
    """Cosine similarity of two vectors in float32 (bi-encoder scores)."""
    a32 = a.astype(np.float32, copy=False)
    b32 = b.astype(np.float32, copy=False)
    denom = max(float(np.linalg.norm(a32) * np.linalg.norm(b32)), 1e-8)
    return float(np.dot(a32, b32) / denom)


def pair_indices(n_queries: int, n_documents: int) -> list[tuple[int, int]]:
    """vLLM's pairing: one query against every document, or N:N zipped; messages as vLLM's."""
    if n_queries == 0:
        raise InvalidArgument("At least one text element must be given", reason=reasons.EMPTY_INPUT, field="queries")
    if n_documents == 0:
        raise InvalidArgument(
            "At least one text_pair element must be given", reason=reasons.EMPTY_INPUT, field="documents"
        )
    if n_queries == 1:
        return [(0, j) for j in range(n_documents)]
    if n_queries != n_documents:
        raise InvalidArgument(
            "Input lengths must be either 1:1, 1:N or N:N",
            reason=reasons.PAIRING_MISMATCH,
            field="documents",
            metadata={"queries": str(n_queries), "documents": str(n_documents)},
        )
    return [(i, i) for i in range(n_queries)]
