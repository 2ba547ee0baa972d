"""ScoreService: pairs queries with documents and scores them by the model's kind."""

from __future__ import annotations

from typing import Any

import grpc

from lateserve.server.engine.pairs import score_pairs
from lateserve.server.rpc import rpc_method
from lateserve.server.services.convert import (
    ServedModel,
    items_from_proto,
    options_from_proto,
    request_id,
    timings,
    usage,
)
from lateserve.v1 import score_service_pb2 as pb
from lateserve.v1 import score_service_pb2_grpc as pb_grpc


class ScoreServicer(pb_grpc.ScoreServiceServicer):
    def __init__(self, model: ServedModel) -> None:
        self.model = model

    @rpc_method
    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.ScoreResponse:
        self.model.check(request.model)
        result = await score_pairs(
            self.model.engine,
            items_from_proto(request.queries, "queries"),
            items_from_proto(request.documents, "documents"),
            options_from_proto(request.options),
            request.score_mode,
            use_activation=request.use_activation if request.HasField("use_activation") else True,
        )
        return pb.ScoreResponse(
            id=f"score-{request_id(request.request_id)}",
            model=self.model.name,
            results=[pb.ScoreResult(index=i, score=s) for i, s in enumerate(result.scores)],
            usage=usage(result.prompt_tokens),
            timings=timings(result.timings),
        )
