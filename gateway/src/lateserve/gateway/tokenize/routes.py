"""aiohttp handlers for /tokenize and /detokenize (TokenizeService)."""

from __future__ import annotations

from aiohttp import web

from lateserve.gateway.common import http
from lateserve.gateway.keys import STUBS
from lateserve.gateway.tokenize.protocol import DetokenizeRequest, TokenizeRequest
from lateserve.gateway.tokenize.translate import (
    detokenize_request_to_proto,
    detokenize_response_to_json,
    tokenize_request_to_proto,
    tokenize_response_to_json,
)

routes = web.RouteTableDef()


@routes.post("/tokenize")
async def tokenize(request: web.Request) -> web.Response:
    """Token ids (and optionally strings) of a prompt or chat messages."""
    body = await http.read_body(request, TokenizeRequest)
    response = await request.app[STUBS].tokenize.Tokenize(
        tokenize_request_to_proto(body), metadata=http.grpc_metadata(request)
    )
    return http.json_response(tokenize_response_to_json(response, body))


@routes.post("/detokenize")
async def detokenize(request: web.Request) -> web.Response:
    """The text of token ids."""
    body = await http.read_body(request, DetokenizeRequest)
    response = await request.app[STUBS].tokenize.Detokenize(
        detokenize_request_to_proto(body), metadata=http.grpc_metadata(request)
    )
    return http.json_response(detokenize_response_to_json(response))
