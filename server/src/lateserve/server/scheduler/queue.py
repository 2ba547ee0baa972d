"""A pure, synchronous token-budget batch builder: entries in, batches out.

No asyncio, torch or processes, so cut points are unit-testable. A batch starts from the oldest
live entry (no starvation) and is filled with the waiting entries closest to it in length, so
padded batches waste little. Entries whose caller gave up are skipped and counted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

T = TypeVar("T")
CostModel = Literal["padded", "varlen"]


@dataclass(eq=False, slots=True)
class Entry(Generic[T]):
    """One sequence waiting for a worker."""

    payload: T
    num_tokens: int
    """Cost in token units: text tokens plus media work (domain.Sequence.cost)."""
    enqueued_ns: int = 0
    is_cancelled: Callable[[], bool] = field(default=lambda: False)


def batch_cost(lengths: list[int], model: CostModel) -> int:
    """Tokens a batch costs: padded backends pay max_len x n, varlen ones the sum.

    >>> batch_cost([3, 5, 4], "padded"), batch_cost([3, 5, 4], "varlen")
    (15, 12)
    """
    if not lengths:
        return 0
    return max(lengths) * len(lengths) if model == "padded" else sum(lengths)


class BatchQueue(Generic[T]):
    """FIFO of entries, cut into batches under a token budget and a sequence cap."""

    def __init__(
        self,
        max_batch_tokens: int,
        max_batch_seqs: int,
        cost_model: CostModel = "padded",
        window: int = 512,
    ) -> None:
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_seqs = max_batch_seqs
        self.cost_model = cost_model
        self.window = window
        self._entries: deque[Entry[T]] = deque()
        self.queued_tokens = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, entry: Entry[T]) -> None:
        self._entries.append(entry)
        self.queued_tokens += entry.num_tokens

    def _drop_cancelled_head(self) -> None:
        while self._entries and self._entries[0].is_cancelled():
            dropped = self._entries.popleft()
            self.queued_tokens -= dropped.num_tokens
            self.dropped += 1

    def cut(self, parts: int = 1) -> list[Entry[T]]:
        """The next batch, sorted by length (empty when nothing is waiting).

        The oldest entry always goes in, even alone over budget, so no input waits forever.
        `parts` > 1 (that many workers idle) caps the batch at its share of the waiting tokens, so
        one request's sequences spread over the idle workers instead of queueing behind one.
        """
        self._drop_cancelled_head()
        if not self._entries:
            return []
        head = self._entries[0]
        # The head always runs; the others' cost is what the idle workers share (so a small query at the
        # head of a /rerank does not push a page out of its batch: 8 pages split 4 + 4, not 3 + 5).
        rest = self.queued_tokens - head.num_tokens
        share = head.num_tokens + (-(-rest // parts) if parts > 1 else rest)
        candidates: list[tuple[int, int, Entry[T]]] = []
        for pos, entry in enumerate(self._entries):
            if pos >= self.window:
                break
            if pos and not entry.is_cancelled():
                candidates.append((abs(entry.num_tokens - head.num_tokens), pos, entry))
        candidates.sort(key=lambda c: (c[0], c[1]))
        chosen = [head]
        lengths = [head.num_tokens]
        total = head.num_tokens
        for _, _, entry in candidates:
            if len(chosen) >= self.max_batch_seqs:
                break
            if batch_cost([*lengths, entry.num_tokens], self.cost_model) > self.max_batch_tokens:
                continue
            if total + entry.num_tokens > share:
                continue
            chosen.append(entry)
            lengths.append(entry.num_tokens)
            total += entry.num_tokens
        taken = {id(e) for e in chosen}
        kept: deque[Entry[T]] = deque()
        for entry in self._entries:
            if id(entry) in taken:
                self.queued_tokens -= entry.num_tokens
            elif entry.is_cancelled():
                self.queued_tokens -= entry.num_tokens
                self.dropped += 1
            else:
                kept.append(entry)
        self._entries = kept
        chosen.sort(key=lambda e: e.num_tokens)
        return chosen

    def cut_all(self) -> list[Entry[T]]:
        """Everything still waiting (shutdown)."""
        entries = list(self._entries)
        self._entries.clear()
        self.queued_tokens = 0
        return entries
