"""Scoring math on numpy float32 arrays: MaxSim, cosine, the 1:1 / 1:N / N:N pairing rule, and
the score modes of multi-head models (BGE-M3).

>>> import numpy as np
>>> q = np.array([[1, 0], [0, 1]], dtype=np.float32)
>>> d = np.array([[1, 0], [0.6, 0.8]], dtype=np.float32)
>>> round(maxsim(q, d), 4)
1.8
>>> pair_indices(1, 3), pair_indices(2, 2)
([(0, 0), (0, 1), (0, 2)], [(0, 0), (1, 1)])
>>> round(colbert_score(q, d), 4)
0.9
>>> parse_score_mode("weighted:0.4,0.2,0.4", ("dense", "sparse", "colbert", "weighted"))
ScoreMode(name='weighted', weights=(0.4, 0.2, 0.4))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lateserve.server.domain import Array, InvalidArgument
from lateserve.wire import reasons


def maxsim(query: Array, document: Array) -> float:
    """Sum over query tokens of the best dot product with any document token (vLLM 2.1).

    Parameters
    ----------
    query : [Lq, dim] float32
    document : [Ld, dim] float32
    """
    sims = query.astype(np.float32, copy=False) @ document.astype(np.float32, copy=False).T
    return float(sims.max(axis=1).sum(dtype=np.float32))


def colbert_score(query: Array, document: Array) -> float:
    """FlagEmbedding's colbert_score: MaxSim divided by the number of query vectors (0 for none)."""
    if len(query) == 0 or len(document) == 0:
        return 0.0
    return maxsim(query, document) / len(query)


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


WEIGHTED = "weighted"
DEFAULT_WEIGHTS = (1.0, 1.0, 1.0)
"""FlagEmbedding's compute_score default for weights_for_different_modes (dense, sparse, colbert)."""


@dataclass(frozen=True, slots=True)
class ScoreMode:
    """A parsed score_mode: a name the model lists, with weights for "weighted"."""

    name: str
    weights: tuple[float, float, float] | None = None


def parse_score_mode(mode: str, supported: Sequence[str], model: str = "this model") -> ScoreMode | None:
    """None for the empty default; else the mode, which must be one the model lists.

    "weighted" takes optional weights for the dense, sparse and colbert scores as
    "weighted:<dense>,<sparse>,<colbert>" (FlagEmbedding's weights_for_different_modes; plain
    "weighted" is its default, 1,1,1). Weights are finite, non-negative and not all zero.
    """
    if not mode:
        return None
    name, colon, args = mode.partition(":")
    if name not in supported:
        listed = list(supported) or ["(only the default)"]
        raise InvalidArgument(
            f"score_mode {mode!r} is not supported by {model}; supported: {listed}", field="score_mode"
        )
    if name != WEIGHTED:
        if colon:
            raise InvalidArgument(f"score_mode {name!r} takes no arguments, got {mode!r}", field="score_mode")
        return ScoreMode(name)
    if not colon:
        return ScoreMode(name, DEFAULT_WEIGHTS)
    try:
        weights = tuple(float(w) for w in args.split(","))
    except ValueError:
        weights = ()
    if len(weights) != 3 or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise InvalidArgument(
            f"score_mode {mode!r}: expected 'weighted:<dense>,<sparse>,<colbert>' with three non-negative "
            "weights, not all zero",
            field="score_mode",
        )
    return ScoreMode(name, (weights[0], weights[1], weights[2]))


def weighted_score(dense: float, sparse: float, colbert: float, weights: tuple[float, float, float]) -> float:
    """FlagEmbedding compute_score's "colbert+sparse+dense": the weighted mean of the three scores."""
    w_dense, w_sparse, w_colbert = weights
    return (w_dense * dense + w_sparse * sparse + w_colbert * colbert) / (w_dense + w_sparse + w_colbert)
