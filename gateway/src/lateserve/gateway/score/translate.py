"""Pure JSON <-> proto for /score."""

from __future__ import annotations

from typing import Any

from lateserve.gateway.common import translate as common
from lateserve.gateway.score.protocol import ScoreRequest
from lateserve.v1 import score_service_pb2
from lateserve.wire.tensors import from_tensor


def score_request_to_proto(body: ScoreRequest, request_id: str) -> score_service_pb2.ScoreRequest:
    """Any of the four spellings as ScoreRequest.queries/documents (scalars become one item)."""
    common.refuse_unhonoured(body)
    queries, documents = body.pair()
    return score_service_pb2.ScoreRequest(
        model=body.model or "",
        queries=common.score_inputs_to_proto(queries),
        documents=common.score_inputs_to_proto(documents),
        options=common.encode_options(body),
        request_id=request_id,
        score_mode=body.score_mode or "",
        use_activation=body.use_activation,
        return_similarity_maps=bool(body.return_similarity_maps),
        max_tokens_per_doc=body.max_tokens_per_doc or None,
        max_tokens_per_query=body.max_tokens_per_query or None,
    )


def score_response_to_json(response: score_service_pb2.ScoreResponse, created: int) -> dict[str, Any]:
    """vLLM's ScoreResponse: results in pair order."""
    return {
        "id": response.id,
        "object": "list",
        "created": created,
        "model": response.model,
        "data": [_result(r) for r in response.results],
        "usage": common.usage_info(response.usage),
    }


def _result(result: score_service_pb2.ScoreResult) -> dict[str, Any]:
    """vLLM's score entry; `similarity_maps` only when asked for (lateserve extension)."""
    entry: dict[str, Any] = {"index": result.index, "object": "score", "score": result.score}
    if result.similarity_maps:
        entry["similarity_maps"] = [
            {
                "image_index": m.image_index,
                "height": m.height,
                "width": m.width,
                "query_tokens": list(m.query_tokens),
                "data": from_tensor(m.data).tolist(),
            }
            for m in result.similarity_maps
        ]
    return entry
