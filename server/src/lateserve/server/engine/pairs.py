"""Scoring query/document pairs by the model's kind (vllm-spec 2.2): late interaction encodes
each side once and takes MaxSim; a bi-encoder embeds each side and takes the cosine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace

from lateserve.server.engine.engine import EncodeResult, Engine
from lateserve.server.engine.scoring import cosine, maxsim, pair_indices
from lateserve.server.engine.types import Array, EmbeddingMode, EncodeOptions, Item, ModelKind, Task, Timings
from lateserve.server.errors import InvalidArgument, Unimplemented


@dataclass(slots=True)
class PairScores:
    """Scores in pair order, with usage and timings of everything encoded."""

    scores: list[float]
    prompt_tokens: int
    timings: Timings


def _check_mode(engine: Engine, score_mode: str) -> None:
    if score_mode and score_mode not in engine.spec.score_modes:
        modes = list(engine.spec.score_modes) or ["(only the default)"]
        raise InvalidArgument(
            f"score_mode {score_mode!r} is not supported by {engine.spec.architecture}; supported: {modes}",
            field="score_mode",
        )


async def _encode_sides(
    engine: Engine, queries: Seq[Item], documents: Seq[Item], task: Task, options: EncodeOptions
) -> tuple[EncodeResult, EncodeResult]:
    """Both sides at once; if one side fails the other is cancelled (TaskGroup)."""
    tasks = frozenset({task})
    q_options = d_options = options
    if engine.faithful_scoring and options.embedding_mode == EmbeddingMode.RAW:
        q_options = replace(options, embedding_mode=EmbeddingMode.QUERY)
        d_options = replace(options, embedding_mode=EmbeddingMode.DOCUMENT)
    async with asyncio.TaskGroup() as group:
        q = group.create_task(engine.encode(queries, tasks, q_options, role="query", field="queries"))
        d = group.create_task(engine.encode(documents, tasks, d_options, role="document", field="documents"))
    return q.result(), d.result()


async def score_pairs(
    engine: Engine, queries: Seq[Item], documents: Seq[Item], options: EncodeOptions, score_mode: str = ""
) -> PairScores:
    """Pair (1:1, 1:N, N:N) and score; a shared query is encoded once and counted once in usage."""
    pairs = pair_indices(len(queries), len(documents))
    _check_mode(engine, score_mode)
    kind = engine.spec.kind
    measure: Callable[[Array, Array], float]
    if kind == ModelKind.LATE_INTERACTION:
        task, measure = Task.TOKEN_EMBED, maxsim
    elif kind == ModelKind.BI_ENCODER:
        task, measure = Task.EMBED, cosine
    else:
        raise Unimplemented(f"scoring with a {kind.value} model is not implemented yet")
    try:
        q_res, d_res = await _encode_sides(engine, queries, documents, task, options)
    except ExceptionGroup as group:
        raise group.exceptions[0] from None
    scores = [measure(q_res.outputs[i][task], d_res.outputs[j][task]) for i, j in pairs]
    timings = Timings(tokenize_ns=q_res.timings.tokenize_ns + d_res.timings.tokenize_ns)
    timings.merge_max(q_res.timings)
    timings.merge_max(d_res.timings)
    timings.total_ns = max(q_res.timings.total_ns, d_res.timings.total_ns)
    return PairScores(scores, q_res.prompt_tokens + d_res.prompt_tokens, timings)
