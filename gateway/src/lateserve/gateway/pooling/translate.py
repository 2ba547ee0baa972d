"""Pure JSON <-> proto for /pooling."""

from __future__ import annotations

from typing import Any

from lateserve.gateway.common import translate as common
from lateserve.gateway.errors import GatewayError
from lateserve.gateway.pooling.protocol import PoolingRequest
from lateserve.v1 import common_pb2, pool_service_pb2
from lateserve.wire import enums


def pooling_task_to_proto(task: str | None) -> common_pb2.PoolingTask.ValueType:
    """The task name as a PoolingTask; a name with no proto value cannot be sent: 400 on `task`,
    in vLLM's wording. Whether the model supports a known task is the server's call (UNSUPPORTED_TASK).
    """
    try:
        return enums.value_of(enums.POOLING_TASKS, task, "task")
    except enums.UnknownName as unknown:
        raise GatewayError(f"Unsupported task: {task!r} Known tasks: {unknown.known}", param="task") from None


def with_input_type(body: PoolingRequest) -> PoolingRequest:
    """`input_type` (vLLM's name) folded into `embedding_mode` (lateserve's): the same switch, so one of
    them, or both with the same value; both and different is a 400 naming input_type."""
    if body.input_type is None:
        return body
    if body.embedding_mode is not None and body.embedding_mode != body.input_type:
        raise GatewayError(
            f"input_type {body.input_type!r} contradicts embedding_mode {body.embedding_mode!r}; "
            "input_type is an alias of embedding_mode: send one of them, or both with the same value",
            param="input_type",
        )
    return body.model_copy(update={"embedding_mode": body.input_type})


def pool_request_to_proto(body: PoolingRequest, request_id: str) -> pool_service_pb2.PoolRequest:
    """The JSON request as a PoolRequest, every field as sent (the server applies the rules)."""
    common.refuse_unhonoured(body)
    if body.return_lexical_weights and body.encoding_format in common.BYTES_FORMATS:
        raise GatewayError(
            f"return_lexical_weights needs a JSON answer; encoding_format {body.encoding_format!r} has no place "
            "for the weights (use float or base64)",
            param="encoding_format",
        )
    body = with_input_type(body)
    inputs, messages, chat = common.completion_or_chat_to_proto(body)
    return pool_service_pb2.PoolRequest(
        model=body.model or "",
        inputs=inputs,
        messages=messages,
        task=pooling_task_to_proto(body.task),
        options=common.encode_options(body, add_special_tokens=body.add_special_tokens),
        dtype=common.wire_dtype(body.encoding_format, body.embed_dtype),
        normalize=body.normalize,
        use_activation=body.use_activation,
        dimensions=body.dimensions,
        request_id=request_id,
        return_lexical_weights=body.return_lexical_weights,
        chat=chat,
        pool_factor=body.pool_factor,
        mask_non_image_embeddings=body.mask_non_image_embeddings,
    )


def lexical_weights_to_json(weights: Any) -> list[dict[str, Any]]:
    """FlagEmbedding-style lexical weights as a list of {token_id, token, weight}."""
    return [{"token_id": w.token_id, "token": w.token, "weight": w.weight} for w in weights]


def pool_response_to_json(
    response: pool_service_pb2.PoolResponse, body: PoolingRequest, created: int
) -> dict[str, Any]:
    """vLLM's PoolingResponse; `lexical_weights` is added per item only when asked for."""
    data = []
    for output in response.outputs:
        item: dict[str, Any] = {
            "index": output.index,
            "object": "pooling",
            "data": common.tensor_to_json(
                output.data,
                encoding_format=body.encoding_format,
                embed_dtype=body.embed_dtype,
                endianness=body.endianness,
            ),
        }
        if body.return_lexical_weights:
            item["lexical_weights"] = lexical_weights_to_json(output.lexical_weights)
        data.append(item)
    return {
        "id": response.id,
        "object": "list",
        "created": created,
        "model": response.model,
        "data": data,
        "usage": common.usage_info(response.usage),
    }
