"""One live server for the fuzzers (the tiny HF_ColBERT checkpoint, one worker)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lateserve.server.config import ServerConfig
from tests.live import LiveServer


@pytest.fixture(scope="session")
def fuzz_server(colbert_dir: Path) -> Iterator[LiveServer]:
    config = ServerConfig(model=str(colbert_dir), workers=1, threads_per_worker=1, max_model_len=64)
    with LiveServer(config) as live:
        yield live
