"""OpenAPI 3.1 for the gateway, generated from the pydantic request and response models, and the
offline docs page.

`OPERATIONS` says, per registered route, which request model it reads, which answer it writes and
which errors it may answer (every error is vLLM's envelope, `responses.ErrorResponse`); the
document's schemas are pydantic's JSON Schemas of those models (OpenAPI 3.1 is JSON Schema 2020-12).
A route registered but absent here is caught by tests/gateway/test_openapi.py. `/docs` serves
Swagger UI from the `swagger-ui-bundle-v2` package installed with the gateway: no CDN at run time.
"""

from __future__ import annotations

import html
import mimetypes
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from lateserve.gateway import responses
from lateserve.gateway.embeddings.protocol import EmbeddingRequest
from lateserve.gateway.errors import GatewayError
from lateserve.gateway.keys import CONFIG, OPENAPI
from lateserve.gateway.middlewares import PUBLIC_PATHS
from lateserve.gateway.pooling.protocol import PoolingRequest
from lateserve.gateway.rerank.protocol import RerankRequest
from lateserve.gateway.score.protocol import ScoreRequest
from lateserve.gateway.tokenize.protocol import DetokenizeRequest, TokenizeRequest

# Routes anyone may call without an API key: the ones the auth middleware lets through.
PUBLIC = PUBLIC_PATHS

_ERROR_TEXT = {
    400: "Bad request: invalid JSON or fields, over a request limit, input too long, unsupported task",
    401: "Missing or wrong API key (`Authorization: Bearer <key>`; only with --api-key)",
    404: "Unknown model",
    408: "The request body did not arrive in time",
    413: "Body over --max-body-mb",
    429: "Queue full (Retry-After)",
    500: "Internal error",
    501: "Not implemented by this model",
    503: "No worker can run the request (Retry-After)",
    504: "Deadline exceeded",
}
API_ERRORS = (400, 401, 404, 408, 413, 429, 500, 501, 503, 504)
INFO_ERRORS = (401, 500, 503)


@dataclass(frozen=True, slots=True)
class Operation:
    """One method on one path: what it reads and what it answers."""

    summary: str
    tag: str
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    media_type: str = "application/json"
    errors: tuple[int, ...] = API_ERRORS
    bytes_answer: bool = False  # encoding_format bytes / bytes_only: application/octet-stream
    request_alternatives: tuple[type[BaseModel], ...] = ()
    response_alternatives: tuple[type[BaseModel], ...] = ()
    path_params: tuple[str, ...] = field(default=())


_RERANK = Operation("Rank documents against a query (vLLM /rerank)", "scoring", RerankRequest, responses.RerankResponse)
_SCORE = Operation("Score query/document pairs (vLLM /score)", "scoring", ScoreRequest, responses.ScoreResponse)
_PING = Operation("Health check (SageMaker); 200 when serving, else 503", "operations", media_type="", errors=())

OPERATIONS: dict[tuple[str, str], Operation] = {
    ("POST", "/rerank"): _RERANK,
    ("POST", "/v1/rerank"): Operation(
        "Deprecated Jina-compatible alias of /rerank", "scoring", RerankRequest, responses.RerankResponse
    ),
    ("POST", "/v2/rerank"): Operation(
        "Cohere v2-compatible /rerank", "scoring", RerankRequest, responses.RerankResponse
    ),
    ("POST", "/score"): _SCORE,
    ("POST", "/v1/score"): Operation("Deprecated alias of /score", "scoring", ScoreRequest, responses.ScoreResponse),
    ("POST", "/pooling"): Operation(
        "Raw pooled outputs: token vectors, token scores, vectors, label scores (vLLM /pooling)",
        "encoding",
        PoolingRequest,
        responses.PoolingResponse,
        bytes_answer=True,
    ),
    ("POST", "/v1/embeddings"): Operation(
        "One vector per input (OpenAI / vLLM embeddings)",
        "encoding",
        EmbeddingRequest,
        responses.EmbeddingResponse,
        bytes_answer=True,
    ),
    ("POST", "/invocations"): Operation(
        "SageMaker: answered as /v1/embeddings (models with embed), /rerank, /score or /pooling, the first "
        "whose request schema the body fits",
        "scoring",
        None,
        None,
        bytes_answer=True,
        request_alternatives=(EmbeddingRequest, RerankRequest, ScoreRequest, PoolingRequest),
        response_alternatives=(
            responses.EmbeddingResponse,
            responses.RerankResponse,
            responses.ScoreResponse,
            responses.PoolingResponse,
        ),
    ),
    ("POST", "/tokenize"): Operation(
        "Token ids of a prompt or chat", "tokenizer", TokenizeRequest, responses.TokenizeResponse
    ),
    ("POST", "/detokenize"): Operation(
        "Text of token ids", "tokenizer", DetokenizeRequest, responses.DetokenizeResponse
    ),
    ("GET", "/v1/models"): Operation(
        "The served models", "operations", response=responses.ModelList, errors=INFO_ERRORS
    ),
    ("GET", "/v1/models/{model_id}"): Operation(
        "One served model",
        "operations",
        response=responses.ModelCard,
        errors=(401, 404, 500, 503),
        path_params=("model_id",),
    ),
    ("GET", "/version"): Operation(
        "The server's version", "operations", response=responses.VersionResponse, errors=(500, 503)
    ),
    ("GET", "/health"): Operation(
        "200 with an empty body when serving, else 503", "operations", media_type="", errors=()
    ),
    ("GET", "/ping"): _PING,
    ("POST", "/ping"): _PING,
    ("GET", "/metrics"): Operation("Prometheus text exposition", "operations", media_type="text/plain", errors=()),
    ("GET", "/openapi.json"): Operation("This document", "operations", media_type="application/json", errors=(401,)),
    ("GET", "/docs"): Operation(
        "Swagger UI for this document (served offline)", "operations", media_type="text/html", errors=(401,)
    ),
    ("GET", "/docs/static/{name}"): Operation(
        "Swagger UI's assets",
        "operations",
        media_type="application/octet-stream",
        errors=(401, 404),
        path_params=("name",),
    ),
}


def _request_models() -> list[type[BaseModel]]:
    models: list[type[BaseModel]] = []
    for op in OPERATIONS.values():
        for model in (op.request, *op.request_alternatives):
            if model is not None and model not in models:
                models.append(model)
    return models


def _response_models() -> list[type[BaseModel]]:
    models: list[type[BaseModel]] = [responses.ErrorResponse, responses.BytesMetadata]
    for op in OPERATIONS.values():
        for model in (op.response, *op.response_alternatives):
            if model is not None and model not in models:
                models.append(model)
    return models


def registered_operations(app: web.Application) -> set[tuple[str, str]]:
    """(method, path template) of every route of `app` (HEAD, added beside each GET, left out)."""
    found = set()
    for route in app.router.routes():
        if route.method in ("HEAD", "*"):
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("formatter") or info.get("path") or (route.resource.canonical if route.resource else "")
        found.add((route.method, str(path)))
    return found


def build_document(app: web.Application, *, version: str = "0.1.0") -> dict[str, Any]:
    """The OpenAPI 3.1 document of the routes `app` registers."""
    config = app[CONFIG]
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(m, "validation") for m in _request_models()]
    wanted += [(m, "serialization") for m in _response_models()]
    keys, top = models_json_schema(wanted, ref_template="#/components/schemas/{model}")

    def ref(model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
        return dict(keys[(model, mode)])

    def one_of(models: tuple[type[BaseModel], ...], mode: JsonSchemaMode) -> dict[str, Any]:
        return {"anyOf": [ref(m, mode) for m in models]}

    paths: dict[str, dict[str, Any]] = {}
    for method, path in sorted(registered_operations(app)):
        op = OPERATIONS.get((method, path))
        if op is None:
            continue  # tests/gateway/test_openapi.py fails on this
        operation: dict[str, Any] = {
            "summary": op.summary,
            "tags": [op.tag],
            "operationId": f"{method.lower()}{path.replace('/', '_').replace('{', '').replace('}', '')}",
        }
        if op.path_params:
            operation["parameters"] = [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in op.path_params
            ]
        if op.request is not None or op.request_alternatives:
            body = (
                ref(op.request, "validation")
                if op.request is not None
                else one_of(op.request_alternatives, "validation")
            )
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
        ok: dict[str, Any] = {"description": "OK"}
        content: dict[str, Any] = {}
        if op.response is not None:
            content["application/json"] = {"schema": ref(op.response, "serialization")}
        elif op.response_alternatives:
            content["application/json"] = {"schema": one_of(op.response_alternatives, "serialization")}
        elif op.media_type:
            content[op.media_type] = {"schema": {"type": "string"}}
        if op.bytes_answer:
            content["application/octet-stream"] = {
                "schema": {"type": "string", "contentMediaType": "application/octet-stream"}
            }
            metadata_schema = {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": ref(responses.BytesMetadata, "serialization"),
            }
            ok["headers"] = {
                "metadata": {
                    "description": "encoding_format bytes (not bytes_only): JSON of BytesMetadata",
                    "schema": metadata_schema,
                }
            }
        if content:
            ok["content"] = content
        answers: dict[str, Any] = {"200": ok}
        if path in ("/health", "/ping"):
            answers["503"] = {"description": "Not serving"}
        for status in op.errors:
            if status == 401 and not config.api_key:
                continue
            answers[str(status)] = {
                "description": _ERROR_TEXT[status],
                "content": {"application/json": {"schema": ref(responses.ErrorResponse, "serialization")}},
            }
        operation["responses"] = answers
        if config.api_key and path not in PUBLIC:
            operation["security"] = [{"bearer": []}]
        paths.setdefault(path, {})[method.lower()] = operation
    components: dict[str, Any] = {"schemas": top.get("$defs", {})}
    if config.api_key:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "lateserve",
            "version": version,
            "description": "vLLM-compatible HTTP API of lateserve (late-interaction and multimodal retrieval).",
        },
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "paths": paths,
        "components": components,
    }


routes = web.RouteTableDef()


@routes.get("/openapi.json")
async def openapi_json(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document (built once per app)."""
    document = request.app[OPENAPI]
    if "document" not in document:
        document["document"] = build_document(request.app)
    return web.json_response(document["document"])


def swagger_ui_dir() -> Path | None:
    """Swagger UI's files from the swagger-ui-bundle-v2 package, or None when it is not installed."""
    try:
        import swagger_ui_bundle
    except ImportError:
        return None
    return Path(swagger_ui_bundle.swagger_ui_path)


_ASSETS = frozenset(
    {
        "swagger-ui.css",
        "swagger-ui-bundle.js",
        "swagger-ui-standalone-preset.js",
        "favicon-32x32.png",
        "favicon-16x16.png",
    }
)

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css">
<link rel="icon" type="image/png" href="/docs/static/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({{url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true}});
</script>
</body>
</html>
"""


@routes.get("/docs")
async def docs(request: web.Request) -> web.Response:
    """Swagger UI over /openapi.json; its assets come from this server (/docs/static/...)."""
    if swagger_ui_dir() is None:
        raise GatewayError("the docs page needs the swagger-ui-bundle-v2 package", status=404, type="NotFoundError")
    return web.Response(text=_PAGE.format(title=html.escape("lateserve API")), content_type="text/html")


@routes.get("/docs/static/{name}")
async def docs_static(request: web.Request) -> web.StreamResponse:
    """One of Swagger UI's files (a fixed list; nothing else on disk is reachable)."""
    name = request.match_info["name"]
    folder = swagger_ui_dir()
    if folder is None or name not in _ASSETS or not (folder / name).is_file():
        raise GatewayError(f"no docs asset {name!r}", status=404, type="NotFoundError")
    kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return web.Response(
        body=(folder / name).read_bytes(), content_type=kind, headers={"Cache-Control": "max-age=86400"}
    )
