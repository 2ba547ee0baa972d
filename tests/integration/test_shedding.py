"""Latency-aware admission against a live server: once the work in flight needs longer than
--max-queue-wait-ms to drain at the measured speed, new work is shed with 429 / RESOURCE_EXHAUSTED and a
Retry-After, so queueing delay stays bounded under any number of clients; with the queue drained, the
same request is served. The toy family's [SLOW] token makes a batch take 1.5 s, deterministically."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from lateserve.server.config import ServerConfig
from lateserve.server.families.registry import EXTRA_FAMILIES_ENV
from tests.fixtures.toy_vision import EXTRA_FAMILIES, SLOW_TOKEN, http_json, write_toy_vision
from tests.live import LiveServer


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    model = write_toy_vision(tmp_path_factory.mktemp("toy_vision"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(EXTRA_FAMILIES_ENV, EXTRA_FAMILIES)
        config = ServerConfig(model=str(model), workers=1, threads_per_worker=1, max_queue_wait_ms=2000)
        with LiveServer(config) as live:
            yield live


def pool(server: LiveServer, text: str) -> tuple[int, dict[str, object] | bytes]:
    return http_json(server.http_url, "/pooling", {"input": text, "task": "token_embed"})


def test_work_is_shed_once_the_expected_wait_passes_the_limit(server: LiveServer) -> None:
    assert pool(server, f"warm {SLOW_TOKEN}")[0] == 200  # measures the speed: 1.5 s for a few tokens
    results: list[int] = []
    slow = [threading.Thread(target=lambda: results.append(pool(server, f"busy {SLOW_TOKEN}")[0])) for _ in range(2)]
    for thread in slow:
        thread.start()
        time.sleep(0.2)
    status, body = pool(server, "a quick request")
    for thread in slow:
        thread.join(timeout=30)
    assert status == 429, body
    assert isinstance(body, dict) and "--max-queue-wait-ms" in str(body["error"])
    assert results == [200, 200], "work admitted before the limit was reached is served"
    assert pool(server, "a quick request")[0] == 200, "with the queue drained the same request is served"
