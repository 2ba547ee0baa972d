"""aiohttp handler for /v1/embeddings: parse -> translate -> EmbedService.Embed -> translate."""

from __future__ import annotations

from aiohttp import web

from lateserve.gateway.common import http
from lateserve.gateway.common.translate import BYTES_FORMATS, timing_headers
from lateserve.gateway.embeddings.protocol import EmbeddingRequest
from lateserve.gateway.embeddings.translate import embed_request_to_proto, embed_response_to_json
from lateserve.gateway.keys import STUBS

routes = web.RouteTableDef()


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    """One vector per input; a model without the embed task answers 501 from the server."""
    body = await http.read_body(request, EmbeddingRequest)
    message = embed_request_to_proto(body, http.request_id(request, body.request_id))
    response = await request.app[STUBS].embed.Embed(message, metadata=http.grpc_metadata(request))
    http.count_tokens(request, response.usage)
    if body.encoding_format in BYTES_FORMATS:
        return http.bytes_response([(e.index, e.data) for e in response.embeddings], body, response)
    data = embed_response_to_json(response, body, http.created())
    return http.json_response(data, headers=timing_headers(response.timings))
