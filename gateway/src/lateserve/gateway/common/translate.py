"""Pure JSON <-> proto helpers shared by the route families: inputs, options, usage, tensors.

Shapes only: a scalar becomes a one-element list, a token-id list becomes TokenIds, and every
field goes as sent (unset stays unset). Every rule about what is allowed lives in the server; the
gateway only refuses what has no place in the contract: a name with no enum value and the vLLM
fields lateserve does not honour (UNHONOURED), so nothing a client sets is silently dropped.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
from pydantic import BaseModel

from lateserve.gateway.common.fp8 import FP8
from lateserve.gateway.common.protocol import (
    ChatMessage,
    ChatTemplateFields,
    CompletionOrChatFields,
    ContentPart,
    EncodingFields,
    ImageUrlPart,
    MultiModalInput,
    PoolingBasicFields,
    ScoreInput,
    ScoreInputs,
    TextPart,
)
from lateserve.gateway.errors import GatewayError
from lateserve.v1 import common_pb2
from lateserve.wire import enums, tensors

# vLLM request fields lateserve does not honour -> (the value that means "not used", the 400's message).
# Set to anything else they are refused naming the field, never dropped. `user` is not here: vLLM
# itself only accepts it (OpenAI's end-user id), so accepting it is honouring it.
UNHONOURED: dict[str, tuple[object, str]] = {
    "priority": (0, "Got priority {value} but Priority scheduling is not enabled."),
    "chat_template": (
        None,
        "Chat template is passed with request, but --trust-request-chat-template is not set. "
        "Refused request with untrusted chat template.",
    ),
    "media_io_kwargs": (None, "media_io_kwargs is not supported"),
    "cache_salt": (None, "cache_salt is not supported: lateserve has no prefix cache to salt"),
    "tools": (None, "tools is not supported: the chat template is rendered without tools"),
    "softmax": (None, "softmax is a removed name of use_activation; send use_activation instead"),
    "activation": (None, "activation is a removed name of use_activation; send use_activation instead"),
}


def refuse_unhonoured(body: BaseModel) -> None:
    """400 naming the first vLLM field of `body` that is set but that lateserve does not honour
    (an empty dict or list sets nothing)."""
    for name in type(body).model_fields:
        if name not in UNHONOURED:
            continue
        unused, message = UNHONOURED[name]
        value = getattr(body, name)
        if value is not None and value != unused and value not in ({}, []):  # empty: nothing to drop
            raise GatewayError(message.format(value=value), param=name)


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
    options = common_pb2.EncodeOptions(
        truncate_prompt_tokens=body.truncate_prompt_tokens,
        truncation_side=enums.value_of(enums.TRUNCATION_SIDES, body.truncation_side, "truncation_side"),
        add_special_tokens=add_special_tokens,
        embedding_mode=enums.value_of(enums.EMBEDDING_MODES, body.embedding_mode, "embedding_mode"),
    )
    if body.mm_processor_kwargs:
        options.mm_processor_kwargs.update(body.mm_processor_kwargs)
    return options


def chat_options_to_proto(body: ChatTemplateFields) -> common_pb2.ChatOptions | None:
    """ChatOptions with what the client set, or None when it set none of them (the server's defaults
    apply, and the server refuses chat options without messages)."""
    if body.add_generation_prompt is None and body.continue_final_message is None and body.chat_template_kwargs is None:
        return None
    options = common_pb2.ChatOptions(add_generation_prompt=body.add_generation_prompt)
    options.continue_final_message = bool(body.continue_final_message)
    if body.chat_template_kwargs is not None:
        options.chat_template_kwargs.SetInParent()
        options.chat_template_kwargs.update(body.chat_template_kwargs)
    return options


def completion_or_chat_to_proto(
    body: CompletionOrChatFields,
) -> tuple[list[common_pb2.Input], list[common_pb2.ChatMessage], common_pb2.ChatOptions | None]:
    """(inputs, messages, chat options) as sent: both forms at once go to the server, which answers
    400; add_special_tokens and its per-form default are the server's too (encode_options)."""
    inputs = completion_inputs_to_proto(body.input) if body.input is not None else []
    messages = chat_messages_to_proto(body.messages) if body.messages is not None else []
    return inputs, messages, chat_options_to_proto(body)


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
    """Where the time went, as response headers: `x-lateserve-{prepare,queue,inference,total}-ms` (the
    names of the server's gRPC trailing metadata), and the older nanosecond headers.

    >>> timing_headers(common_pb2.Timings(tokenize_ns=1_500_000, total_ns=2_000_000))["x-lateserve-prepare-ms"]
    '1.500'
    """
    return {
        "x-lateserve-prepare-ms": f"{timings.tokenize_ns / 1e6:.3f}",
        "x-lateserve-queue-ms": f"{timings.queue_ns / 1e6:.3f}",
        "x-lateserve-inference-ms": f"{timings.inference_ns / 1e6:.3f}",
        "x-lateserve-total-ms": f"{timings.total_ns / 1e6:.3f}",
        "x-tokenize-ns": str(timings.tokenize_ns),
        "x-queue-ns": str(timings.queue_ns),
        "x-inference-ns": str(timings.inference_ns),
    }


def _big_endian(endianness: str) -> bool:
    return endianness == "big" or (endianness == "native" and sys.byteorder == "big")


def tensor_bytes(tensor: common_pb2.Tensor, *, embed_dtype: str = "float32", endianness: str = "native") -> bytes:
    """The flattened tensor's bytes in `embed_dtype` and the requested byte order (as vLLM's
    tensor2binary; fp8 is one byte per element, so the order does not apply)."""
    fp8 = FP8.get(embed_dtype)
    if fp8 is not None:
        return fp8(tensors.from_tensor(tensor)).tobytes()
    wanted = enums.value_of(enums.DTYPES, embed_dtype, "embed_dtype")
    data = tensor.data
    if (tensor.dtype or common_pb2.DTYPE_FLOAT32) != wanted:
        data = tensors.encode_array(tensors.from_tensor(tensor), wanted)
    if _big_endian(endianness):
        size = tensors.ITEM_SIZE[wanted]
        data = np.frombuffer(data, dtype=f"<u{size}").byteswap().tobytes()
    return bytes(data)


def tensor_to_json(
    tensor: common_pb2.Tensor,
    *,
    encoding_format: str = "float",
    embed_dtype: str = "float32",
    endianness: str = "native",
) -> Any:
    """A Tensor as vLLM writes pooled data in JSON.

    "float": nested lists of Python floats (float32 values, any rank). "base64": base64 of the
    flattened tensor's bytes in `embed_dtype` and the requested byte order.
    """
    if encoding_format == "float":
        return tensors.from_tensor(tensor).tolist()
    return base64.b64encode(tensor_bytes(tensor, embed_dtype=embed_dtype, endianness=endianness)).decode("ascii")


BYTES_FORMATS = frozenset({"bytes", "bytes_only"})


def bytes_body(
    tensors_by_index: Sequence[tuple[int, common_pb2.Tensor]],
    body: EncodingFields,
    *,
    response_id: str,
    created: int,
    model: str,
    usage: common_pb2.Usage,
) -> tuple[bytes, dict[str, str]]:
    """vLLM's `bytes` / `bytes_only` answer: the items' bytes in a row, and (bytes only) a `metadata`
    header holding JSON {id, created, model, data: [{index, embed_dtype, endianness, start, end, shape}],
    usage: {prompt_tokens, total_tokens}}."""
    chunks: list[bytes] = []
    items: list[dict[str, Any]] = []
    offset = 0
    for index, tensor in tensors_by_index:
        data = tensor_bytes(tensor, embed_dtype=body.embed_dtype, endianness=body.endianness)
        chunks.append(data)
        items.append(
            {
                "index": index,
                "embed_dtype": body.embed_dtype,
                "endianness": body.endianness,
                "start": offset,
                "end": offset + len(data),
                "shape": [int(d) for d in tensor.shape],
            }
        )
        offset += len(data)
    headers: dict[str, str] = {}
    if body.encoding_format == "bytes":
        metadata = {
            "id": response_id,
            "created": created,
            "model": model,
            "data": items,
            "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.total_tokens},
        }
        headers["metadata"] = json.dumps(metadata, separators=(",", ":"))
    return b"".join(chunks), headers


def wire_dtype(encoding_format: str, embed_dtype: str) -> common_pb2.Dtype.ValueType:
    """The Tensor dtype to ask the server for: embed_dtype matters only for base64 and bytes (as vLLM);
    fp8 is made here from float32."""
    if encoding_format == "float" or embed_dtype in FP8:
        return common_pb2.DTYPE_FLOAT32
    return enums.value_of(enums.DTYPES, embed_dtype, "embed_dtype")


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
