"""aiohttp handlers for /score and /v1/score: parse -> translate -> ScoreService.Score -> translate."""

from __future__ import annotations

import functools
import logging

from aiohttp import web

from lateserve.gateway.common import http
from lateserve.gateway.common.translate import timing_headers
from lateserve.gateway.keys import STUBS
from lateserve.gateway.score.protocol import ScoreRequest
from lateserve.gateway.score.translate import score_request_to_proto, score_response_to_json

logger = logging.getLogger(__name__)

routes = web.RouteTableDef()


@routes.post("/score")
async def score(request: web.Request) -> web.Response:
    """Scores query/document pairs; the server pairs them 1:1, 1:N or N:N."""
    body = await http.read_body(request, ScoreRequest)
    message = score_request_to_proto(body, http.request_id(request, body.request_id))
    response = await request.app[STUBS].score.Score(message, metadata=http.grpc_metadata(request))
    http.count_tokens(request, response.usage)
    data = score_response_to_json(response, http.created())
    return http.json_response(data, headers=timing_headers(response.timings))


@functools.cache
def _warn_v1_score() -> None:
    logger.warning("/v1/score is deprecated; use /score")


@routes.post("/v1/score")
async def score_v1(request: web.Request) -> web.StreamResponse:
    """Deprecated alias of /score; warns once per process, as vLLM."""
    _warn_v1_score()
    return await score(request)
