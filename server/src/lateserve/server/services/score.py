"""ScoreService: pairs queries with documents and scores them by the model's kind."""

from __future__ import annotations

from typing import Any

import grpc

from lateserve.server.engine.pairs import PairScores, score_pairs
from lateserve.server.rpc import rpc_method
from lateserve.server.services.convert import (
    ServedModel,
    count_tensor_bytes,
    items_from_proto,
    options_from_proto,
    request_id,
    timings,
    usage,
)
from lateserve.v1 import common_pb2 as c
from lateserve.v1 import score_service_pb2 as pb
from lateserve.v1 import score_service_pb2_grpc as pb_grpc
from lateserve.wire.tensors import to_tensor


class ScoreServicer(pb_grpc.ScoreServiceServicer):
    def __init__(self, model: ServedModel) -> None:
        self.model = model

    def _maps(self, result: PairScores, index: int) -> list[pb.SimilarityMap]:
        if result.maps is None:
            return []
        processor = self.model.engine.processor
        return [
            pb.SimilarityMap(
                image_index=m.image_index,
                height=m.data.shape[1],
                width=m.data.shape[2],
                query_tokens=processor.token_strings(m.query_token_ids),
                data=to_tensor(m.data, c.DTYPE_FLOAT32),
            )
            for m in result.maps[index]
        ]

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
            max_tokens_per_doc=request.max_tokens_per_doc,
            max_tokens_per_query=request.max_tokens_per_query,
            similarity_maps=request.return_similarity_maps,
        )
        results = [
            pb.ScoreResult(index=i, score=s, similarity_maps=self._maps(result, i)) for i, s in enumerate(result.scores)
        ]
        if result.maps is not None:
            count_tensor_bytes("Score", (m.data for r in results for m in r.similarity_maps))
        return pb.ScoreResponse(
            id=f"score-{request_id(request.request_id)}",
            model=self.model.name,
            results=results,
            usage=usage(result.prompt_tokens),
            timings=timings(result.timings),
        )
