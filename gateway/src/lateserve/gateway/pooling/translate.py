"""Pure JSON <-> proto for /pooling."""

from __future__ import annotations

from typing import Any

from lateserve.gateway.common import translate as common
from lateserve.gateway.errors import GatewayError
from lateserve.gateway.pooling.protocol import PoolingRequest
from lateserve.v1 import common_pb2, pool_service_pb2

POOLING_TASKS: dict[str, common_pb2.PoolingTask.ValueType] = {
    "token_embed": common_pb2.POOLING_TASK_TOKEN_EMBED,
    "token_classify": common_pb2.POOLING_TASK_TOKEN_CLASSIFY,
    "embed": common_pb2.POOLING_TASK_EMBED,
    "classify": common_pb2.POOLING_TASK_CLASSIFY,
}


def pooling_task_to_proto(task: str | None) -> common_pb2.PoolingTask.ValueType:
    """The task name as a PoolingTask; a name with no proto value is a 400 on `task`.

    Whether the model supports a known task is the server's call (UNSUPPORTED_TASK).
    """
    if task is None:
        return common_pb2.POOLING_TASK_UNSPECIFIED
    try:
        return POOLING_TASKS[task]
    except KeyError:
        raise GatewayError(f"Unsupported task: {task!r} Known tasks: {list(POOLING_TASKS)}", param="task") from None


def pool_request_to_proto(body: PoolingRequest, request_id: str) -> pool_service_pb2.PoolRequest:
    """The JSON request as a PoolRequest."""
    if body.dimensions is not None:
        # The proto has no dimensions on Pool, as vLLM's /pooling rejects it.
        raise GatewayError("dimensions is currently not supported", param="dimensions")
    inputs, messages, add_special_tokens = common.completion_or_chat_to_proto(body)
    return pool_service_pb2.PoolRequest(
        model=body.model or "",
        inputs=inputs,
        messages=messages,
        task=pooling_task_to_proto(body.task),
        options=common.encode_options(body, add_special_tokens=add_special_tokens),
        dtype=common.wire_dtype(body.encoding_format, body.embed_dtype),
        normalize=body.normalize if body.normalize is not None else body.use_activation,
        request_id=request_id,
        return_lexical_weights=body.return_lexical_weights,
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
