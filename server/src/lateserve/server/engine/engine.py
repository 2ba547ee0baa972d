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
from lateserve.server.engine.types import EncodeOptions, Item, ItemOutputs, Sequence, Task, Timings, WorkItem
from lateserve.server.errors import InputTooLong, InvalidArgument, Overloaded, ShuttingDown, UnsupportedTask
from lateserve.server.families.base import InputProcessor, ModelSpec, Role
from lateserve.server.scheduler.batcher import Batcher
from lateserve.wire import status as reasons


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
        faithful_scoring: bool = False,
    ) -> None:
        self.spec = spec
        self.processor = processor
        self.batcher = batcher
        self.max_queued_requests = max_queued_requests
        self.active_requests = 0
        self.accepting = True
        # --scoring-embedding-mode faithful: /score and /rerank encode queries as queries and
        # documents as documents (ColBERT markers, expansion) unless the request says otherwise.
        self.faithful_scoring = faithful_scoring

    def check_task(self, task: Task) -> None:
        """vLLM's wording, so clients that match on it keep working."""
        if task not in self.spec.tasks:
            supported = [t.value for t in Task if t in self.spec.tasks]
            raise UnsupportedTask(f"Unsupported task: {task.value!r} Supported tasks: {supported}", field="task")

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
        sequences = []
        for index, item in enumerate(items):
            try:
                seq = self.processor.encode(item, options, role)
            except InvalidArgument as exc:
                if exc.field in (None, "input"):  # families do not know where the item sat
                    exc.field = f"{field}[{index}]"
                raise
            if seq.num_tokens > limit:
                n = seq.num_tokens
                raise InputTooLong(
                    f"This model's maximum context length is {limit} tokens. However, your prompt contains at "
                    f"least {n} input tokens, which exceeds this limit even without any output tokens. Please "
                    f"reduce the length of the input prompt. (parameter=input_tokens, value={n})",
                    field="input_tokens",
                    metadata={"maxModelLen": str(limit), "inputTokens": str(n), "item": f"{field}[{index}]"},
                )
            sequences.append(seq)
        return sequences

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
        """Encode items for the given tasks; raises the LateserveError a client should see."""
        start = time.perf_counter_ns()
        for task in tasks:
            self.check_task(task)
        self.check_options(options)
        if not self.accepting:
            raise ShuttingDown("the server is shutting down", retry_after_s=1.0)
        if self.active_requests >= self.max_queued_requests:
            raise Overloaded(
                f"too many requests in flight ({self.active_requests}); retry later",
                retry_after_s=1.0,
                metadata={"maxQueuedRequests": str(self.max_queued_requests)},
            )
        self.active_requests += 1
        try:
            sequences = self.tokenize(items, options, role, field)
            tokenized = time.perf_counter_ns()
            timings = Timings(tokenize_ns=tokenized - start)
            work = [WorkItem(seq, tasks, normalize) for seq in sequences]
            futures = self.batcher.submit(work)
            try:
                results = await asyncio.gather(*futures)
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
            for r in results:
                timings.queue_ns = max(timings.queue_ns, r.queue_ns)
                timings.inference_ns = max(timings.inference_ns, r.inference_ns)
            timings.total_ns = time.perf_counter_ns() - start
            metrics.PROMPT_TOKENS.inc(sum(s.prompt_tokens for s in sequences))
            return EncodeResult([r.outputs for r in results], sequences, timings)
        finally:
            self.active_requests -= 1
