"""RerankService: scores documents against one query, sorts best first, applies top_n."""

from __future__ import annotations

from typing import Any

import grpc

from lateserve.server.domain import InvalidArgument, LateserveError
from lateserve.server.engine.pairs import score_pairs
from lateserve.server.rpc import rpc_method
from lateserve.server.services.convert import (
    ServedModel,
    item_from_proto,
    items_from_proto,
    options_from_proto,
    request_id,
    timings,
    usage,
)
from lateserve.v1 import rerank_service_pb2 as pb
from lateserve.v1 import rerank_service_pb2_grpc as pb_grpc


def ranked(scores: list[float], top_n: int | None) -> list[int]:
    """Indices by score, descending and stable; cut only when 0 < top_n < len (vLLM's rule).

    >>> ranked([0.1, 0.9, 0.9, 0.5], None), ranked([0.1, 0.9, 0.5], 2), ranked([0.1, 0.9], 0)
    ([1, 2, 3, 0], [1, 2], [1, 0])
    """
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    if top_n is not None and 0 < top_n < len(scores):
        order = order[:top_n]
    return order


_QUERIES0 = "queries[0]"


def query_path(exc: LateserveError) -> None:
    """The scoring engine sees the one query as `queries[0]`; RerankRequest calls it `query`.

    >>> e = LateserveError("x", field="queries[0].content[1]", metadata={"item": "queries[0]"})
    >>> query_path(e); e.field, e.metadata["item"]
    ('query.content[1]', 'query')
    """
    if exc.field and exc.field.startswith(_QUERIES0):
        exc.field = "query" + exc.field[len(_QUERIES0) :]
    item = exc.metadata.get("item")
    if item and item.startswith(_QUERIES0):
        exc.metadata["item"] = "query" + item[len(_QUERIES0) :]


class RerankServicer(pb_grpc.RerankServiceServicer):
    def __init__(self, model: ServedModel) -> None:
        self.model = model

    @rpc_method
    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.RerankResponse:
        self.model.check(request.model)
        if not request.HasField("query"):
            raise InvalidArgument("query is required", field="query")
        try:
            result = await score_pairs(
                self.model.engine,
                [item_from_proto(request.query, "query")],
                items_from_proto(request.documents, "documents"),
                options_from_proto(request.options),
                request.score_mode,
                use_activation=request.use_activation if request.HasField("use_activation") else True,
                max_tokens_per_doc=request.max_tokens_per_doc,
                max_tokens_per_query=request.max_tokens_per_query,
            )
        except LateserveError as exc:
            query_path(exc)
            raise
        top_n = request.top_n if request.HasField("top_n") else None
        return pb.RerankResponse(
            id=f"score-{request_id(request.request_id)}",
            model=self.model.name,
            results=[
                pb.RerankResult(index=i, document=request.documents[i], relevance_score=result.scores[i])
                for i in ranked(result.scores, top_n)
            ],
            usage=usage(result.prompt_tokens),
            timings=timings(result.timings),
        )
