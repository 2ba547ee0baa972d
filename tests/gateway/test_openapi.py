"""/openapi.json is a valid OpenAPI 3.1 document (openapi-spec-validator) generated from the pydantic
models, covers every registered route, gives every error its envelope; /docs works offline."""

from __future__ import annotations

import re
from typing import Any

import pytest
from aiohttp import web
from openapi_spec_validator import validate

from lateserve.gateway import openapi
from lateserve.gateway.app import create_app
from lateserve.gateway.config import GatewayConfig


def app(**config: Any) -> web.Application:
    return create_app(GatewayConfig(grpc_target="unused:1", **config), stubs=object())  # type: ignore[arg-type]


@pytest.mark.parametrize("api_key", [None, "sk-test"])
def test_document_is_valid_openapi_3_1(api_key: str | None) -> None:
    document = openapi.build_document(app(api_key=api_key))
    assert document["openapi"] == "3.1.0"
    validate(document)


def test_every_registered_route_is_documented() -> None:
    application = app()
    registered = openapi.registered_operations(application)
    document = openapi.build_document(application)
    documented = {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}
    missing = registered - documented
    assert not missing, f"routes missing from /openapi.json (add them to openapi.OPERATIONS): {sorted(missing)}"
    assert documented == registered


def test_a_new_route_without_an_entry_is_caught() -> None:
    application = app()

    async def secret(request: web.Request) -> web.Response:
        return web.Response()

    application.router.add_get("/v1/secret", secret)
    document = openapi.build_document(application)
    assert "/v1/secret" not in document["paths"]
    assert ("GET", "/v1/secret") in openapi.registered_operations(application) - set(openapi.OPERATIONS)


def test_schemas_come_from_the_models() -> None:
    document = openapi.build_document(app(api_key="k"))
    schemas = document["components"]["schemas"]
    rerank = document["paths"]["/rerank"]["post"]
    assert rerank["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/RerankRequest"
    }
    assert set(schemas["RerankRequest"]["properties"]) >= {"query", "documents", "top_n", "max_tokens_per_doc"}
    assert schemas["EncodingFields"]["properties"]["encoding_format"]["enum"] if "EncodingFields" in schemas else True
    pooling = schemas["PoolingRequest"]["properties"]
    assert set(pooling["encoding_format"]["enum"]) == {"float", "base64", "bytes", "bytes_only"}
    assert "fp8_e4m3" in pooling["embed_dtype"]["enum"]
    ok = document["paths"]["/pooling"]["post"]["responses"]["200"]
    assert set(ok["content"]) == {"application/json", "application/octet-stream"} and "metadata" in ok["headers"]
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            for status, answer in op["responses"].items():
                if int(status) >= 400 and not (path in ("/health", "/ping") and status == "503"):
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, status)
            public = path in openapi.PUBLIC
            assert ("security" in op) is not public, (method, path)
            assert ("401" in op["responses"]) is (not public and path not in ("/health", "/ping")), (method, path)
    assert document["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}


@pytest.fixture
async def client(aiohttp_client: Any) -> Any:
    return await aiohttp_client(app())


@pytest.mark.asyncio(loop_scope="session")
async def test_served_document_and_offline_docs(client: Any) -> None:
    served = await (await client.get("/openapi.json")).json()
    validate(served)
    page = await client.get("/docs")
    assert page.status == 200 and page.content_type == "text/html"
    text = await page.text()
    assert "http://" not in text and "https://" not in text  # no CDN
    for asset in re.findall(r'(?:src|href)="(/docs/static/[^"]+)"', text):
        reply = await client.get(asset)
        assert reply.status == 200, asset
        assert len(await reply.read()) > 0
    assert (await client.get("/docs/static/index.html")).status == 404
    assert (await client.get("/docs/static/..%2F__init__.py")).status == 404
