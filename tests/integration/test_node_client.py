"""The TypeScript client generated from the contract (clients/typescript, `make clients-ts`) called from
Node's own test runner against a live server: Rerank, Score, StreamPool in every dtype, Info."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.live import LiveServer

ROOT = Path(__file__).resolve().parents[2]
NODE_TESTS = ROOT / "tests" / "node"
CLIENT_BUILD = ROOT / "clients" / "typescript" / "dist" / "index.js"


def test_node_client_against_live_server(colbert_server: LiveServer) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the Node client test needs Node.js 20 or later")
    if not CLIENT_BUILD.exists():
        pytest.fail("clients/typescript is not built: run `make clients-ts` (part of `make buf` / `make test`)")
    files = sorted(str(p) for p in NODE_TESTS.glob("*.test.mjs"))
    assert files, "no Node tests in tests/node"
    env = {
        **os.environ,
        "LATESERVE_GRPC_ADDRESS": colbert_server.grpc_target,
        "LATESERVE_EXPECT_MODEL": colbert_server.config.served_model_name or "",
        "NO_COLOR": "1",
    }
    # Explicit files rather than the folder: Node 20 searches a folder, Node 22+ reads arguments as globs.
    done = subprocess.run(
        [node, "--test", "--test-reporter=tap", *files],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    counts = {k: int(v) for k, v in re.findall(r"^# (pass|fail|skipped|cancelled) (\d+)$", report, re.M)}
    assert counts.get("fail") == 0 and counts.get("cancelled") == 0, report
    assert counts.get("skipped") == 0, report  # the live tests did not skip for want of an address
    assert counts.get("pass", 0) >= 7, report
