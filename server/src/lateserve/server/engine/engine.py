"""Engine: the services' one door. Admit, prepare off the event loop, validate length, enqueue, await.

Every rule about inputs that holds for all families (task support, modalities, max_model_len, the
truncation bound, the request, cost and byte bounds) is checked here, once. Input preparation
(tokenization, chat templates, image decode and resize) runs in a thread pool: tokenizers and Pillow
release the GIL, and the event loop keeps answering other requests and health checks meanwhile.
Cancelling the awaiting coroutine (client gone, deadline passed) cancels the item futures, so queued
work is dropped unrun.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np

from lateserve.server import metrics, tracing
from lateserve.server.domain import (
    Array,
    ChatItem,
    EmbeddingMode,
    EncodeOptions,
    ImagePart,
    InvalidArgument,
    Item,
    ItemOutputs,
    Modality,
    ModelSpec,
    MultiModalItem,
    Overloaded,
    Role,
    Sequence,
    ShuttingDown,
    Task,
    TextItem,
    Timings,
    TokenItem,
    UnsupportedTask,
    WorkItem,
    input_too_long,
    truncation_too_large,
)
from lateserve.server.engine.cache import DocumentCache, cache_key
from lateserve.server.families.base import InputProcessor
from lateserve.server.scheduler.batcher import Batcher
from lateserve.wire import reasons

R = TypeVar("R")


@dataclass(slots=True)
class EncodeResult:
    """Outputs of one encode call, in item order."""

    outputs: list[ItemOutputs]
    sequences: list[Sequence]
    timings: Timings

    @property
    def prompt_tokens(self) -> int:
        return sum(s.prompt_tokens for s in self.sequences)


INLINE_PREPARE_CHARS = 2048
"""Plain text or token inputs up to this size are prepared on the event loop (see Engine._execute)."""


def is_small(items: Seq[Item]) -> bool:
    """Plain text / token ids totalling at most INLINE_PREPARE_CHARS; anything with media or a chat
    template always goes to the pool.

    >>> is_small([TextItem("hello"), TokenItem((1, 2))]), is_small([TextItem("x" * 5000)])
    (True, False)
    """
    total = 0
    for item in items:
        if isinstance(item, TextItem):
            total += len(item.text)
        elif isinstance(item, TokenItem):
            total += len(item.ids)
        else:
            return False
        if total > INLINE_PREPARE_CHARS:
            return False
    return True


def apply_activation(logits: Array) -> Array:
    """vLLM's classify activation: sigmoid for one label, softmax over several.

    >>> apply_activation(np.array([0.0], dtype=np.float32)).tolist()
    [0.5]
    """
    x = logits.astype(np.float32)
    if x.shape[-1] == 1:
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


_PART = re.compile(r"(content|images)\[(\d+)\](.*)", re.DOTALL)


def item_field(item: Item, field: str, index: int, where: str | None) -> str | None:
    """The request path of a family's error about item `index` of `field`. Families do not know where
    their item sat: None or "input" names the whole item; "content[k]..." a part of a MultiModalItem;
    "images[j]..." the j-th image of a chat (rendered, so only its order is known), mapped back to its
    message and part. Anything else is already a request field (e.g. "truncate_prompt_tokens").

    >>> item_field(MultiModalItem((ImagePart("x"),)), "documents", 2, "content[0].image_url")
    'documents[2].content[0].image_url'
    >>> item_field(TextItem("a"), "input", 3, None), item_field(TextItem("a"), "input", 0, "truncate_prompt_tokens")
    ('input[3]', 'truncate_prompt_tokens')
    """
    if where in (None, "input"):
        return f"{field}[{index}]"
    found = _PART.fullmatch(where)
    if found is None:
        return where
    kind, k, rest = found.group(1), int(found.group(2)), found.group(3)
    if kind == "content":
        return f"{field}[{index}].content[{k}]{rest}"
    if isinstance(item, ChatItem):
        places = [
            f"messages[{m}].content[{p}]"
            for m, message in enumerate(item.messages)
            for p, part in enumerate(message.parts)
            if isinstance(part, ImagePart)
        ]
        if k < len(places):
            return places[k] + rest
    return f"{field}[{index}]"


class Engine:
    """Runs encode calls for one served model."""

    def __init__(
        self,
        spec: ModelSpec,
        processor: InputProcessor,
        batcher: Batcher,
        *,
        max_queued_requests: int,
        max_queued_tokens: int = 1 << 20,
        max_queued_bytes: int = 1 << 30,
        doc_cache_bytes: int = 0,
        faithful_scoring: bool = False,
        prepare_threads: int = 2,
        max_queue_wait_s: float = 0.0,
        max_images_per_prompt: int = 8,
    ) -> None:
        self.spec = spec
        self.processor = processor
        self.batcher = batcher
        self.max_queued_requests = max_queued_requests
        self.max_queued_tokens = max_queued_tokens
        self.active_requests = 0
        self.max_queued_bytes = max_queued_bytes
        # Shed once the work already in flight would keep a new request waiting longer than this (0: never).
        self.max_queue_wait_s = max_queue_wait_s
        self.max_images_per_prompt = max_images_per_prompt
        self.queued_tokens = 0
        self.queued_bytes = 0
        self._prepare = ThreadPoolExecutor(max(1, prepare_threads), thread_name_prefix="lateserve-prepare")
        self.cache = DocumentCache(doc_cache_bytes)
        self.accepting = True
        self._cache_lookups = 0
        self._cache_hits = 0
        # --scoring-embedding-mode faithful: /score and /rerank encode queries as queries and
        # documents as documents (ColBERT markers, expansion) unless the request says otherwise.
        self.faithful_scoring = faithful_scoring

    def check_task(self, task: Task) -> None:
        """vLLM's wording, so clients that match on it keep working."""
        if task not in self.spec.tasks:
            supported = [t.value for t in Task if t in self.spec.tasks]
            raise UnsupportedTask(
                f"Unsupported task: {task.value!r} Supported tasks: {supported} (parameter=task)", field="task"
            )

    def check_options(self, options: EncodeOptions) -> None:
        if options.mm_processor_kwargs and Modality.IMAGE not in self.spec.modalities:
            raise InvalidArgument(
                f"mm_processor_kwargs apply to image inputs; {self.spec.architecture} takes text only",
                field="mm_processor_kwargs",
            )
        k = options.truncate_prompt_tokens
        if k is None:
            return
        if k < -1 or k == 0:
            raise InvalidArgument(
                f"truncate_prompt_tokens must be -1 or a positive number of tokens, got {k}",
                field="truncate_prompt_tokens",
            )
        if k > self.spec.max_model_len:
            raise truncation_too_large(k, self.spec.max_model_len)

    def resolve_options(self, options: EncodeOptions) -> EncodeOptions:
        """The one place `truncate_prompt_tokens == -1` and `EmbeddingMode.AUTO` are resolved:
        families see a concrete limit and a concrete mode."""
        if options.truncate_prompt_tokens == -1:
            options = replace(options, truncate_prompt_tokens=self.spec.max_model_len)
        if options.embedding_mode == EmbeddingMode.AUTO:
            options = replace(options, embedding_mode=EmbeddingMode.RAW)
        return options

    def check_media(self, items: Seq[Item], field: str) -> None:
        """Cheap checks before any preparation: images only for models that read them, and at most
        --limit-mm-per-prompt images per input."""
        for index, item in enumerate(items):
            if isinstance(item, ChatItem):
                images = [
                    f"messages[{m}].content[{k}]"
                    for m, message in enumerate(item.messages)
                    for k, part in enumerate(message.parts)
                    if isinstance(part, ImagePart)
                ]
            elif isinstance(item, MultiModalItem):
                parts = enumerate(item.parts)
                images = [f"{field}[{index}].content[{k}]" for k, part in parts if isinstance(part, ImagePart)]
            else:
                continue
            if images and Modality.IMAGE not in self.spec.modalities:
                raise InvalidArgument(
                    f"{self.spec.architecture} takes text only; image input is not supported by this model",
                    reason=reasons.UNSUPPORTED_INPUT,
                    field=images[0],
                )
            if len(images) > self.max_images_per_prompt:
                raise InvalidArgument(
                    f"{len(images)} images in one input; at most {self.max_images_per_prompt} are allowed "
                    "(--limit-mm-per-prompt '{\"image\": N}')",
                    reason=reasons.MEDIA_LIMIT,
                    field=f"{field}[{index}]",
                )

    def check_length(self, sequences: Seq[Sequence], field: str) -> None:
        """No empty input (nothing to embed: MaxSim over zero tokens is undefined) and max_model_len, with
        vLLM's messages."""
        limit = self.spec.max_model_len
        for index, seq in enumerate(sequences):
            if seq.num_tokens == 0:
                raise InvalidArgument(
                    "The prompt cannot be empty: it has no tokens",
                    reason=reasons.EMPTY_INPUT,
                    field=f"{field}[{index}]",
                )
            if seq.num_tokens > limit:
                raise input_too_long(limit, seq.num_tokens, f"{field}[{index}]")

    def render(self, item: Item) -> Item:
        """Chat messages through the template (a text-only chat becomes plain text for the family)."""
        if not isinstance(item, ChatItem):
            return item
        rendered = self.processor.render(item)
        return rendered if rendered.images else TextItem(rendered.text)

    def tokenize(self, items: Seq[Item], options: EncodeOptions, role: Role, field: str) -> list[Sequence]:
        """Prepare items (synchronously: call through `prepare`) and enforce max_model_len."""
        options = self.resolve_options(options)
        originals = items
        items = [self.render(item) for item in items]
        try:
            sequences = self.processor.encode_many(items, options, role)
        except InvalidArgument:
            sequences = []  # find the item at fault, so the error names it
            for index, item in enumerate(items):
                try:
                    sequences.append(self.processor.encode(item, options, role))
                except InvalidArgument as exc:
                    exc.field = item_field(originals[index], field, index, exc.field)
                    raise
            raise
        self.check_length(sequences, field)
        return sequences

    def tokenize_pairs(self, pairs: Seq[tuple[Item, Item]], options: EncodeOptions, field: str) -> list[Sequence]:
        """Cross-encoder inputs: one joint sequence per (query, document) pair."""
        options = self.resolve_options(options)
        sequences = []
        for index, (query, document) in enumerate(pairs):
            try:
                sequences.append(self.processor.encode_pair(query, document, options))
            except InvalidArgument as exc:  # the pair's index is its document's (1:N and N:N alike)
                exc.field = item_field(document, field, index, exc.field)
                raise
        self.check_length(sequences, field)
        return sequences

    async def prepare(self, fn: Callable[..., R], *args: Any) -> R:
        """Run input preparation in the pool, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._prepare, fn, *args)

    def close(self) -> None:
        self._prepare.shutdown(wait=False, cancel_futures=True)

    def _admit(self) -> None:
        """Fail fast, before preparing, when the request bound is reached."""
        if not self.accepting:
            raise ShuttingDown("the server is shutting down", retry_after_s=1.0)
        if self.active_requests >= self.max_queued_requests:
            metrics.REJECTED.labels("requests").inc()
            raise Overloaded(
                f"too many requests in flight ({self.active_requests}); retry later",
                retry_after_s=1.0,
                metadata={"maxQueuedRequests": str(self.max_queued_requests)},
            )

    def _admit_cost(self, cost: int, nbytes: int) -> None:
        """The cost bound (text tokens plus media work) and the byte bound keep memory bounded under any
        mix of request sizes. Work that could never fit is a 400 naming the limit (a retry cannot help);
        429 means it would fit once the work in flight drains."""
        for amount, limit, what, flag in (
            (cost, self.max_queued_tokens, "tokens (text plus image work)", "--max-queued-tokens"),
            (nbytes, self.max_queued_bytes, "bytes of prepared input", "--max-queued-mb"),
        ):
            if amount > limit:
                raise InvalidArgument(
                    f"this request needs {amount} {what}, more than the server admits at once ({limit}, {flag}); "
                    "send fewer or shorter inputs",
                    reason=reasons.REQUEST_TOO_LARGE,
                    field="input",
                    metadata={"limit": str(limit), "requested": str(amount)},
                )
        wait = self.batcher.expected_wait_s() if self.queued_tokens else None
        if self.max_queue_wait_s and wait is not None and wait > self.max_queue_wait_s:
            metrics.REJECTED.labels("latency").inc()
            raise Overloaded(
                f"the work in flight needs about {wait:.1f} s, over the {self.max_queue_wait_s:g} s wait limit "
                "(--max-queue-wait-ms); retry later",
                retry_after_s=max(1.0, round(wait - self.max_queue_wait_s, 1)),
                metadata={
                    "expectedWaitMs": str(int(wait * 1000)),
                    "maxQueueWaitMs": str(int(self.max_queue_wait_s * 1000)),
                },
            )
        if self.queued_tokens + cost > self.max_queued_tokens:
            metrics.REJECTED.labels("tokens").inc()
            raise Overloaded(
                f"too many tokens in flight ({self.queued_tokens} + {cost}); retry later",
                retry_after_s=1.0,
                metadata={"maxQueuedTokens": str(self.max_queued_tokens)},
            )
        if self.queued_bytes + nbytes > self.max_queued_bytes:
            metrics.REJECTED.labels("bytes").inc()
            raise Overloaded(
                f"too many input bytes in flight ({self.queued_bytes} + {nbytes}); retry later",
                retry_after_s=1.0,
                metadata={"maxQueuedBytes": str(self.max_queued_bytes)},
            )

    async def _run(self, work: list[WorkItem], use_cache: bool) -> tuple[list[ItemOutputs], Timings]:
        """Cached items are answered at once; the rest go through the batcher."""
        timings = Timings()
        outputs: list[ItemOutputs | None] = [None] * len(work)
        keys: list[bytes] = []
        if use_cache:
            keys = [cache_key(self.spec.architecture, w) for w in work]
            outputs = [self.cache.get(k) for k in keys]
            self._cache_lookups += len(keys)
            self._cache_hits += sum(out is not None for out in outputs)
            if self._cache_lookups:
                metrics.CACHE_HIT_RATIO.set(self._cache_hits / self._cache_lookups)
        missing = [i for i, out in enumerate(outputs) if out is None]
        if missing:
            futures = self.batcher.submit([work[i] for i in missing])
            try:
                results = await asyncio.gather(*futures)
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
            for i, r in zip(missing, results, strict=True):
                outputs[i] = r.outputs
                timings.queue_ns = max(timings.queue_ns, r.queue_ns)
                timings.inference_ns = max(timings.inference_ns, r.inference_ns)
                if use_cache:
                    self.cache.put(keys[i], r.outputs)
        return [out for out in outputs if out is not None], timings

    async def _execute(
        self,
        prepare: Callable[[], list[Sequence]],
        tasks: frozenset[Task],
        *,
        normalize: bool,
        activation: bool,
        use_cache: bool,
        together: asyncio.Barrier | None = None,
        inline: bool = False,
    ) -> EncodeResult:
        """Admit, prepare off the loop, bound the queued cost and bytes, run, post-process.

        `inline`: the input is so small that preparing it on the loop costs less than the thread hop
        (microseconds of tokenization against a scheduling round trip that grows under load).

        `together`: calls of one request (the query and document sides of /score) meet there once
        prepared, so their sequences are queued in the same tick and cut into batches together (one
        request spread over the idle workers), whichever side finished preparing first."""
        start = time.perf_counter_ns()
        wall_start = time.time_ns()
        self._admit()
        self.active_requests += 1
        cost = nbytes = 0
        try:
            sequences = prepare() if inline else await self.prepare(prepare)
            prepared = sum(s.cost for s in sequences), sum(s.nbytes for s in sequences)
            self._admit_cost(*prepared)
            cost, nbytes = prepared
            self.queued_tokens += cost
            self.queued_bytes += nbytes
            metrics.QUEUED_TOKENS.set(self.queued_tokens)
            tokenize_ns = time.perf_counter_ns() - start
            metrics.REQUEST_DURATION.labels("prepare").observe(tokenize_ns / 1e9)
            if together is not None:
                await together.wait()
            work = [WorkItem(seq, tasks, normalize, activation) for seq in sequences]
            outputs, timings = await self._run(work, use_cache)
            if activation and Task.CLASSIFY in tasks:
                outputs = [{**out, Task.CLASSIFY: apply_activation(out[Task.CLASSIFY])} for out in outputs]
            timings.tokenize_ns = tokenize_ns
            timings.total_ns = time.perf_counter_ns() - start
            prompt_tokens = sum(s.prompt_tokens for s in sequences)
            metrics.PROMPT_TOKENS.inc(prompt_tokens)
            if timings.inference_ns:  # some item reached a worker (not all answered by the cache)
                metrics.REQUEST_DURATION.labels("queue").observe(timings.queue_ns / 1e9)
                metrics.REQUEST_DURATION.labels("inference").observe(timings.inference_ns / 1e9)
            if tracing.enabled():
                self._trace(wall_start, timings, len(sequences), prompt_tokens, cost)
            return EncodeResult(outputs, sequences, timings)
        finally:
            self.active_requests -= 1
            self.queued_tokens -= cost
            self.queued_bytes -= nbytes
            metrics.QUEUED_TOKENS.set(self.queued_tokens)

    def _trace(self, wall_start: int, timings: Timings, items: int, tokens: int, cost: int) -> None:
        """Stage spans of this call under the request's span: prepare from the start; queue and forward
        (the slowest item's) ending where the call ended."""
        forward_at = max(timings.tokenize_ns, timings.total_ns - timings.inference_ns)
        queue_at = max(timings.tokenize_ns, forward_at - timings.queue_ns)
        tracing.stages(
            wall_start,
            [
                ("prepare", 0, timings.tokenize_ns),
                ("queue", queue_at, forward_at - queue_at if timings.inference_ns else 0),
                ("forward", forward_at, timings.inference_ns),
            ],
            model=self.spec.architecture,
            items=items,
            tokens=tokens,
            cost=cost,
        )

    def _check(self, tasks: frozenset[Task], options: EncodeOptions) -> None:
        for task in tasks:
            self.check_task(task)
        self.check_options(options)

    async def encode(
        self,
        items: Seq[Item],
        tasks: frozenset[Task],
        options: EncodeOptions,
        *,
        role: Role = "input",
        normalize: bool = True,
        activation: bool = True,
        field: str = "input",
        together: asyncio.Barrier | None = None,
    ) -> EncodeResult:
        """Encode items for the given tasks; raises the LateserveError a client should see.

        Documents of /score and /rerank (role "document") go through the document cache."""
        self._check(tasks, options)
        self.check_media(items, field)
        return await self._execute(
            lambda: self.tokenize(items, options, role, field),
            tasks,
            normalize=normalize,
            activation=activation,
            use_cache=role == "document" and self.cache.enabled,
            together=together,
            inline=is_small(items),
        )

    async def encode_pairs(
        self,
        pairs: Seq[tuple[Item, Item]],
        options: EncodeOptions,
        *,
        activation: bool = True,
        field: str = "documents",
    ) -> EncodeResult:
        """Cross-encoder: classify each joint (query, document) input. Pairs never enter the document
        cache (a pair's output depends on both sides)."""
        tasks = frozenset({Task.CLASSIFY})
        self._check(tasks, options)
        self.check_media([d for _, d in pairs], field)
        return await self._execute(
            lambda: self.tokenize_pairs(pairs, options, field),
            tasks,
            normalize=False,
            activation=activation,
            use_cache=False,
            inline=is_small([item for pair in pairs for item in pair]),
        )
