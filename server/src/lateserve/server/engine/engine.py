"""Engine: the services' one door. Admit, tokenize, validate length, enqueue, await, collect.

Every rule about inputs that holds for all families (task support, max_model_len, the
truncation bound, the request bound) is checked here, once. Cancelling the awaiting coroutine
(client gone, deadline passed) cancels the item futures, so queued work is dropped unrun.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace

from lateserve.server import metrics
from lateserve.server.domain import (
    EmbeddingMode,
    EncodeOptions,
    InputTooLong,
    InvalidArgument,
    Item,
    ItemOutputs,
    ModelSpec,
    Overloaded,
    Role,
    Sequence,
    ShuttingDown,
    Task,
    Timings,
    UnsupportedTask,
    WorkItem,
)
from lateserve.server.engine.cache import DocumentCache, cache_key
from lateserve.server.families.base import InputProcessor
from lateserve.server.scheduler.batcher import Batcher
from lateserve.wire import reasons


@dataclass(slots=True)
class EncodeResult:
    """Outputs of one encode call, in item order."""

    outputs: list[ItemOutputs]
    sequences: list[Sequence]
    timings: Timings

    @property
    def prompt_tokens(self) -> int:
        return sum(s.prompt_tokens for s in self.sequences)


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
        doc_cache_bytes: int = 0,
        faithful_scoring: bool = False,
    ) -> None:
        self.spec = spec
        self.processor = processor
        self.batcher = batcher
        self.max_queued_requests = max_queued_requests
        self.max_queued_tokens = max_queued_tokens
        self.active_requests = 0
        self.queued_tokens = 0
        self.cache = DocumentCache(doc_cache_bytes)
        self.accepting = True
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
        k = options.truncate_prompt_tokens
        if k is None:
            return
        if k < -1 or k == 0:
            raise InvalidArgument(
                f"truncate_prompt_tokens must be -1 or a positive number of tokens, got {k}",
                field="truncate_prompt_tokens",
            )
        if k > self.spec.max_model_len:
            raise InvalidArgument(
                f"truncate_prompt_tokens value ({k}) is greater than max_model_len ({self.spec.max_model_len}). "
                "Please, select a smaller truncation size.",
                reason=reasons.TRUNCATION_TOO_LARGE,
                field="truncate_prompt_tokens",
                metadata={"truncatePromptTokens": str(k), "maxModelLen": str(self.spec.max_model_len)},
            )

    def tokenize(self, items: Seq[Item], options: EncodeOptions, role: Role, field: str) -> list[Sequence]:
        """Tokenize and enforce max_model_len with vLLM's message."""
        limit = self.spec.max_model_len
        if options.truncate_prompt_tokens == -1:
            options = replace(options, truncate_prompt_tokens=limit)
        if options.embedding_mode == EmbeddingMode.AUTO:
            options = replace(options, embedding_mode=EmbeddingMode.RAW)
        try:
            sequences = self.processor.encode_many(items, options, role)
        except InvalidArgument:
            sequences = []  # find the item at fault, so the error names it
            for index, item in enumerate(items):
                try:
                    sequences.append(self.processor.encode(item, options, role))
                except InvalidArgument as exc:
                    if exc.field in (None, "input"):  # families do not know where the item sat
                        exc.field = f"{field}[{index}]"
                    raise
            raise
        for index, seq in enumerate(sequences):
            if seq.num_tokens > limit:
                n = seq.num_tokens
                raise InputTooLong(
                    f"This model's maximum context length is {limit} tokens. However, your prompt contains at "
                    f"least {n} input tokens, which exceeds this limit even without any output tokens. Please "
                    f"reduce the length of the input prompt. (parameter=input_tokens, value={n})",
                    field="input_tokens",
                    metadata={"maxModelLen": str(limit), "inputTokens": str(n), "item": f"{field}[{index}]"},
                )
        return sequences

    def _admit(self) -> None:
        """Fail fast, before tokenizing, when the request bound is reached."""
        if not self.accepting:
            raise ShuttingDown("the server is shutting down", retry_after_s=1.0)
        if self.active_requests >= self.max_queued_requests:
            metrics.REJECTED.labels("requests").inc()
            raise Overloaded(
                f"too many requests in flight ({self.active_requests}); retry later",
                retry_after_s=1.0,
                metadata={"maxQueuedRequests": str(self.max_queued_requests)},
            )

    def _admit_tokens(self, tokens: int) -> None:
        """The token bound keeps memory bounded under any mix of request sizes; a lone request
        is always admitted so a big one cannot be refused forever."""
        if self.queued_tokens and self.queued_tokens + tokens > self.max_queued_tokens:
            metrics.REJECTED.labels("tokens").inc()
            raise Overloaded(
                f"too many tokens in flight ({self.queued_tokens} + {tokens}); retry later",
                retry_after_s=1.0,
                metadata={"maxQueuedTokens": str(self.max_queued_tokens)},
            )

    async def _run(self, work: list[WorkItem], use_cache: bool) -> tuple[list[ItemOutputs], Timings]:
        """Cached items are answered at once; the rest go through the batcher."""
        timings = Timings()
        outputs: list[ItemOutputs | None] = [None] * len(work)
        keys: list[bytes] = []
        if use_cache:
            keys = [cache_key(self.spec.architecture, w) for w in work]
            outputs = [self.cache.get(k) for k in keys]
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

    async def encode(
        self,
        items: Seq[Item],
        tasks: frozenset[Task],
        options: EncodeOptions,
        *,
        role: Role = "input",
        normalize: bool = True,
        field: str = "input",
    ) -> EncodeResult:
        """Encode items for the given tasks; raises the LateserveError a client should see.

        Documents of /score and /rerank (role "document") go through the document cache."""
        start = time.perf_counter_ns()
        for task in tasks:
            self.check_task(task)
        self.check_options(options)
        self._admit()
        self.active_requests += 1
        admitted = 0
        try:
            sequences = self.tokenize(items, options, role, field)
            tokens = sum(s.num_tokens for s in sequences)
            self._admit_tokens(tokens)
            self.queued_tokens += tokens
            admitted = tokens
            metrics.QUEUED_TOKENS.set(self.queued_tokens)
            tokenize_ns = time.perf_counter_ns() - start
            work = [WorkItem(seq, tasks, normalize) for seq in sequences]
            outputs, timings = await self._run(work, role == "document" and self.cache.enabled)
            timings.tokenize_ns = tokenize_ns
            timings.total_ns = time.perf_counter_ns() - start
            metrics.PROMPT_TOKENS.inc(sum(s.prompt_tokens for s in sequences))
            return EncodeResult(outputs, sequences, timings)
        finally:
            self.active_requests -= 1
            self.queued_tokens -= admitted
            metrics.QUEUED_TOKENS.set(self.queued_tokens)
