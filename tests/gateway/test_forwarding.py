"""Every vLLM request field is either forwarded as sent or refused with 400 naming it (never dropped),
and the name -> enum tables are lateserve.wire.enums' alone. No server: the server-side rules are
shown live in tests/integration/test_gateway_rules.py."""

from __future__ import annotations

import typing
from typing import Any

import pytest
from google.protobuf import json_format

from lateserve.client import requests as client_requests
from lateserve.client import types as client_types
from lateserve.gateway.common import protocol
from lateserve.gateway.common import translate as common
from lateserve.gateway.common.fp8 import FP8
from lateserve.gateway.embeddings.protocol import EmbeddingRequest
from lateserve.gateway.embeddings.translate import embed_request_to_proto
from lateserve.gateway.errors import GatewayError
from lateserve.gateway.pooling.protocol import PoolingRequest
from lateserve.gateway.pooling.translate import pool_request_to_proto
from lateserve.gateway.rerank.protocol import RerankRequest
from lateserve.gateway.rerank.translate import rerank_request_to_proto
from lateserve.gateway.score.protocol import ScoreRequest
from lateserve.gateway.score.translate import score_request_to_proto
from lateserve.gateway.tokenize.protocol import TokenizeRequest
from lateserve.gateway.tokenize.translate import tokenize_request_to_proto
from lateserve.v1 import common_pb2
from lateserve.wire import enums

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def pool(payload: dict[str, Any]) -> Any:
    return pool_request_to_proto(PoolingRequest.model_validate(payload), "r")


def embed(payload: dict[str, Any]) -> Any:
    return embed_request_to_proto(EmbeddingRequest.model_validate(payload), "r")


def tokenize(payload: dict[str, Any]) -> Any:
    return tokenize_request_to_proto(TokenizeRequest.model_validate(payload))


def score(payload: dict[str, Any]) -> Any:
    return score_request_to_proto(ScoreRequest.model_validate({"text_1": "q", "text_2": ["d"], **payload}), "r")


def rerank(payload: dict[str, Any]) -> Any:
    return rerank_request_to_proto(RerankRequest.model_validate({"query": "q", "documents": ["d"], **payload}), "r")


# ---------------------------------------------------------------- forwarded as sent


@pytest.mark.parametrize("translate", [pool, embed])
@pytest.mark.parametrize("value", [None, True, False])
def test_add_special_tokens_only_when_set_in_either_form(translate: Any, value: bool | None) -> None:
    extra = {} if value is None else {"add_special_tokens": value}
    for form in ({"input": "x"}, CHAT):
        options = translate({**form, **extra}).options
        assert options.HasField("add_special_tokens") is (value is not None)
        if value is not None:
            assert options.add_special_tokens is value


@pytest.mark.parametrize("translate", [pool, embed, tokenize])
def test_chat_options_sent_only_when_set(translate: Any) -> None:
    assert not translate(CHAT).HasField("chat")
    message = translate(
        {
            **CHAT,
            "add_generation_prompt": True,
            "continue_final_message": False,
            "chat_template_kwargs": {"enable_thinking": False, "name": "x", "n": 2, "tags": ["a"], "none": None},
        }
    )
    assert message.HasField("chat")
    assert message.chat.HasField("add_generation_prompt") and message.chat.add_generation_prompt is True
    assert message.chat.continue_final_message is False
    kwargs = json_format.MessageToDict(message.chat.chat_template_kwargs)
    assert kwargs == {"enable_thinking": False, "name": "x", "n": 2.0, "tags": ["a"], "none": None}


@pytest.mark.parametrize("translate", [pool, embed, tokenize])
@pytest.mark.parametrize(
    ("field", "value"),
    [("add_generation_prompt", False), ("continue_final_message", False), ("chat_template_kwargs", {})],
)
def test_any_one_chat_option_is_sent(translate: Any, field: str, value: Any) -> None:
    message = translate({**CHAT, field: value})
    assert message.HasField("chat")
    if field == "add_generation_prompt":
        assert message.chat.HasField("add_generation_prompt")
    else:
        assert not message.chat.HasField("add_generation_prompt")  # the route's default stays the server's
    assert message.chat.HasField("chat_template_kwargs") is (field == "chat_template_kwargs")


@pytest.mark.parametrize("translate", [pool, embed])
def test_chat_options_in_the_completion_form_go_to_the_server(translate: Any) -> None:
    # The server refuses chat options without messages (400); the gateway does not drop them.
    message = translate({"input": "x", "continue_final_message": True})
    assert message.chat.continue_final_message is True and not message.messages


def test_tokenize_prompt_form_sends_chat_options_too() -> None:
    message = tokenize({"prompt": "x", "add_generation_prompt": True})
    assert message.prompt == "x" and not message.messages
    assert message.chat.add_generation_prompt is True
    assert not message.HasField("add_generation_prompt")  # the deprecated field is no longer used


@pytest.mark.parametrize("translate", [pool, embed])
def test_normalize_and_use_activation_both_forwarded(translate: Any) -> None:
    message = translate({"input": "x", "normalize": True, "use_activation": False})
    assert message.HasField("normalize") and message.normalize is True
    assert message.HasField("use_activation") and message.use_activation is False


@pytest.mark.parametrize("translate", [score, rerank])
def test_score_and_rerank_forward_use_activation(translate: Any) -> None:
    assert not translate({}).HasField("use_activation")
    message = translate({"use_activation": False})
    assert message.HasField("use_activation") and message.use_activation is False


@pytest.mark.parametrize(
    ("translate", "base"), [(pool, {"input": "x"}), (embed, {"input": "x"}), (score, {}), (rerank, {})]
)
def test_mm_processor_kwargs_are_forwarded_in_the_encode_options(translate: Any, base: dict[str, Any]) -> None:
    message = translate({**base, "mm_processor_kwargs": {"max_pixels": 1310720, "min_pixels": 4096}})
    assert json_format.MessageToDict(message.options.mm_processor_kwargs) == {"max_pixels": 1310720, "min_pixels": 4096}


# ---------------------------------------------------------------- refused, naming the field


REFUSED: list[tuple[Any, str, Any]] = [
    *[(t, "priority", 1) for t in (pool, embed, score, rerank)],
    *[(t, "chat_template", "{{ messages }}") for t in (pool, embed, tokenize)],
    (tokenize, "mm_processor_kwargs", {"max_pixels": 1}),  # the encoding routes forward it (below)
    *[(t, "cache_salt", "tenant-1") for t in (pool, embed, score, rerank)],
    (pool, "media_io_kwargs", {"image": {"mode": "L"}}),
    (embed, "media_io_kwargs", {"image": {"mode": "L"}}),
    (tokenize, "tools", [{"type": "function"}]),
    *[(t, "softmax", False) for t in (pool, score, rerank)],
    *[(t, "activation", True) for t in (pool, score, rerank)],
]


def form(translate: Any) -> dict[str, Any]:
    return {"prompt": "x"} if translate is tokenize else {} if translate in (score, rerank) else {"input": "x"}


@pytest.mark.parametrize(("translate", "field", "value"), REFUSED)
def test_unhonoured_vllm_fields_are_refused_naming_them(translate: Any, field: str, value: Any) -> None:
    with pytest.raises(GatewayError) as info:
        translate({**form(translate), field: value})
    error = info.value.api_error
    assert (error.status, error.type, error.param) == (400, "BadRequestError", field)


@pytest.mark.parametrize(("translate", "field", "value"), REFUSED)
def test_unhonoured_fields_at_their_unused_value_are_accepted(translate: Any, field: str, value: Any) -> None:
    unused = {"priority": 0}.get(field)
    translate({**form(translate), field: unused})
    if isinstance(value, dict | list):
        translate({**form(translate), field: type(value)()})  # empty: nothing to drop


def test_vllm_wording_for_chat_template_and_priority() -> None:
    with pytest.raises(GatewayError) as info:
        pool({**CHAT, "chat_template": "x"})
    assert info.value.api_error.message.startswith("Chat template is passed with request, but")
    with pytest.raises(GatewayError) as info:
        score({"priority": -3})
    assert info.value.api_error.message == "Got priority -3 but Priority scheduling is not enabled."


@pytest.mark.parametrize("translate", [pool, embed, score, rerank])
def test_user_and_foreign_fields_are_accepted(translate: Any) -> None:
    # `user` does nothing in vLLM either; unknown fields are vLLM's extra="allow".
    translate({**form(translate), "user": "u", "return_documents": False})


def test_every_declared_refused_field_is_in_the_table() -> None:
    declared = set()
    for schema in (PoolingRequest, EmbeddingRequest, ScoreRequest, RerankRequest, TokenizeRequest):
        for name, info in schema.model_fields.items():
            if info.description and info.description.startswith("Refused"):
                declared.add(name)
            if "refused" in (info.description or "").lower():
                assert name in common.UNHONOURED, name
    assert declared <= set(common.UNHONOURED)


# ---------------------------------------------------------------- one table per enum


def literal_names(annotation: Any) -> set[str]:
    return {a for a in typing.get_args(annotation) if isinstance(a, str)} | {
        name for arg in typing.get_args(annotation) for name in literal_names(arg)
    }


def test_gateway_literals_are_the_wire_tables() -> None:
    fields = protocol.PoolingBasicFields.model_fields
    assert literal_names(fields["truncation_side"].annotation) == set(enums.TRUNCATION_SIDES)
    assert literal_names(fields["embedding_mode"].annotation) == set(enums.EMBEDDING_MODES)
    # fp8 is made by the gateway from float32 (common.fp8), so it has no wire dtype.
    assert literal_names(protocol.EncodingFields.model_fields["embed_dtype"].annotation) == set(enums.DTYPES) | set(FP8)


def test_client_names_are_the_wire_tables() -> None:
    assert set(typing.get_args(client_types.Task)) == set(enums.POOLING_TASKS)
    assert set(typing.get_args(client_types.WireDtype)) == set(enums.DTYPES)
    assert set(typing.get_args(client_types.EmbeddingModeName)) == set(enums.EMBEDDING_MODES)
    assert set(typing.get_args(client_types.TruncationSideName)) == set(enums.TRUNCATION_SIDES)
    assert client_requests.TASKS is enums.POOLING_TASKS
    assert client_requests.DTYPES is enums.DTYPES


def test_every_named_task_has_a_proto_value_and_back() -> None:
    names = {common_pb2.PoolingTask.Name(v).removeprefix("POOLING_TASK_").lower() for v in enums.POOLING_TASKS.values()}
    assert names == set(enums.POOLING_TASKS)
    assert len(enums.POOLING_TASKS) == len(common_pb2.PoolingTask.values()) - 1  # all but UNSPECIFIED


def test_unknown_task_message_lists_the_table() -> None:
    with pytest.raises(GatewayError) as info:
        pool({"input": "x", "task": "plugin"})
    assert info.value.api_error.message == f"Unsupported task: 'plugin' Known tasks: {list(enums.POOLING_TASKS)}"
    with pytest.raises(ValueError, match="unknown task 'plugin'"):
        client_requests.pool_request("x", task="plugin")  # type: ignore[arg-type]


@pytest.mark.parametrize("translate", [score, rerank])
def test_max_tokens_per_query_and_doc_are_forwarded(translate: Any) -> None:
    # Both are honoured behind the contract (issue 11): sent as the proto's optional fields, 0 as unset.
    message = translate({**form(translate), "max_tokens_per_query": 8, "max_tokens_per_doc": 5})
    assert (message.max_tokens_per_query, message.max_tokens_per_doc) == (8, 5)
    plain = translate(form(translate))
    assert not plain.HasField("max_tokens_per_query") and not plain.HasField("max_tokens_per_doc")
    negative = translate({**form(translate), "max_tokens_per_query": -1})  # the server's rule, not the gateway's
    assert negative.max_tokens_per_query == -1
