"""Scoring query/document pairs by the model's kind (vllm-spec 2.2): late interaction encodes
each side once and takes MaxSim; a bi-encoder embeds each side and takes the cosine; a cross-encoder
reads each (query, document) pair as one input and its classifier logit (sigmoid by default) is the score.

Models that list score modes (BGE-M3) choose another procedure per request with `score_mode`:
"dense" (cosine of the embed vectors, the bi-encoder default), "sparse" (FlagEmbedding's lexical
matching score on the token_classify weights), "colbert" (FlagEmbedding's colbert score, MaxSim
over the token_embed vectors divided by the number of query vectors) and "weighted" /
"weighted:<dense>,<sparse>,<colbert>" (FlagEmbedding compute_score's weighted mean of the three).
Each side is encoded once, every head the mode needs coming from the same forward pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace

import numpy as np

from lateserve.server.domain import (
    Array,
    EmbeddingMode,
    EncodeOptions,
    InvalidArgument,
    Item,
    LexicalSpec,
    ModelKind,
    MultiModalItem,
    Task,
    TextItem,
    TextPart,
    Timings,
    Unimplemented,
)
from lateserve.server.engine.engine import EncodeResult, Engine
from lateserve.server.engine.lexical import lexical_score, lexical_weights
from lateserve.server.engine.scoring import (
    DEFAULT_WEIGHTS,
    WEIGHTED,
    ScoreMode,
    colbert_score,
    cosine,
    maxsim,
    pair_indices,
    parse_score_mode,
    weighted_score,
)


@dataclass(frozen=True, slots=True)
class SimilarityMap:
    """One query's token similarities over one document image's token grid (colpali-engine's
    get_similarity_maps_from_embeddings: the query vectors against the image-token vectors laid out as
    the image's grid)."""

    image_index: int
    query_token_ids: tuple[int, ...]
    data: Array  # [n_query_tokens, height, width]


@dataclass(slots=True)
class PairScores:
    """Scores in pair order, with usage and timings of everything encoded."""

    scores: list[float]
    prompt_tokens: int
    timings: Timings
    maps: list[list[SimilarityMap]] | None = None


def truncate_texts(engine: Engine, items: Seq[Item], max_tokens: int) -> list[Item]:
    """Each text item (and each text part of a multimodal one) cut to its first `max_tokens` tokens,
    special tokens not counted (vLLM's max_tokens_per_doc / max_tokens_per_query); other items as they are."""
    processor = engine.processor
    out: list[Item] = []
    for item in items:
        if isinstance(item, TextItem):
            out.append(TextItem(processor.truncate_text(item.text, max_tokens)))
        elif isinstance(item, MultiModalItem):
            parts = tuple(
                TextPart(processor.truncate_text(p.text, max_tokens)) if isinstance(p, TextPart) else p
                for p in item.parts
            )
            out.append(MultiModalItem(parts))
        else:
            out.append(item)
    return out


async def _encode_sides(
    engine: Engine, queries: Seq[Item], documents: Seq[Item], tasks: frozenset[Task], options: EncodeOptions
) -> tuple[EncodeResult, EncodeResult]:
    """Both sides at once; if one side fails the other is cancelled (TaskGroup)."""
    q_options = d_options = options
    if engine.faithful_scoring and options.embedding_mode == EmbeddingMode.AUTO:
        q_options = replace(options, embedding_mode=EmbeddingMode.QUERY)
        d_options = replace(options, embedding_mode=EmbeddingMode.DOCUMENT)
    together = asyncio.Barrier(2)
    async with asyncio.TaskGroup() as group:
        q = group.create_task(
            engine.encode(queries, tasks, q_options, role="query", field="queries", together=together)
        )
        d = group.create_task(
            engine.encode(documents, tasks, d_options, role="document", field="documents", together=together)
        )
    return q.result(), d.result()


MODE_TASKS: dict[str, frozenset[Task]] = {
    "dense": frozenset({Task.EMBED}),
    "sparse": frozenset({Task.TOKEN_CLASSIFY}),
    "colbert": frozenset({Task.TOKEN_EMBED}),
    WEIGHTED: frozenset({Task.EMBED, Task.TOKEN_CLASSIFY, Task.TOKEN_EMBED}),
}


def _mode_tasks(engine: Engine, mode: ScoreMode) -> frozenset[Task]:
    tasks = MODE_TASKS.get(mode.name)
    if tasks is None:
        raise Unimplemented(f"score_mode {mode.name!r} is listed by {engine.spec.architecture} but not implemented")
    if Task.TOKEN_CLASSIFY in tasks and not isinstance(engine.spec.lexical, LexicalSpec):
        raise InvalidArgument(
            f"score_mode {mode.name!r} needs a sparse head, which {engine.spec.architecture} does not have",
            field="score_mode",
        )
    return tasks


class _ModeScorer:
    """Per-pair scores of a score mode; lexical weights are computed once per encoded item."""

    def __init__(self, engine: Engine, mode: ScoreMode, q_res: EncodeResult, d_res: EncodeResult) -> None:
        self.mode = mode
        self.q, self.d = q_res, d_res
        self.q_lex: list[dict[int, float]] = []
        self.d_lex: list[dict[int, float]] = []
        lexical = engine.spec.lexical
        if isinstance(lexical, LexicalSpec) and Task.TOKEN_CLASSIFY in MODE_TASKS[mode.name]:
            self.q_lex = _lexical(q_res, lexical)
            self.d_lex = _lexical(d_res, lexical)
        self._score: Callable[[int, int], float] = {
            "dense": self.dense,
            "sparse": self.sparse,
            "colbert": self.colbert,
            WEIGHTED: self.weighted,
        }[mode.name]

    def dense(self, i: int, j: int) -> float:
        return cosine(self.q.outputs[i][Task.EMBED], self.d.outputs[j][Task.EMBED])

    def sparse(self, i: int, j: int) -> float:
        return lexical_score(self.q_lex[i], self.d_lex[j])

    def colbert(self, i: int, j: int) -> float:
        return colbert_score(self.q.outputs[i][Task.TOKEN_EMBED], self.d.outputs[j][Task.TOKEN_EMBED])

    def weighted(self, i: int, j: int) -> float:
        weights = self.mode.weights or DEFAULT_WEIGHTS
        return weighted_score(self.dense(i, j), self.sparse(i, j), self.colbert(i, j), weights)

    def __call__(self, i: int, j: int) -> float:
        return self._score(i, j)


def _lexical(result: EncodeResult, spec: LexicalSpec) -> list[dict[int, float]]:
    return [
        dict(lexical_weights(seq.ids, out[Task.TOKEN_CLASSIFY], spec))
        for seq, out in zip(result.sequences, result.outputs, strict=True)
    ]


async def _score_joint(
    engine: Engine,
    queries: Seq[Item],
    documents: Seq[Item],
    pairs: list[tuple[int, int]],
    options: EncodeOptions,
    use_activation: bool,
) -> PairScores:
    """Cross-encoder: one joint input per pair, batched like any other input, never cached."""
    if engine.spec.num_labels != 1:
        raise InvalidArgument(
            f"/score and /rerank need a cross-encoder with one label; {engine.spec.architecture} has "
            f"{engine.spec.num_labels}",
            field="model",
        )
    result = await engine.encode_pairs(
        [(queries[i], documents[j]) for i, j in pairs], options, activation=use_activation, field="documents"
    )
    scores = [float(out[Task.CLASSIFY].reshape(-1)[0]) for out in result.outputs]
    return PairScores(scores, result.prompt_tokens, result.timings)


async def score_pairs(
    engine: Engine,
    queries: Seq[Item],
    documents: Seq[Item],
    options: EncodeOptions,
    score_mode: str = "",
    *,
    use_activation: bool = True,
    similarity_maps: bool = False,
    max_tokens_per_doc: int = 0,
    max_tokens_per_query: int = 0,
) -> PairScores:
    """Pair (1:1, 1:N, N:N) and score; a shared query is encoded once and counted once in usage.
    `max_tokens_per_doc` / `max_tokens_per_query` > 0 cut each document's / query's text to that many
    tokens first (off the event loop), as vLLM's scoring requests."""
    pairs = pair_indices(len(queries), len(documents))
    for name, limit in (("max_tokens_per_query", max_tokens_per_query), ("max_tokens_per_doc", max_tokens_per_doc)):
        if limit < 0:
            raise InvalidArgument(f"{name} must be >= 0 (0: no truncation), got {limit}", field=name)
    if max_tokens_per_query > 0:
        queries = await engine.prepare(truncate_texts, engine, queries, max_tokens_per_query)
    if max_tokens_per_doc > 0:
        documents = await engine.prepare(truncate_texts, engine, documents, max_tokens_per_doc)
    if similarity_maps and (engine.spec.kind != ModelKind.LATE_INTERACTION or score_mode):
        raise InvalidArgument(
            "return_similarity_maps needs a late-interaction model scoring by MaxSim", field="return_similarity_maps"
        )
    mode = parse_score_mode(score_mode, engine.spec.score_modes, engine.spec.architecture)
    kind = engine.spec.kind
    measure: Callable[[Array, Array], float] | None = None
    if mode is not None:
        tasks = _mode_tasks(engine, mode)
    elif kind == ModelKind.LATE_INTERACTION:
        task, measure = Task.TOKEN_EMBED, maxsim
        tasks = frozenset({task})
    elif kind == ModelKind.BI_ENCODER:
        task, measure = Task.EMBED, cosine
        tasks = frozenset({task})
    else:
        return await _score_joint(engine, queries, documents, pairs, options, use_activation)
    try:
        q_res, d_res = await _encode_sides(engine, queries, documents, tasks, options)
    except ExceptionGroup as group:
        raise group.exceptions[0] from None
    maps = None
    if similarity_maps:
        maps = [_similarity_maps(q_res, i, d_res, j) for i, j in pairs]
    if measure is not None:
        scores = [measure(q_res.outputs[i][task], d_res.outputs[j][task]) for i, j in pairs]
    else:
        assert mode is not None
        scorer = _ModeScorer(engine, mode, q_res, d_res)
        scores = [scorer(i, j) for i, j in pairs]
    timings = Timings(tokenize_ns=q_res.timings.tokenize_ns + d_res.timings.tokenize_ns)
    timings.merge_max(q_res.timings)
    timings.merge_max(d_res.timings)
    timings.total_ns = max(q_res.timings.total_ns, d_res.timings.total_ns)
    return PairScores(scores, q_res.prompt_tokens + d_res.prompt_tokens, timings, maps)


def _similarity_maps(q_res: EncodeResult, i: int, d_res: EncodeResult, j: int) -> list[SimilarityMap]:
    """Query i's token vectors against each image of document j, on the image's token grid."""
    query = q_res.outputs[i][Task.TOKEN_EMBED].astype(np.float32, copy=False)
    sequence = d_res.sequences[j]
    document = d_res.outputs[j][Task.TOKEN_EMBED]
    maps = []
    for k, media in enumerate(sequence.media):
        if media.token_grid is None or sequence.keep is not None:
            continue
        height, width = media.token_grid
        rows = document[media.offset : media.offset + media.length].astype(np.float32, copy=False)
        if rows.shape[0] != height * width:
            continue
        data = (query @ rows.T).reshape(len(query), height, width)
        maps.append(SimilarityMap(k, q_res.sequences[i].ids, data))
    return maps
