"""The reference doc's ColQwen3 section, every command and curl, against a live server.

Served as the doc says (`vllm serve TomoroAI/tomoro-colqwen3-embed-4b --max-model-len 4096`): lateserve's CLI
parses `serve <dir> --served-model-name TomoroAI/tomoro-colqwen3-embed-4b --max-model-len 4096`, where <dir> is
the tiny deterministic Tomoro-layout checkpoint (tests/fixtures/colqwen3.py) standing in for the Hub id (no
network here), served under the Hub id the doc's bodies name.

The curls are the doc's, verbatim: each runs through `curl` itself with only the host:port changed to the
live server's. The doc's image parts are data URLs whose base64 payload is elided (`data:image/png;base64,`);
the test fills each payload with a PNG made here (the doc's two rerank documents get two different
images), touching nothing else in the bodies, so no http server or media policy is involved.

Checked: the JSON shapes vLLM documents (/rerank `results` sorted with `index`, `document` {text, multi_modal}
(image documents echoed as `multi_modal`, their content list as sent), `relevance_score`, `top_n`; /score
`data` items {index, object "score", score} for text_1/text_2 and data_1/data_2 content lists; /pooling
`data` items {index, object "pooling", data [tokens, dim]} for `input` with task token_embed and for
`messages` holding an image with no task), and the numbers against plain transformers
(tests/reference_qwen3vl.py: per-token cosine >= 0.9999, MaxSim relative error <= 1e-4).
"""

from __future__ import annotations

import base64
import json
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lateserve.server.cli import build_parser, config_from_args
from tests.fixtures.colqwen3 import EMBED_DIM, write_colqwen3_tomoro
from tests.fixtures.toy_vision import http_json
from tests.live import LiveServer
from tests.parity.common import IMAGES, check_close, check_maxsim
from tests.reference_qwen3vl import Part, Qwen3VLReference, maxsim

HUB_NAME = "TomoroAI/tomoro-colqwen3-embed-4b"
DOC_SERVE = "vllm serve TomoroAI/tomoro-colqwen3-embed-4b --max-model-len 4096"

# The doc's curls, verbatim.
DOC_RERANK = """curl -s http://localhost:8000/rerank -H "Content-Type: application/json" -d '{ "model": "TomoroAI/tomoro-colqwen3-embed-4b", "query": "What is machine learning?", "documents": [ "Machine learning is a subset of artificial intelligence.", "Python is a programming language.", "Deep learning uses neural networks." ] }'"""  # noqa: E501
DOC_SCORE = """curl -s http://localhost:8000/score -H "Content-Type: application/json" -d '{ "model": "TomoroAI/tomoro-colqwen3-embed-4b", "text_1": "What is the capital of France?", "text_2": ["The capital of France is Paris.", "Python is a programming language."] }'"""  # noqa: E501
DOC_SCORE_IMAGES = """curl -s http://localhost:8000/score -H "Content-Type: application/json" -d '{ "model": "TomoroAI/tomoro-colqwen3-embed-4b", "data_1": "Retrieve the city of Beijing", "data_2": [ { "content": [ {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}, {"type": "text", "text": "Describe the image."} ] } ] }'"""  # noqa: E501
DOC_RERANK_IMAGES = """curl -s http://localhost:8000/rerank -H "Content-Type: application/json" -d '{ "model": "TomoroAI/tomoro-colqwen3-embed-4b", "query": "Retrieve the city of Beijing", "documents": [ { "content": [ {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}, {"type": "text", "text": "Describe the image."} ] }, { "content": [ {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}, {"type": "text", "text": "Describe the image."} ] } ], "top_n": 2 }'"""  # noqa: E501
DOC_POOLING = """curl -s http://localhost:8000/pooling -H "Content-Type: application/json" -d '{ "model": "TomoroAI/tomoro-colqwen3-embed-4b", "input": "What is machine learning?", "task": "token_embed" }'"""  # noqa: E501
DOC_POOLING_IMAGE = """curl -s http://localhost:8000/pooling -H "Content-Type: application/json" -d '{ "model": "TomoroAI/tomoro-colqwen3-embed-4b", "messages": [ { "role": "user", "content": [ {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}, {"type": "text", "text": "Describe the image."} ] } ] }'"""  # noqa: E501

ELIDED = "data:image/png;base64,"
FILL = [IMAGES["odd"], IMAGES["gray"]]
"""PNGs for the doc's elided payloads, in order of appearance."""


def fill_images(command: str) -> tuple[str, list[bytes]]:
    """The command with each elided PNG payload filled in (in order); the images used."""
    pieces = command.split(ELIDED)
    used = FILL[: len(pieces) - 1]
    out = pieces[0]
    for image, piece in zip(used, pieces[1:], strict=True):
        assert image[:8] == b"\x89PNG\r\n\x1a\n"
        out += ELIDED + base64.b64encode(image).decode() + piece
    return out, used


def run_curl(live: LiveServer, command: str) -> tuple[dict[str, Any], dict[str, Any], list[bytes]]:
    """Runs the doc's curl (payloads filled) against the live server; (request body, response, images)."""
    command, images = fill_images(command)
    argv = shlex.split(command.replace("http://localhost:8000", live.http_url))
    assert argv[0] == "curl"
    done = subprocess.run([*argv, "-w", "\n%{http_code}"], capture_output=True, text=True, timeout=120, check=True)
    text, _, code = done.stdout.rpartition("\n")
    assert code == "200", done.stdout[-2000:]
    return json.loads(argv[argv.index("-d") + 1]), json.loads(text), images


def content_parts(content: list[dict[str, Any]], images: Iterator[bytes]) -> list[Part]:
    """A content list as the reference's parts (each image part takes the next filled image)."""
    return [next(images) if part["type"] == "image_url" else part["text"] for part in content]


@pytest.fixture(scope="module")
def tomoro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_colqwen3_tomoro(tmp_path_factory.mktemp("tomoro"))


@pytest.fixture(scope="module")
def live(tomoro: Path) -> Iterator[LiveServer]:
    argv = shlex.split(DOC_SERVE)[1:]  # serve <hub id> --max-model-len 4096
    assert argv[1] == HUB_NAME
    args = [argv[0], str(tomoro), "--served-model-name", HUB_NAME, *argv[2:]]
    config = config_from_args(build_parser().parse_args([*args, "--workers", "1", "--threads-per-worker", "1"]))
    assert config.max_model_len == 4096 and config.served_model_name == HUB_NAME
    with LiveServer(config) as server:
        yield server


@pytest.fixture(scope="module")
def reference(tomoro: Path) -> Qwen3VLReference:
    return Qwen3VLReference(tomoro)


def check_rerank_item(item: dict[str, Any]) -> None:
    assert set(item) == {"index", "document", "relevance_score"}, item
    assert set(item["document"]) == {"text", "multi_modal"}


def test_models_lists_the_hub_name(live: LiveServer) -> None:
    status, body = http_json(live.http_url, "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == [HUB_NAME], body


def test_text_rerank(live: LiveServer, reference: Qwen3VLReference) -> None:
    request, body, _ = run_curl(live, DOC_RERANK)
    assert body["model"] == HUB_NAME and isinstance(body["id"], str)
    q = reference.vectors([request["query"]])
    expected = [maxsim(q, reference.vectors([d])) for d in request["documents"]]
    assert [r["index"] for r in body["results"]] == sorted(range(3), key=lambda i: -expected[i])
    for result in body["results"]:
        check_rerank_item(result)
        assert result["document"] == {"text": request["documents"][result["index"]], "multi_modal": None}
        check_maxsim(result["relevance_score"], expected[result["index"]])
    tokens = sum(len(reference.prompt([t])[0]) for t in [request["query"], *request["documents"]])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_text_score(live: LiveServer, reference: Qwen3VLReference) -> None:
    request, body, _ = run_curl(live, DOC_SCORE)
    assert body["model"] == HUB_NAME and body["object"] == "list"
    q = reference.vectors([request["text_1"]])
    assert [item["index"] for item in body["data"]] == [0, 1]
    for k, item in enumerate(body["data"]):
        assert item["object"] == "score"
        check_maxsim(item["score"], maxsim(q, reference.vectors([request["text_2"][k]])))
    assert body["usage"]["prompt_tokens"] > 0


def test_score_text_query_against_image_documents(live: LiveServer, reference: Qwen3VLReference) -> None:
    request, body, images = run_curl(live, DOC_SCORE_IMAGES)
    assert body["model"] == HUB_NAME and body["object"] == "list"
    assert len(body["data"]) == 1 and body["data"][0]["index"] == 0 and body["data"][0]["object"] == "score"
    document = content_parts(request["data_2"][0]["content"], iter(images))
    assert isinstance(document[0], bytes)
    expected = maxsim(reference.vectors([request["data_1"]]), reference.vectors(document))
    check_maxsim(body["data"][0]["score"], expected)


def test_rerank_image_documents_with_top_n(live: LiveServer, reference: Qwen3VLReference) -> None:
    request, body, images = run_curl(live, DOC_RERANK_IMAGES)
    assert body["model"] == HUB_NAME and request["top_n"] == 2
    filled = iter(images)
    documents = [content_parts(d["content"], filled) for d in request["documents"]]
    q = reference.vectors([request["query"]])
    expected = [maxsim(q, reference.vectors(d)) for d in documents]
    assert expected[0] != expected[1]
    assert [r["index"] for r in body["results"]] == sorted(range(2), key=lambda i: -expected[i])[: request["top_n"]]
    for result in body["results"]:
        check_rerank_item(result)
        # Image documents are echoed as multi_modal: the content list as sent.
        assert result["document"] == {"text": None, "multi_modal": request["documents"][result["index"]]["content"]}
        check_maxsim(result["relevance_score"], expected[result["index"]])
    tokens = len(reference.prompt([request["query"]])[0]) + sum(len(reference.prompt(d)[0]) for d in documents)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_pooling_token_embed_input(live: LiveServer, reference: Qwen3VLReference) -> None:
    request, body, _ = run_curl(live, DOC_POOLING)
    assert body["model"] == HUB_NAME and body["object"] == "list" and body["id"].startswith("pooling-")
    assert len(body["data"]) == 1
    item = body["data"][0]
    assert item["index"] == 0 and item["object"] == "pooling"
    vectors = np.asarray(item["data"], dtype=np.float32)
    assert vectors.shape[1] == EMBED_DIM
    check_close(vectors, reference.vectors([request["input"]]))
    assert body["usage"]["prompt_tokens"] == len(vectors)


def test_pooling_messages_with_an_image(live: LiveServer, reference: Qwen3VLReference) -> None:
    request, body, images = run_curl(live, DOC_POOLING_IMAGE)
    assert "task" not in request  # the model's default task: token_embed
    assert body["model"] == HUB_NAME and body["object"] == "list"
    item = body["data"][0]
    assert item["index"] == 0 and item["object"] == "pooling"
    vectors = np.asarray(item["data"], dtype=np.float32)
    content = request["messages"][0]["content"]
    template = [{"type": "image"} if p["type"] == "image_url" else {"type": "text", "text": p["text"]} for p in content]
    ids, decoded = reference.chat_ids([{"role": "user", "content": template}], images)
    assert vectors.shape == (len(ids), EMBED_DIM)
    check_close(vectors, reference.vectors_for(ids, decoded))
    assert body["usage"]["prompt_tokens"] == len(ids)
