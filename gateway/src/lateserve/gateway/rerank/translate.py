"""Pure JSON <-> proto for /rerank."""

from __future__ import annotations

from typing import Any

from lateserve.gateway.common import translate as common
from lateserve.gateway.rerank.protocol import RerankRequest
from lateserve.v1 import rerank_service_pb2


def rerank_request_to_proto(body: RerankRequest, request_id: str) -> rerank_service_pb2.RerankRequest:
    """The JSON request as a RerankRequest (documents as a list even when one was sent bare)."""
    common.refuse_unhonoured(body)
    return rerank_service_pb2.RerankRequest(
        model=body.model or "",
        query=common.score_input_to_proto(body.query),
        documents=common.score_inputs_to_proto(body.documents),
        top_n=body.top_n,
        options=common.encode_options(body),
        request_id=request_id,
        score_mode=body.score_mode or "",
        use_activation=body.use_activation,
    )


def rerank_response_to_json(response: rerank_service_pb2.RerankResponse, body: RerankRequest) -> dict[str, Any]:
    """vLLM's RerankResponse (no `object`/`created`), echoing each document as it was sent."""
    documents = common.as_list(body.documents)
    results = []
    for result in response.results:
        if 0 <= result.index < len(documents):
            document: Any = common.document_to_json(documents[result.index])
        else:
            document = common.input_to_json(result.document)
        results.append({"index": result.index, "document": document, "relevance_score": result.relevance_score})
    return {
        "id": response.id,
        "model": response.model,
        "usage": common.rerank_usage(response.usage),
        "results": results,
    }
