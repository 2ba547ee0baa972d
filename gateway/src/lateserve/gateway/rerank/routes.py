"""aiohttp handlers for the rerank routes: parse -> translate -> RerankService.Rerank -> translate."""

from __future__ import annotations

import functools
import logging

from aiohttp import web

from lateserve.gateway.common import http
from lateserve.gateway.common.translate import timing_headers
from lateserve.gateway.keys import STUBS
from lateserve.gateway.rerank.protocol import RerankRequest
from lateserve.gateway.rerank.translate import rerank_request_to_proto, rerank_response_to_json

logger = logging.getLogger(__name__)

routes = web.RouteTableDef()


@routes.post("/rerank")
@routes.post("/v2/rerank")
async def rerank(request: web.Request) -> web.Response:
    """Ranks `documents` against `query`, best first, cut to `top_n` by the server."""
    body = await http.read_body(request, RerankRequest)
    message = rerank_request_to_proto(body, http.request_id(request, body.request_id))
    response = await request.app[STUBS].rerank.Rerank(message, metadata=http.grpc_metadata(request))
    http.count_tokens(request, response.usage)
    return http.json_response(rerank_response_to_json(response, body), headers=timing_headers(response.timings))


@functools.cache
def _warn_v1_rerank() -> None:
    logger.warning("/v1/rerank is deprecated (Jina-compatible alias); use /rerank")


@routes.post("/v1/rerank")
async def rerank_v1(request: web.Request) -> web.StreamResponse:
    """Deprecated alias of /rerank; warns once per process, as vLLM."""
    _warn_v1_rerank()
    return await rerank(request)
