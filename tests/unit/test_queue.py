"""The pure token-budget batch builder: cut points, length grouping, cancellation, fairness."""

from __future__ import annotations

from lateserve.server.scheduler.queue import BatchQueue, Entry, batch_cost


def make(lengths: list[int], cancelled: set[int] | None = None) -> BatchQueue[int]:
    q: BatchQueue[int] = BatchQueue(max_batch_tokens=40, max_batch_seqs=3)
    for i, n in enumerate(lengths):
        q.push(Entry(i, n, 0, (lambda i=i: i in (cancelled or set()))))
    return q


def test_padded_cost_counts_the_longest_times_count() -> None:
    assert batch_cost([10, 3], "padded") == 20
    assert batch_cost([10, 3], "varlen") == 13
    assert batch_cost([], "padded") == 0


def test_batch_respects_token_budget_and_sequence_cap() -> None:
    q = make([10, 10, 10, 10, 10])
    first = q.cut()
    assert [e.payload for e in first] == [0, 1, 2]  # capped at 3 sequences
    assert [e.payload for e in q.cut()] == [3, 4]
    assert q.cut() == [] and q.queued_tokens == 0


def test_similar_lengths_are_grouped_with_the_oldest() -> None:
    q = make([8, 30, 9, 31, 7])
    batch = q.cut()
    # The oldest (8) leads; 9 and 7 join it; 30/31 would blow the padded budget of 40.
    assert sorted(e.payload for e in batch) == [0, 2, 4]
    assert [e.num_tokens for e in batch] == [7, 8, 9]  # sorted by length for the worker
    assert sorted(e.payload for e in q.cut()) == [1]
    assert sorted(e.payload for e in q.cut()) == [3]


def test_an_over_budget_entry_still_runs_alone() -> None:
    q = make([100, 5])
    assert [e.payload for e in q.cut()] == [0]
    assert [e.payload for e in q.cut()] == [1]


def test_cancelled_entries_are_dropped_and_counted() -> None:
    q = make([5, 5, 5, 5], cancelled={0, 2})
    assert [e.payload for e in q.cut()] == [1, 3]
    assert q.dropped == 2 and len(q) == 0 and q.queued_tokens == 0


def test_idle_workers_share_the_waiting_tokens() -> None:
    q: BatchQueue[int] = BatchQueue(max_batch_tokens=1000, max_batch_seqs=64, cost_model="varlen")
    for i, n in enumerate([12, 40, 44, 50, 60, 70, 90]):
        q.push(Entry(i, n, 0))
    first = q.cut(parts=2)  # two idle workers: this one takes at most half of the 366 tokens
    assert sum(e.num_tokens for e in first) <= 183 and first[0].payload == 0
    second = q.cut(parts=1)  # the other idle worker takes the rest
    assert sorted(e.payload for e in first + second) == list(range(7)) and len(q) == 0


def test_a_share_never_leaves_the_oldest_entry_behind() -> None:
    q: BatchQueue[int] = BatchQueue(max_batch_tokens=1000, max_batch_seqs=64, cost_model="varlen")
    q.push(Entry(0, 300, 0))
    q.push(Entry(1, 10, 0))
    assert [e.payload for e in q.cut(parts=4)] == [0]  # over its share, it still runs


def test_a_small_head_does_not_unbalance_the_share() -> None:
    """A /rerank: a small query first, then eight pages of equal cost, two idle workers: 4 + 4 pages."""
    q: BatchQueue[int] = BatchQueue(max_batch_tokens=8192, max_batch_seqs=64, cost_model="varlen")
    q.push(Entry(0, 9, 0))
    for i in range(1, 9):
        q.push(Entry(i, 1500, 0))
    first, second = q.cut(parts=2), q.cut(parts=1)
    assert (len(first), len(second)) == (5, 4) and first[0].payload == 0
