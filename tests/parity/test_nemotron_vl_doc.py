"""The reference doc's "Llama Nemotron Multimodal" section, command for command, from the repository root.

Each `vllm serve` command is parsed by lateserve's own CLI (`vllm` -> `lateserve`, the Hub id -> the tiny
checkpoint in that layout, plus `--served-model-name <the Hub id>`), with the template paths exactly as the doc
writes them, relative to the repository root. Each curl is run with the real `curl` binary against that server
(only `http://localhost:8000` becomes the server's address): as written, its `data:image/png;base64,` URLs
hold no image, which is a 400 naming the message part (embeddings) or the document (the cross-encoder's
pairs); with a PNG after the comma it is a 200 whose numbers equal the
NVIDIA-style reference (tests/reference_nemotron_vl.py).
"""

from __future__ import annotations

import base64
import json
import math
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lateserve.server.cli import build_parser, config_from_args
from tests.fixtures.nemotron_vl import write_nemotron_embed_vl, write_nemotron_rerank_vl
from tests.live import LiveServer
from tests.parity.common import image_bytes
from tests.reference_nemotron_vl import NemotronVLReference, cosine

REPO = Path(__file__).resolve().parents[2]

# The doc's commands, verbatim.
EMBED_SERVE = """vllm serve nvidia/llama-nemotron-embed-vl-1b-v2 \\
  --trust-remote-code \\
  --chat-template examples/pooling/embed/template/nemotron_embed_vl.jinja"""
EMBED_TEXT_CURL = """curl -s http://localhost:8000/v1/embeddings -H "Content-Type: application/json" -d '{ "model": "nvidia/llama-nemotron-embed-vl-1b-v2", "messages": [ { "role": "query", "content": [ {"type": "text", "text": "What is machine learning?"} ] } ] }'"""  # noqa: E501
EMBED_IMAGE_CURL = """curl -s http://localhost:8000/v1/embeddings -H "Content-Type: application/json" -d '{ "model": "nvidia/llama-nemotron-embed-vl-1b-v2", "messages": [ { "role": "document", "content": [ {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}, {"type": "text", "text": "Describe the image."} ] } ] }'"""  # noqa: E501
RERANK_SERVE = """vllm serve nvidia/llama-nemotron-rerank-vl-1b-v2 \\
  --runner pooling \\
  --trust-remote-code \\
  --chat-template examples/pooling/score/template/nemotron-vl-rerank.jinja"""
SCORE_CURL = """curl -s http://localhost:8000/score -H "Content-Type: application/json" -d '{ "model": "nvidia/llama-nemotron-rerank-vl-1b-v2", "data_1": "Find diagrams about autonomous robots", "data_2": [ { "content": [ {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}, {"type": "text", "text": "Robotics workflow diagram."} ] } ] }'"""  # noqa: E501
RERANK_CURL = """curl -s http://localhost:8000/rerank -H "Content-Type: application/json" -d '{ "model": "nvidia/llama-nemotron-rerank-vl-1b-v2", "query": "Find diagrams about autonomous robots", "documents": [ { "content": [ {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}, {"type": "text", "text": "Robotics workflow diagram."} ] }, { "content": [ {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}, {"type": "text", "text": "General skyline photo."} ] } ], "top_n": 2 }'"""  # noqa: E501

PNGS = [image_bytes((97, 61), 21), image_bytes((64, 90), 22)]
QUERY = "Find diagrams about autonomous robots"

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl binary")


@pytest.fixture(scope="module", autouse=True)
def repo_root() -> Iterator[None]:
    before = os.getcwd()
    os.chdir(REPO)
    try:
        yield
    finally:
        os.chdir(before)


def serve(command: str, checkpoint: Path) -> LiveServer:
    argv = shlex.split(command.replace("\\\n", " "))  # the shell's line continuation
    assert argv[:2] == ["vllm", "serve"]
    hub_id = argv[2]
    args = build_parser().parse_args(["serve", str(checkpoint), *argv[3:], "--served-model-name", hub_id])
    config = config_from_args(args)
    assert config.chat_template is not None and not Path(config.chat_template).is_absolute()
    assert (REPO / config.chat_template).is_file()
    return LiveServer(replace(config, workers=1, threads_per_worker=1, max_model_len=4096))


def curl(command: str, server: LiveServer, images: list[bytes] | None = None) -> dict[str, Any]:
    """Run the doc's curl against `server`; `images` fill the empty data URLs in order."""
    command = command.replace("http://localhost:8000", server.http_url)
    for data in images or []:
        command = command.replace('base64,"', "base64," + base64.b64encode(data).decode() + '"', 1)
    result = subprocess.run(
        [*shlex.split(command), "-w", "\n%{http_code}"], capture_output=True, text=True, timeout=120
    )
    body, _, status = result.stdout.rpartition("\n")
    return {"status": int(status), "body": json.loads(body)}


@pytest.fixture(scope="module")
def embed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_nemotron_embed_vl(tmp_path_factory.mktemp("doc") / "embed")


@pytest.fixture(scope="module")
def rerank_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_nemotron_rerank_vl(tmp_path_factory.mktemp("doc") / "rerank")


def test_embedding_section(embed_dir: Path) -> None:
    reference = NemotronVLReference(embed_dir)
    template = (REPO / "examples/pooling/embed/template/nemotron_embed_vl.jinja").read_text()
    with serve(EMBED_SERVE, embed_dir) as server:
        text = curl(EMBED_TEXT_CURL, server)
        assert text["status"] == 200, text
        assert text["body"]["model"] == "nvidia/llama-nemotron-embed-vl-1b-v2"
        expected = reference.embedding(*reference.chat_ids(template, "query", ["What is machine learning?"]))
        assert cosine(np.asarray(text["body"]["data"][0]["embedding"]), expected) >= 0.9999

        verbatim = curl(EMBED_IMAGE_CURL, server)
        assert verbatim["status"] == 400, verbatim
        assert verbatim["body"]["error"]["param"] == "messages[0].content[0].image_url", verbatim

        filled = curl(EMBED_IMAGE_CURL, server, PNGS[:1])
        assert filled["status"] == 200, filled
        parts = [PNGS[0], "Describe the image."]
        expected = reference.embedding(*reference.chat_ids(template, "document", parts))
        assert cosine(np.asarray(filled["body"]["data"][0]["embedding"]), expected) >= 0.9999


def test_reranker_section(rerank_dir: Path) -> None:
    reference = NemotronVLReference(rerank_dir)
    with serve(RERANK_SERVE, rerank_dir) as server:
        verbatim = curl(SCORE_CURL, server)
        assert verbatim["status"] == 400 and verbatim["body"]["error"]["param"] == "documents[0]", verbatim
        verbatim = curl(RERANK_CURL, server)
        assert verbatim["status"] == 400 and verbatim["body"]["error"]["param"] == "documents[0]", verbatim

        scored = curl(SCORE_CURL, server, PNGS[:1])
        assert scored["status"] == 200, scored
        expected = reference.rerank_score(QUERY, [PNGS[0], "Robotics workflow diagram."])
        assert math.isclose(scored["body"]["data"][0]["score"], expected, rel_tol=1e-4)

        ranked = curl(RERANK_CURL, server, PNGS)
        assert ranked["status"] == 200, ranked
        docs = [[PNGS[0], "Robotics workflow diagram."], [PNGS[1], "General skyline photo."]]
        scores = [reference.rerank_score(QUERY, d) for d in docs]
        results = ranked["body"]["results"]
        assert [r["index"] for r in results] == sorted(range(2), key=lambda i: -scores[i])
        for r in results:
            assert math.isclose(r["relevance_score"], scores[r["index"]], rel_tol=1e-4)
            assert r["document"]["text"] is None and r["document"]["multi_modal"][1]["type"] == "text"
