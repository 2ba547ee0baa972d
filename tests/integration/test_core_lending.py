"""Idle CPU workers lend their cores to the last batch waiting when it is long enough (--lend-cores-min-ms):
a lone request then computes on every core (the worker reports the thread count it ran with, counted in
lateserve_lent_core_batches_total), numbers unchanged, and work arriving meanwhile waits for the lent cores
instead of sharing a core with the borrower; nothing is lost under concurrency. Live servers with two real
worker processes on the bundled model."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from lateserve.server.cli import build_parser, config_from_args
from lateserve.server.config import ServerConfig
from tests.fixtures.toy_vision import http_json
from tests.live import LiveServer, delta, scrape

LENT = "lateserve_lent_core_batches_total"
TEXT = " ".join(["late interaction models score every query token against every document token"] * 12)


@pytest.fixture(scope="module")
def lending_server() -> Iterator[LiveServer]:
    """Two single-threaded workers; every lone batch borrows (threshold 0 ms)."""
    with LiveServer(ServerConfig(workers=2, threads_per_worker=1, lend_cores_min_ms=0)) as live:
        yield live


def pool(server: LiveServer, text: str) -> np.ndarray:
    status, body = http_json(server.http_url, "/pooling", {"input": text, "task": "token_embed"})
    assert status == 200, body
    return np.asarray(body["data"][0]["data"], dtype=np.float32)


def test_a_lone_batch_computes_on_lent_cores(lending_server: LiveServer) -> None:
    before = scrape(lending_server)
    first = pool(lending_server, TEXT)  # no speed measured yet: the first batch runs on its own core
    later = [pool(lending_server, TEXT) for _ in range(4)]
    after = scrape(lending_server)
    assert delta(before, after, LENT) >= 4
    for vectors in later:
        # Two threads change the summation order only.
        assert vectors.shape == first.shape
        assert float(np.abs(vectors - first).max()) < 1e-5


def test_work_arriving_while_cores_are_lent_is_not_lost(lending_server: LiveServer) -> None:
    texts = [f"{TEXT} variant {i}" if i % 2 else f"short text {i}" for i in range(24)]
    expected = {t: pool(lending_server, t) for t in set(texts)}
    before = scrape(lending_server)
    with ThreadPoolExecutor(8) as executor:
        results = list(executor.map(lambda t: pool(lending_server, t), texts))
    after = scrape(lending_server)
    for text, vectors in zip(texts, results, strict=True):
        assert float(np.abs(vectors - expected[text]).max()) < 1e-5
    # Under concurrency both workers take batches of their own (lending only when nothing else waits).
    for worker in ("0", "1"):
        assert delta(before, after, "lateserve_worker_batches_total", worker=worker) > 0


def test_lending_off_keeps_each_worker_on_its_own_core() -> None:
    with LiveServer(ServerConfig(workers=2, threads_per_worker=1, lend_cores_min_ms=-1)) as server:
        pool(server, TEXT)
        before = scrape(server)
        for _ in range(3):
            pool(server, TEXT)
        assert delta(before, scrape(server), LENT) == 0


def test_the_serve_command_takes_the_flag() -> None:
    parser = build_parser()
    assert config_from_args(parser.parse_args(["serve", "some/model"])).lend_cores_min_ms == 100.0
    ns = parser.parse_args(["serve", "some/model", "--lend-cores-min-ms", "-1"])
    assert config_from_args(ns).lend_cores_min_ms == -1.0
