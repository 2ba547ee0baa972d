"""Hypothesis over every HTTP route of a live server (issue 12, item 6): random and malformed JSON,
bodies shaped like each route's pydantic request model with values of any type, raw bytes and wrong
content types. Every answer must come (no hang: a client timeout fails the test) and must not be a 5xx;
errors carry vLLM's envelope with `code` equal to the status.

Budget: a fixed number of examples per test (1000 each, about 40 s for both files on two cores); no example
database and a fixed seed, so a run is reproducible."""

from __future__ import annotations

import http.client
import json
from typing import Any

import pydantic
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lateserve.gateway.embeddings.protocol import EmbeddingRequest
from lateserve.gateway.pooling.protocol import PoolingRequest
from lateserve.gateway.rerank.protocol import RerankRequest
from lateserve.gateway.score.protocol import ScoreRequest
from lateserve.gateway.tokenize.protocol import DetokenizeRequest, TokenizeRequest
from tests.live import LiveServer

POST_ROUTES: dict[str, type[pydantic.BaseModel]] = {
    "/rerank": RerankRequest,
    "/v1/rerank": RerankRequest,
    "/v2/rerank": RerankRequest,
    "/score": ScoreRequest,
    "/v1/score": ScoreRequest,
    "/pooling": PoolingRequest,
    "/v1/embeddings": EmbeddingRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}
GET_ROUTES = ["/health", "/ping", "/version", "/v1/models", "/metrics"]
TIMEOUT_S = 60
FUZZ = settings(
    max_examples=1000,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | st.sampled_from(["", "token_embed", "embed", "classify", "token_classify", "float", "base64", "left", "right"])
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)
words = st.text(alphabet=st.characters(codec="utf-8"), max_size=60)
token_ids = st.lists(st.integers(min_value=-5, max_value=40_000), max_size=70)
content = st.lists(
    st.fixed_dictionaries({"type": st.just("text"), "text": words})
    | st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": words})})
    | json_values,
    max_size=3,
)
plausible = (
    words
    | st.lists(words, max_size=6)
    | token_ids
    | st.lists(token_ids, max_size=3)
    | st.fixed_dictionaries({"content": content})
    | st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x", ""]), "content": words | content}),
        max_size=3,
    )
    | st.integers(min_value=-3, max_value=600)
    | st.booleans()
)


def body_for(schema: type[pydantic.BaseModel]) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts over the model's field names (and a few unknown ones), each value plausible or of any type."""
    names = sorted({f.alias or name for name, f in schema.model_fields.items()} | {"unknown_field"})
    return st.dictionaries(st.sampled_from(names), plausible | json_values, max_size=len(names))


def call(server: LiveServer, method: str, path: str, body: bytes | None, content_type: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=TIMEOUT_S)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()  # a hang raises TimeoutError and fails the example
        return response.status, response.read()
    finally:
        connection.close()


def check(status: int, raw: bytes, what: object) -> None:
    assert status < 500, (status, raw[:500], str(what)[:500])
    if status >= 400:
        envelope = json.loads(raw)
        assert envelope["error"]["code"] == status, envelope


@FUZZ
@given(data=st.data())
def test_routes_with_bodies_shaped_like_their_models(fuzz_server: LiveServer, data: st.DataObject) -> None:
    path = data.draw(st.sampled_from(sorted(POST_ROUTES)))
    body = data.draw(body_for(POST_ROUTES[path]))
    status, raw = call(fuzz_server, "POST", path, json.dumps(body).encode(), "application/json")
    check(status, raw, (path, body))


@FUZZ
@given(
    path=st.sampled_from(sorted(POST_ROUTES) + GET_ROUTES + ["/nope", "/v1/rerank/x"]),
    method=st.sampled_from(["POST", "GET", "PUT"]),
    body=json_values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=200),
    content_type=st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", ""]),
)
def test_any_route_with_any_bytes(
    fuzz_server: LiveServer, path: str, method: str, body: bytes, content_type: str
) -> None:
    status, raw = call(fuzz_server, method, path, body, content_type)
    check(status, raw, (method, path, body))
