"""Sparse (lexical) weights of models with a per-token weight head (BGE-M3), FlagEmbedding style.

vLLM's BGE-M3 `token_classify` returns one weight per prompt position with the leading BOS and the
trailing EOS removed (vllm-spec 1.6, BOSEOSFilter). FlagEmbedding turns per-position weights into
lexical weights: the largest weight per token id, special tokens (cls, eos, pad, unk) and
non-positive weights dropped, ids in order of first occurrence. The lexical matching score of two
inputs is the sum over shared ids of the product of their weights.

>>> spec = LexicalSpec(bos_token_id=0, eos_token_id=2, skip_ids=frozenset({0, 1, 2, 3}))
>>> import numpy as np
>>> ids = [0, 7, 9, 7, 3, 2]
>>> trimmed_span(ids, spec.bos_token_id, spec.eos_token_id)
(1, 5)
>>> w = lexical_weights(ids, np.array([0.5, 0.0, 0.8, 0.9], dtype=np.float32), spec)
>>> [(i, round(x, 2)) for i, x in w]
[(7, 0.8)]
>>> round(lexical_score(dict(w), {7: 0.5, 9: 1.0}), 2)
0.4
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence as Seq

from lateserve.server.domain import Array, LexicalSpec, trimmed_span

__all__ = ["LexicalSpec", "lexical_score", "lexical_weights", "trimmed_span"]


def lexical_weights(ids: Seq[int], weights: Array, spec: LexicalSpec) -> list[tuple[int, float]]:
    """(token id, weight) pairs: the max weight per id over the positions `weights` covers.

    `weights` is the model's token_classify output for `ids`: one value per position, either for
    every position or with BOS/EOS trimmed as `trimmed_span` says.
    """
    flat = weights.reshape(-1)
    if len(flat) == len(ids):
        positions = ids
    else:
        start, end = trimmed_span(ids, spec.bos_token_id, spec.eos_token_id)
        positions = ids[start:end]
        if len(positions) != len(flat):
            raise ValueError(f"{len(flat)} token weights for {len(ids)} tokens ({len(positions)} after trimming)")
    best: dict[int, float] = {}
    for token_id, weight in zip(positions, flat.tolist(), strict=True):
        if token_id in spec.skip_ids or not weight > 0:
            continue
        if weight > best.get(token_id, 0.0):
            best[token_id] = weight
    return list(best.items())


def lexical_score(query: Mapping[int, float], document: Mapping[int, float]) -> float:
    """FlagEmbedding's compute_lexical_matching_score: sum over shared ids of w_query * w_document."""
    small, large = (query, document) if len(query) <= len(document) else (document, query)
    return float(sum(weight * large[token] for token, weight in small.items() if token in large))
