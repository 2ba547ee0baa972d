"""Pure JSON <-> proto helpers shared by the route families: inputs, options, usage, tensors.

Shapes only: a scalar becomes a one-element list, a token-id list becomes TokenIds. Every rule
about what is allowed lives in the server.
"""

from __future__ import annotations

import base64
import sys
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np

from lateserve.gateway.common.protocol import (
    ChatMessage,
    CompletionOrChatFields,
    ContentPart,
    ImageUrlPart,
    MultiModalInput,
    PoolingBasicFields,
    ScoreInput,
    ScoreInputs,
    TextPart,
)
from lateserve.gateway.errors import GatewayError
from lateserve.v1 import common_pb2
from lateserve.wire import tensors

TRUNCATION_SIDES: dict[str | None, common_pb2.TruncationSide.ValueType] = {
    None: common_pb2.TRUNCATION_SIDE_UNSPECIFIED,
    "left": common_pb2.TRUNCATION_SIDE_LEFT,
    "right": common_pb2.TRUNCATION_SIDE_RIGHT,
}
EMBEDDING_MODES: dict[str | None, common_pb2.EmbeddingMode.ValueType] = {
    None: common_pb2.EMBEDDING_MODE_UNSPECIFIED,
    "raw": common_pb2.EMBEDDING_MODE_RAW,
    "query": common_pb2.EMBEDDING_MODE_QUERY,
    "document": common_pb2.EMBEDDING_MODE_DOCUMENT,
}
DTYPES: dict[str, common_pb2.Dtype.ValueType] = {
    "float32": common_pb2.DTYPE_FLOAT32,
    "float16": common_pb2.DTYPE_FLOAT16,
    "bfloat16": common_pb2.DTYPE_BFLOAT16,
}


def content_part_to_proto(part: ContentPart) -> common_pb2.ContentPart:
    """One OpenAI content part as a ContentPart."""
    if isinstance(part, TextPart):
        return common_pb2.ContentPart(text=part.text)
    if isinstance(part, ImageUrlPart):
        return common_pb2.ContentPart(image_url=common_pb2.ImageUrl(url=part.image_url.url))
    raise GatewayError(f"Unsupported content part: {part!r}")  # unreachable: the schema is a closed union


def score_input_to_proto(item: ScoreInput) -> common_pb2.Input:
    """A /score or /rerank item: a string -> Input.text, {"content": [...]} -> Input.content."""
    if isinstance(item, str):
        return common_pb2.Input(text=item)
    parts = [content_part_to_proto(part) for part in item.content]
    return common_pb2.Input(content=common_pb2.MultiModalContent(parts=parts))


def as_list(items: ScoreInputs) -> list[ScoreInput]:
    """vLLM wraps a scalar query/document into a one-element list."""
    return list(items) if isinstance(items, list) else [items]


def score_inputs_to_proto(items: ScoreInputs) -> list[common_pb2.Input]:
    """A scalar or list of score items as Inputs (a scalar becomes one Input)."""
    return [score_input_to_proto(item) for item in as_list(items)]


def completion_inputs_to_proto(
    value: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
) -> list[common_pb2.Input]:
    """vLLM's `input`: str | list[str] | list[int] (one tokenized input) | list[list[int]]."""
    if isinstance(value, str):
        return [common_pb2.Input(text=value)]
    if value and all(isinstance(item, int) for item in value):
        ids = cast("Sequence[int]", value)
        return [common_pb2.Input(token_ids=common_pb2.TokenIds(ids=ids))]
    inputs: list[common_pb2.Input] = []
    for item in value:
        if isinstance(item, str):
            inputs.append(common_pb2.Input(text=item))
        elif not isinstance(item, int):
            inputs.append(common_pb2.Input(token_ids=common_pb2.TokenIds(ids=item)))
    return inputs


def chat_messages_to_proto(messages: Sequence[ChatMessage]) -> list[common_pb2.ChatMessage]:
    """Chat messages; a string content becomes one text part, null content no parts."""
    out: list[common_pb2.ChatMessage] = []
    for message in messages:
        if message.content is None:
            parts: list[common_pb2.ContentPart] = []
        elif isinstance(message.content, str):
            parts = [common_pb2.ContentPart(text=message.content)]
        else:
            parts = [content_part_to_proto(part) for part in message.content]
        out.append(common_pb2.ChatMessage(role=message.role, content=parts))
    return out


def encode_options(body: PoolingBasicFields, *, add_special_tokens: bool | None = None) -> common_pb2.EncodeOptions:
    """The tokenization options every encoding RPC shares; unset JSON fields stay unset."""
    return common_pb2.EncodeOptions(
        truncate_prompt_tokens=body.truncate_prompt_tokens,
        truncation_side=TRUNCATION_SIDES[body.truncation_side],
        add_special_tokens=add_special_tokens,
        embedding_mode=EMBEDDING_MODES[body.embedding_mode],
    )


def completion_or_chat_to_proto(
    body: CompletionOrChatFields,
) -> tuple[list[common_pb2.Input], list[common_pb2.ChatMessage], bool | None]:
    """(inputs, messages, add_special_tokens) for a request in completion or chat form.

    vLLM's default for add_special_tokens differs by form (true for `input`, false for
    `messages`); the chat default is spelled out because the proto's unset means true.
    """
    if body.input is not None:
        return completion_inputs_to_proto(body.input), [], body.add_special_tokens
    messages = chat_messages_to_proto(body.messages or [])
    return [], messages, False if body.add_special_tokens is None else body.add_special_tokens


def rerank_usage(usage: common_pb2.Usage) -> dict[str, Any]:
    """/rerank's usage object: only prompt_tokens and total_tokens."""
    return {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.total_tokens}


def usage_info(usage: common_pb2.Usage) -> dict[str, Any]:
    """vLLM's UsageInfo, as /score, /pooling and /v1/embeddings write it."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "total_tokens": usage.total_tokens,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


def timing_headers(timings: common_pb2.Timings) -> dict[str, str]:
    """Where the time went, as response headers (nanoseconds)."""
    return {
        "x-tokenize-ns": str(timings.tokenize_ns),
        "x-queue-ns": str(timings.queue_ns),
        "x-inference-ns": str(timings.inference_ns),
    }


def _big_endian(endianness: str) -> bool:
    return endianness == "big" or (endianness == "native" and sys.byteorder == "big")


def tensor_to_json(
    tensor: common_pb2.Tensor,
    *,
    encoding_format: str = "float",
    embed_dtype: str = "float32",
    endianness: str = "native",
) -> Any:
    """A Tensor as vLLM writes pooled data.

    "float": nested lists of Python floats (float32 values, any rank). "base64": base64 of the
    flattened tensor's bytes in `embed_dtype` and the requested byte order.
    """
    if encoding_format == "float":
        return tensors.from_tensor(tensor).tolist()
    wanted = DTYPES[embed_dtype]
    data = tensor.data
    if (tensor.dtype or common_pb2.DTYPE_FLOAT32) != wanted:
        data = tensors.encode_array(tensors.from_tensor(tensor), wanted)
    if _big_endian(endianness):
        size = tensors.ITEM_SIZE[wanted]
        data = np.frombuffer(data, dtype=f"<u{size}").byteswap().tobytes()
    return base64.b64encode(data).decode("ascii")


def wire_dtype(encoding_format: str, embed_dtype: str) -> common_pb2.Dtype.ValueType:
    """The Tensor dtype to ask the server for: embed_dtype matters only for base64 (as vLLM)."""
    return DTYPES[embed_dtype] if encoding_format == "base64" else common_pb2.DTYPE_FLOAT32


def input_to_json(item: common_pb2.Input) -> Mapping[str, Any]:
    """An Input echoed back as a rerank document (used only when the request's item is unknown)."""
    kind = item.WhichOneof("kind")
    if kind == "text":
        return {"text": item.text, "multi_modal": None}
    if kind == "content":
        parts: list[dict[str, Any]] = []
        for part in item.content.parts:
            if part.WhichOneof("kind") == "text":
                parts.append({"type": "text", "text": part.text})
            else:
                parts.append({"type": "image_url", "image_url": {"url": part.image_url.url}})
        return {"text": None, "multi_modal": parts}
    return {"text": None, "multi_modal": None}


def document_to_json(item: ScoreInput) -> dict[str, Any]:
    """vLLM's RerankDocument: a string doc -> {"text", "multi_modal": null}; a dict doc -> its parts."""
    if isinstance(item, MultiModalInput):
        return {"text": None, "multi_modal": [part.model_dump(mode="json") for part in item.content]}
    return {"text": item, "multi_modal": None}
