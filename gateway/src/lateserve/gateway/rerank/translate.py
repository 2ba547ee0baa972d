"""Pure JSON <-> proto for /rerank."""

from __future__ import annotations

from typing import Any

from lateserve.gateway.common import translate as common
from lateserve.gateway.common.protocol import ScoreInput, TextDocument
from lateserve.gateway.errors import GatewayError
from lateserve.gateway.rerank.protocol import RerankDocument, RerankRequest
from lateserve.v1 import rerank_service_pb2


def document_text(document: TextDocument, rank_fields: list[str] | None, index: int) -> str:
    """The text ranked for a Cohere v1 document object: its `text`, or with rank_fields (other than
    just "text") one `field: value` line per named field it has, in rank_fields' order."""
    if not rank_fields or rank_fields == ["text"]:
        return document.text
    fields = {"text": document.text, **(document.model_extra or {})}
    lines = [f"{name}: {fields[name]}" for name in rank_fields if name in fields and fields[name] is not None]
    if not lines:
        raise GatewayError(f"documents[{index}] has none of the rank_fields {rank_fields}", param=f"documents[{index}]")
    return "\n".join(lines)


def as_score_inputs(body: RerankRequest) -> list[ScoreInput]:
    """The documents as /score items: document objects become their text."""
    items = body.documents if isinstance(body.documents, list) else [body.documents]
    return [
        document_text(item, body.rank_fields, i) if isinstance(item, TextDocument) else item
        for i, item in enumerate(items)
    ]


def _document_json(item: RerankDocument) -> Any:
    if isinstance(item, TextDocument):
        return {"text": item.text, "multi_modal": None}
    return common.document_to_json(item)


def rerank_request_to_proto(body: RerankRequest, request_id: str) -> rerank_service_pb2.RerankRequest:
    """The JSON request as a RerankRequest (documents as a list even when one was sent bare)."""
    common.refuse_unhonoured(body)
    return rerank_service_pb2.RerankRequest(
        model=body.model or "",
        query=common.score_input_to_proto(body.query),
        documents=[common.score_input_to_proto(item) for item in as_score_inputs(body)],
        top_n=body.top_n,
        options=common.encode_options(body),
        request_id=request_id,
        score_mode=body.score_mode or "",
        use_activation=body.use_activation,
        max_tokens_per_doc=body.max_tokens_per_doc or None,
        max_tokens_per_query=body.max_tokens_per_query or None,
    )


def rerank_response_to_json(response: rerank_service_pb2.RerankResponse, body: RerankRequest) -> dict[str, Any]:
    """vLLM's RerankResponse (no `object`/`created`), echoing each document as it was sent."""
    documents = body.documents if isinstance(body.documents, list) else [body.documents]
    results = []
    for result in response.results:
        if 0 <= result.index < len(documents):
            document: Any = _document_json(documents[result.index])
        else:
            document = common.input_to_json(result.document)
        results.append({"index": result.index, "document": document, "relevance_score": result.relevance_score})
    return {
        "id": response.id,
        "model": response.model,
        "usage": common.rerank_usage(response.usage),
        "results": results,
    }
