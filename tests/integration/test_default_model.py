"""The bundled default (real all-MiniLM-L6-v2 weights), served exactly as `make serve` does: the
README's first curl returns a sensible ranking."""

from __future__ import annotations

import json
import urllib.request

from tests.live import LiveServer


def post(url: str, body: dict[str, object]) -> dict[str, object]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        data: dict[str, object] = json.loads(resp.read())
        return data


def test_readme_rerank_ranks_sensibly(minilm_server: LiveServer) -> None:
    docs = ["The weather is sunny.", "Machine learning is a subset of artificial intelligence."]
    answer = post(minilm_server.http_url + "/rerank", {"query": "What is machine learning?", "documents": docs})
    assert answer["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    results = answer["results"]
    assert isinstance(results, list)
    assert [r["index"] for r in results] == [1, 0]
    # Values from an independent transformers run (offline-models-and-oracles.md section 4): 5.47 and 1.09.
    assert abs(results[0]["relevance_score"] - 5.4724) < 1e-3
    assert abs(results[1]["relevance_score"] - 1.0887) < 1e-3
    assert results[0]["document"] == {"text": docs[1], "multi_modal": None}


def test_models_route_names_the_default(minilm_server: LiveServer) -> None:
    with urllib.request.urlopen(minilm_server.http_url + "/v1/models", timeout=30) as resp:
        models = json.loads(resp.read())
    assert [m["id"] for m in models["data"]] == ["sentence-transformers/all-MiniLM-L6-v2"]
    assert models["data"][0]["max_model_len"] == 512
