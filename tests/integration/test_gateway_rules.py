"""Rules that moved from the gateway behind the gRPC contract, shown on a live server (the tiny
HF_ColBERT checkpoint with a chat template) over HTTP and gRPC: what a client sees is what it saw
when the gateway applied them (or the 400 that replaces a silently dropped field)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2
from grpc_status import rpc_status

from lateserve.server.config import ServerConfig
from lateserve.v1 import common_pb2 as c
from lateserve.v1 import (
    pool_service_pb2,
    pool_service_pb2_grpc,
    score_service_pb2,
    score_service_pb2_grpc,
    tokenize_service_pb2,
    tokenize_service_pb2_grpc,
)
from lateserve.wire.status import unpack_details
from lateserve.wire.tensors import from_tensor
from tests.live import LiveServer

MODEL = "answerdotai/answerai-colbert-small-v1"
# Renders each message as "role: text" on its own line; `suffix` comes from chat_template_kwargs.
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% for p in m['content'] %}{{ p['text'] }}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}{% if suffix is defined %} {{ suffix }}{% endif %}"
)
MESSAGES = [{"role": "user", "content": "What is machine learning?"}]
GRPC_MESSAGES = [c.ChatMessage(role="user", content=[c.ContentPart(text="What is machine learning?")])]


@pytest.fixture(scope="module")
def server(colbert_dir: Path) -> Iterator[LiveServer]:
    """The conftest's tiny HF_ColBERT checkpoint, as colbert_server, plus a chat template."""
    config = ServerConfig(
        model=str(colbert_dir),
        served_model_name=MODEL,
        workers=1,
        threads_per_worker=1,
        max_model_len=64,
        chat_template=TEMPLATE,
    )
    with LiveServer(config) as live:
        yield live


@pytest.fixture(scope="module")
def channel(server: LiveServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield ch


def post(server: LiveServer, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(
        server.http_url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def ok(server: LiveServer, path: str, body: dict[str, Any]) -> Any:
    status, data = post(server, path, body)
    assert status == 200, data
    return data


def bad_request(server: LiveServer, path: str, body: dict[str, Any], param: str) -> str:
    """The 400 envelope naming `param`; returns its message."""
    status, data = post(server, path, body)
    assert status == 400, data
    error = data["error"]
    assert (error["type"], error["param"], error["code"]) == ("BadRequestError", param, 400), error
    message: str = error["message"]
    return message


def grpc_invalid(fn: Any, request: Any) -> tuple[str | None, str]:
    """(field, message) of the INVALID_ARGUMENT a call raises."""
    with pytest.raises(grpc.RpcError) as info:
        fn(request)
    call = info.value
    details = unpack_details(call.code(), call.details() or "", rpc_status.from_call(call))  # type: ignore[arg-type]
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    return details.field, details.message


def tokens(server: LiveServer, body: dict[str, Any]) -> int:
    """Prompt tokens /pooling used for `body` (token_embed: one row per token)."""
    data = ok(server, "/pooling", {"task": "token_embed", **body})
    rows = len(data["data"][0]["data"])
    assert rows == data["usage"]["prompt_tokens"]
    return rows


def extra_tokens(server: LiveServer) -> int:
    """Tokens of the suffix the template appends from chat_template_kwargs."""
    count: int = ok(server, "/tokenize", {"prompt": "extra words", "add_special_tokens": False})["count"]
    return count


def pool_stub(channel: grpc.Channel) -> pool_service_pb2_grpc.PoolServiceStub:
    return pool_service_pb2_grpc.PoolServiceStub(channel)


# ---------------------------------------------------------------- 1. add_special_tokens defaults


def test_chat_form_adds_no_special_tokens_by_default(server: LiveServer, channel: grpc.Channel) -> None:
    # Before: the gateway spelled out add_special_tokens=false for messages. Now the server's default.
    rendered = ok(server, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False})
    default = tokens(server, {"messages": MESSAGES})
    assert default == rendered["count"]  # /tokenize's chat default is also without specials
    assert tokens(server, {"messages": MESSAGES, "add_special_tokens": False}) == default
    assert tokens(server, {"messages": MESSAGES, "add_special_tokens": True}) == default + 2  # [CLS] ... [SEP]
    over_grpc = pool_stub(channel).Pool(pool_service_pb2.PoolRequest(messages=GRPC_MESSAGES))
    assert over_grpc.usage.prompt_tokens == default


def test_completion_form_adds_special_tokens_by_default(server: LiveServer, channel: grpc.Channel) -> None:
    default = tokens(server, {"input": "What is machine learning?"})
    assert tokens(server, {"input": "What is machine learning?", "add_special_tokens": True}) == default
    assert tokens(server, {"input": "What is machine learning?", "add_special_tokens": False}) == default - 2
    request = pool_service_pb2.PoolRequest(inputs=[c.Input(text="What is machine learning?")])
    assert pool_stub(channel).Pool(request).usage.prompt_tokens == default


# ---------------------------------------------------------------- 2. input vs messages


def test_input_and_messages_together_is_400(server: LiveServer, channel: grpc.Channel) -> None:
    # Before: the gateway let `input` win. Now the server refuses both forms at once, on every route.
    body = {"input": "x", "messages": MESSAGES}
    message = bad_request(server, "/pooling", body, "messages")
    assert message == "set either input or messages, not both"
    both = pool_service_pb2.PoolRequest(inputs=[c.Input(text="x")], messages=GRPC_MESSAGES)
    assert grpc_invalid(pool_stub(channel).Pool, both) == ("messages", message)


# ---------------------------------------------------------------- 3. dimensions on /pooling


def test_pooling_dimensions_refused_by_the_server(server: LiveServer, channel: grpc.Channel) -> None:
    message = bad_request(server, "/pooling", {"input": "x", "dimensions": 8}, "dimensions")
    assert message == "dimensions is currently not supported"  # vLLM's words, as the gateway answered
    stub = pool_stub(channel)
    assert grpc_invalid(stub.Pool, pool_service_pb2.PoolRequest(inputs=[c.Input(text="x")], dimensions=8)) == (
        "dimensions",
        message,
    )
    stream = pool_service_pb2.StreamPoolRequest(inputs=[c.Input(text="x")], dimensions=8)
    assert grpc_invalid(lambda r: list(stub.StreamPool(r)), stream) == ("dimensions", message)


# ---------------------------------------------------------------- 4. normalize / use_activation


def norms(data: Any) -> Any:
    return np.linalg.norm(np.asarray(data["data"][0]["data"], dtype=np.float32), axis=-1)


def test_use_activation_is_normalize(server: LiveServer, channel: grpc.Channel) -> None:
    body = {"input": "What is machine learning?", "task": "token_embed"}
    unit = norms(ok(server, "/pooling", body))
    np.testing.assert_allclose(unit, 1.0, atol=1e-5)
    raw = ok(server, "/pooling", {**body, "normalize": False})
    assert not np.allclose(norms(raw), 1.0, atol=1e-3)
    for same in ({"use_activation": False}, {"normalize": False, "use_activation": False}):
        assert ok(server, "/pooling", {**body, **same})["data"] == raw["data"]
    np.testing.assert_allclose(norms(ok(server, "/pooling", {**body, "use_activation": True})), 1.0, atol=1e-5)
    request = pool_service_pb2.PoolRequest(inputs=[c.Input(text=body["input"])], use_activation=False)
    over_grpc = from_tensor(pool_stub(channel).Pool(request).outputs[0].data)
    np.testing.assert_array_equal(over_grpc, np.asarray(raw["data"][0]["data"], dtype=np.float32))


def test_normalize_and_use_activation_disagreeing_is_400(server: LiveServer, channel: grpc.Channel) -> None:
    # Before: the gateway silently kept `normalize`. Now the server refuses the contradiction.
    message = bad_request(
        server, "/pooling", {"input": "x", "normalize": False, "use_activation": True}, "use_activation"
    )
    assert "use_activation" in message and "normalize" in message
    request = pool_service_pb2.PoolRequest(inputs=[c.Input(text="x")], normalize=True, use_activation=False)
    field, _ = grpc_invalid(pool_stub(channel).Pool, request)
    assert field == "use_activation"


def test_score_use_activation_reaches_the_server(server: LiveServer, channel: grpc.Channel) -> None:
    # Late interaction ignores it (vLLM: cross-encoders only), so the numbers stay; it was dropped before.
    body = {"text_1": "What is machine learning?", "text_2": ["Machine learning is AI.", "The sky is blue."]}
    plain = ok(server, "/score", body)["data"]
    assert ok(server, "/score", {**body, "use_activation": False})["data"] == plain
    request = score_service_pb2.ScoreRequest(
        queries=[c.Input(text=body["text_1"])],
        documents=[c.Input(text=t) for t in body["text_2"]],
        use_activation=False,
    )
    answer = score_service_pb2_grpc.ScoreServiceStub(channel).Score(request)
    assert [r.score for r in answer.results] == [d["score"] for d in plain]


# ---------------------------------------------------------------- 5. chat fields, refused fields


def test_chat_options_reach_the_template(server: LiveServer, channel: grpc.Channel) -> None:
    default = tokens(server, {"messages": MESSAGES})
    generation = tokens(server, {"messages": MESSAGES, "add_generation_prompt": True})
    assert generation > default  # "assistant:" rendered: dropped before
    suffix = tokens(server, {"messages": MESSAGES, "chat_template_kwargs": {"suffix": "extra words"}})
    assert suffix == default + extra_tokens(server)
    kwargs = struct_pb2.Struct()
    kwargs.update({"suffix": "extra words"})
    request = pool_service_pb2.PoolRequest(
        messages=GRPC_MESSAGES, chat=c.ChatOptions(add_generation_prompt=False, chat_template_kwargs=kwargs)
    )
    assert pool_stub(channel).Pool(request).usage.prompt_tokens == suffix
    # The prompt is cut inside the final message, so what the template renders after it is gone.
    kept_open = {
        "messages": MESSAGES,
        "continue_final_message": True,
        "chat_template_kwargs": {"suffix": "extra words"},
    }
    assert tokens(server, kept_open) == default


def test_chat_options_on_tokenize(server: LiveServer, channel: grpc.Channel) -> None:
    with_prompt = ok(server, "/tokenize", {"messages": MESSAGES})  # /tokenize's default: generation prompt
    without = ok(server, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False})
    assert with_prompt["count"] > without["count"]
    kw = ok(server, "/tokenize", {"messages": MESSAGES, "chat_template_kwargs": {"suffix": "extra words"}})
    assert kw["tokens"][: with_prompt["count"]] == with_prompt["tokens"] and kw["count"] == with_prompt[
        "count"
    ] + extra_tokens(server)
    # With /tokenize's default add_generation_prompt=true, as vLLM: both true is a 400.
    body = {"messages": MESSAGES, "continue_final_message": True}
    assert "add_generation_prompt" in bad_request(server, "/tokenize", body, "continue_final_message")
    assert ok(server, "/tokenize", {**body, "add_generation_prompt": False})["count"] == without["count"]
    request = tokenize_service_pb2.TokenizeRequest(
        messages=GRPC_MESSAGES, chat=c.ChatOptions(add_generation_prompt=False)
    )
    assert list(tokenize_service_pb2_grpc.TokenizeServiceStub(channel).Tokenize(request).tokens) == without["tokens"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/pooling", {"input": "x", "add_generation_prompt": False}),
        ("/pooling", {"input": "x", "chat_template_kwargs": {"suffix": "y"}}),
        ("/tokenize", {"prompt": "x", "continue_final_message": True}),
    ],
)
def test_chat_options_without_messages_are_400(server: LiveServer, path: str, body: dict[str, Any]) -> None:
    # Before: dropped (200). Now the server refuses chat options in the completion form.
    bad_request(server, path, body, "chat")


def test_reserved_template_kwargs_are_400(server: LiveServer) -> None:
    body = {"messages": MESSAGES, "chat_template_kwargs": {"add_generation_prompt": True}}
    bad_request(server, "/pooling", body, "chat_template_kwargs")


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/pooling", "chat_template", "{{ messages }}"),
        ("/pooling", "mm_processor_kwargs", {"max_pixels": 1024}),
        ("/pooling", "priority", 1),
        ("/pooling", "softmax", False),
        ("/tokenize", "tools", [{"type": "function", "function": {"name": "f"}}]),
        ("/rerank", "cache_salt", "tenant"),
    ],
)
def test_unhonoured_vllm_fields_are_400(server: LiveServer, path: str, field: str, value: Any) -> None:
    base: dict[str, Any] = {
        "/pooling": {"messages": MESSAGES},
        "/tokenize": {"messages": MESSAGES},
        "/score": {"text_1": "q", "text_2": ["d"]},
        "/rerank": {"query": "q", "documents": ["d"]},
    }[path]
    bad_request(server, path, {**base, field: value}, field)


# ---------------------------------------------------------------- 6. task names


def test_unknown_task_wording_unchanged(server: LiveServer) -> None:
    message = bad_request(server, "/pooling", {"input": "x", "task": "plugin"}, "task")
    assert message == "Unsupported task: 'plugin' Known tasks: ['token_embed', 'token_classify', 'embed', 'classify']"
