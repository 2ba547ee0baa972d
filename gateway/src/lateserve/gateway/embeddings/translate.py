"""Pure JSON <-> proto for /v1/embeddings."""

from __future__ import annotations

from typing import Any

from lateserve.gateway.common import translate as common
from lateserve.gateway.embeddings.protocol import EmbeddingRequest
from lateserve.v1 import embed_service_pb2


def embed_request_to_proto(body: EmbeddingRequest, request_id: str) -> embed_service_pb2.EmbedRequest:
    """The JSON request as an EmbedRequest, every field as sent (the server applies the rules)."""
    common.refuse_unhonoured(body)
    inputs, messages, chat = common.completion_or_chat_to_proto(body)
    return embed_service_pb2.EmbedRequest(
        model=body.model or "",
        inputs=inputs,
        messages=messages,
        options=common.encode_options(body, add_special_tokens=body.add_special_tokens),
        dimensions=body.dimensions,
        normalize=body.normalize,
        use_activation=body.use_activation,
        dtype=common.wire_dtype(body.encoding_format, body.embed_dtype),
        request_id=request_id,
        chat=chat,
    )


def embed_response_to_json(
    response: embed_service_pb2.EmbedResponse, body: EmbeddingRequest, created: int
) -> dict[str, Any]:
    """vLLM's EmbeddingResponse."""
    data = [
        {
            "index": embedding.index,
            "object": "embedding",
            "embedding": common.tensor_to_json(
                embedding.data,
                encoding_format=body.encoding_format,
                embed_dtype=body.embed_dtype,
                endianness=body.endianness,
            ),
        }
        for embedding in response.embeddings
    ]
    return {
        "id": response.id,
        "object": "list",
        "created": created,
        "model": response.model,
        "data": data,
        "usage": common.usage_info(response.usage),
    }
