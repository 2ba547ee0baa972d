"""Pure JSON <-> proto for /tokenize and /detokenize."""

from __future__ import annotations

from typing import Any

from lateserve.gateway.common import translate as common
from lateserve.gateway.errors import GatewayError
from lateserve.gateway.tokenize.protocol import DetokenizeRequest, TokenizeRequest
from lateserve.v1 import tokenize_service_pb2


def tokenize_request_to_proto(body: TokenizeRequest) -> tokenize_service_pb2.TokenizeRequest:
    """The JSON request as a TokenizeRequest; messages are sent only in the chat form (`prompt` wins,
    as vLLM's request union). Chat options go as sent: the server refuses them without messages."""
    common.refuse_unhonoured(body)
    if body.mm_processor_kwargs:  # TokenizeRequest has no place for it: refused, not dropped
        raise GatewayError("mm_processor_kwargs is not supported on /tokenize", param="mm_processor_kwargs")
    chat = body.prompt is None
    return tokenize_service_pb2.TokenizeRequest(
        model=body.model or "",
        prompt=body.prompt or "",
        messages=common.chat_messages_to_proto(body.messages or []) if chat else [],
        add_special_tokens=body.add_special_tokens,
        return_token_strs=bool(body.return_token_strs),
        chat=common.chat_options_to_proto(body),
    )


def tokenize_response_to_json(response: tokenize_service_pb2.TokenizeResponse, body: TokenizeRequest) -> dict[str, Any]:
    """vLLM's TokenizeResponse; token_strs is null unless asked for."""
    return {
        "count": response.count,
        "max_model_len": response.max_model_len,
        "tokens": list(response.tokens),
        "token_strs": list(response.token_strs) if body.return_token_strs else None,
    }


def detokenize_request_to_proto(body: DetokenizeRequest) -> tokenize_service_pb2.DetokenizeRequest:
    """The JSON request as a DetokenizeRequest."""
    return tokenize_service_pb2.DetokenizeRequest(model=body.model or "", tokens=body.tokens)


def detokenize_response_to_json(response: tokenize_service_pb2.DetokenizeResponse) -> dict[str, Any]:
    """vLLM's DetokenizeResponse."""
    return {"prompt": response.prompt}
