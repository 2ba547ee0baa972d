"""Live answers fit the response models /openapi.json documents (so the document cannot drift from
what the handlers write), and the live document validates."""

from __future__ import annotations

import pytest
from openapi_spec_validator import validate
from pydantic import BaseModel

from lateserve.gateway import responses
from tests.integration.test_http_routes import DOCS, MODEL, QUERY
from tests.live import LiveServer, call

CASES: list[tuple[str, dict[str, object] | None, type[BaseModel]]] = [
    ("/rerank", {"query": QUERY, "documents": DOCS}, responses.RerankResponse),
    ("/score", {"text_1": QUERY, "text_2": DOCS}, responses.ScoreResponse),
    ("/pooling", {"input": [QUERY, "x"]}, responses.PoolingResponse),
    ("/pooling", {"input": QUERY, "encoding_format": "base64"}, responses.PoolingResponse),
    ("/tokenize", {"prompt": QUERY, "return_token_strs": True}, responses.TokenizeResponse),
    ("/detokenize", {"tokens": [5, 6]}, responses.DetokenizeResponse),
    ("/invocations", {"query": QUERY, "documents": DOCS}, responses.RerankResponse),
    ("/v1/models", None, responses.ModelList),
    (f"/v1/models/{MODEL}", None, responses.ModelCard),
    ("/version", None, responses.VersionResponse),
]


@pytest.mark.parametrize(("path", "body", "model"), CASES)
def test_answers_fit_the_documented_models(
    colbert_server: LiveServer, path: str, body: dict[str, object] | None, model: type[BaseModel]
) -> None:
    reply = call(colbert_server, path, body)
    if reply.status != 200:
        pytest.skip(f"{path} answered {reply.status} on this model: {reply.raw[:200]!r}")
    model.model_validate(reply.json())


def test_errors_fit_the_envelope(colbert_server: LiveServer) -> None:
    for path, body in [
        ("/rerank", {"query": 1}),
        ("/v1/models/nope", None),
        ("/pooling", {"input": "x", "task": "embed"}),
    ]:
        reply = call(colbert_server, path, body)
        assert reply.status >= 400
        responses.ErrorResponse.model_validate(reply.json())


def test_live_document_validates(colbert_server: LiveServer) -> None:
    document = call(colbert_server, "/openapi.json").json()
    validate(document)
    assert "/rerank" in document["paths"] and "/invocations" in document["paths"]
    assert call(colbert_server, "/docs").status == 200
