"""aiohttp handler for /pooling: parse -> translate -> PoolService.Pool -> translate."""

from __future__ import annotations

from aiohttp import web

from lateserve.gateway.common import http
from lateserve.gateway.common.translate import BYTES_FORMATS, timing_headers
from lateserve.gateway.keys import STUBS
from lateserve.gateway.pooling.protocol import PoolingRequest
from lateserve.gateway.pooling.translate import pool_request_to_proto, pool_response_to_json

routes = web.RouteTableDef()


@routes.post("/pooling")
async def pooling(request: web.Request) -> web.Response:
    """Pools every input with the requested task and returns the raw outputs."""
    body = await http.read_body(request, PoolingRequest)
    message = pool_request_to_proto(body, http.request_id(request, body.request_id))
    response = await request.app[STUBS].pool.Pool(message, metadata=http.grpc_metadata(request))
    http.count_tokens(request, response.usage)
    if body.encoding_format in BYTES_FORMATS:
        return http.bytes_response([(output.index, output.data) for output in response.outputs], body, response)
    data = pool_response_to_json(response, body, http.created())
    return http.json_response(data, headers=timing_headers(response.timings))
