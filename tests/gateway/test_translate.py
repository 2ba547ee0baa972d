"""Pure JSON <-> proto translation and the error table: every spelling, exact vLLM output, no server."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_status import rpc_status

from lateserve.gateway import errors
from lateserve.gateway.common import translate as common
from lateserve.gateway.embeddings.protocol import EmbeddingRequest
from lateserve.gateway.embeddings.translate import embed_request_to_proto, embed_response_to_json
from lateserve.gateway.errors import GatewayError
from lateserve.gateway.health import models_to_json
from lateserve.gateway.jsonutil import dumps
from lateserve.gateway.pooling.protocol import PoolingRequest
from lateserve.gateway.pooling.translate import pool_request_to_proto, pool_response_to_json
from lateserve.gateway.rerank.protocol import RerankRequest
from lateserve.gateway.rerank.translate import rerank_request_to_proto, rerank_response_to_json
from lateserve.gateway.score.protocol import ScoreRequest
from lateserve.gateway.score.translate import score_request_to_proto, score_response_to_json
from lateserve.gateway.tokenize.protocol import DetokenizeRequest, TokenizeRequest
from lateserve.gateway.tokenize.translate import (
    detokenize_request_to_proto,
    tokenize_request_to_proto,
    tokenize_response_to_json,
)
from lateserve.v1 import (
    common_pb2,
    embed_service_pb2,
    info_service_pb2,
    pool_service_pb2,
    rerank_service_pb2,
    score_service_pb2,
    tokenize_service_pb2,
)
from lateserve.wire import status as wire_status
from lateserve.wire.tensors import to_tensor

GOLDEN = Path(__file__).parent / "golden"


def golden(name: str) -> tuple[str, dict[str, Any]]:
    text = (GOLDEN / name).read_text()
    return text, json.loads(text)


def text_input(text: str) -> common_pb2.Input:
    return common_pb2.Input(text=text)


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


# ---------------------------------------------------------------- requests


def test_rerank_request_to_proto() -> None:
    body = RerankRequest.model_validate(
        {
            "model": "colbert-minilm",
            "query": "what is the capital of france",
            "documents": ["Paris is the capital of France.", {"content": [IMAGE, {"type": "text", "text": "cap"}]}],
            "top_n": 1,
            "truncate_prompt_tokens": -1,
            "truncation_side": "right",
            "embedding_mode": "query",
            "score_mode": "colbert",
            "return_documents": False,
        }
    )
    message = rerank_request_to_proto(body, "rid-1")
    assert message.model == "colbert-minilm"
    assert message.request_id == "rid-1"
    assert message.query == text_input("what is the capital of france")
    assert message.documents[0] == text_input("Paris is the capital of France.")
    parts = message.documents[1].content.parts
    assert [p.WhichOneof("kind") for p in parts] == ["image_url", "text"]
    assert parts[0].image_url.url == IMAGE["image_url"]["url"]  # type: ignore[index]
    assert parts[1].text == "cap"
    assert message.HasField("top_n") and message.top_n == 1
    assert message.options.truncate_prompt_tokens == -1
    assert message.options.truncation_side == common_pb2.TRUNCATION_SIDE_RIGHT
    assert message.options.embedding_mode == common_pb2.EMBEDDING_MODE_QUERY
    assert message.score_mode == "colbert"


def test_rerank_request_defaults_leave_server_defaults() -> None:
    message = rerank_request_to_proto(RerankRequest.model_validate({"query": "q", "documents": "only"}), "r")
    assert message.model == ""  # the server's model
    assert [d.text for d in message.documents] == ["only"]  # a scalar becomes one document
    assert message.top_n == 0  # vLLM's default: all
    assert not message.options.HasField("truncate_prompt_tokens")
    assert not message.options.HasField("add_special_tokens")
    assert message.options.truncation_side == common_pb2.TRUNCATION_SIDE_UNSPECIFIED
    assert message.options.embedding_mode == common_pb2.EMBEDDING_MODE_UNSPECIFIED


@pytest.mark.parametrize(
    "payload",
    [
        {"queries": "q", "documents": ["d1", "d2"]},
        {"queries": ["q"], "items": ["d1", "d2"]},
        {"data_1": "q", "data_2": ["d1", "d2"]},
        {"text_1": ["q"], "text_2": ["d1", "d2"]},
    ],
)
def test_score_spellings_map_to_queries_and_documents(payload: dict[str, Any]) -> None:
    message = score_request_to_proto(ScoreRequest.model_validate({"model": "m", **payload}), "rid")
    assert [q.text for q in message.queries] == ["q"]
    assert [d.text for d in message.documents] == ["d1", "d2"]
    assert message.model == "m"
    assert message.request_id == "rid"


def test_score_keeps_lists_unpaired_for_the_server() -> None:
    # N:N and mismatched lengths are the server's to judge; the gateway forwards both sides as sent.
    message = score_request_to_proto(ScoreRequest.model_validate({"text_1": ["a", "b", "c"], "text_2": ["x"]}), "r")
    assert len(message.queries) == 3
    assert len(message.documents) == 1


def test_score_multimodal_scalar_document() -> None:
    message = score_request_to_proto(
        ScoreRequest.model_validate({"data_1": "Retrieve the city of Beijing", "data_2": {"content": [IMAGE]}}), "r"
    )
    assert len(message.documents) == 1
    assert message.documents[0].content.parts[0].image_url.url.startswith("data:image/png")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("hello world", [("text", "hello world")]),
        (["a", "b"], [("text", "a"), ("text", "b")]),
        ([101, 7592, 102], [("token_ids", [101, 7592, 102])]),
        ([[101, 102], [101, 1, 102]], [("token_ids", [101, 102]), ("token_ids", [101, 1, 102])]),
        ([], []),
    ],
)
def test_pooling_input_spellings(value: Any, expected: list[tuple[str, Any]]) -> None:
    message = pool_request_to_proto(PoolingRequest.model_validate({"input": value, "task": "token_embed"}), "r")
    got = []
    for item in message.inputs:
        kind = item.WhichOneof("kind")
        got.append((kind, item.text if kind == "text" else list(item.token_ids.ids)))
    assert got == expected
    assert message.task == common_pb2.POOLING_TASK_TOKEN_EMBED
    assert not message.messages
    assert not message.options.HasField("add_special_tokens")  # completion form: server default (true)


def test_pooling_chat_messages() -> None:
    body = PoolingRequest.model_validate(
        {
            "messages": [
                {"role": "query", "content": "red color"},
                {"role": "user", "content": [IMAGE, {"type": "text", "text": "describe"}]},
                {"role": "assistant", "content": None},
            ]
        }
    )
    message = pool_request_to_proto(body, "r")
    assert not message.inputs
    assert [m.role for m in message.messages] == ["query", "user", "assistant"]
    assert message.messages[0].content[0].text == "red color"
    assert message.messages[1].content[0].image_url.url == IMAGE["image_url"]["url"]  # type: ignore[index]
    assert message.messages[1].content[1].text == "describe"
    assert len(message.messages[2].content) == 0
    # vLLM's chat default (add_special_tokens=False) is the server's: unset goes as unset.
    assert not message.options.HasField("add_special_tokens")
    assert not message.HasField("chat")  # no chat options set: the server's defaults
    assert message.task == common_pb2.POOLING_TASK_UNSPECIFIED


def test_pooling_sends_both_input_and_messages() -> None:
    # The server answers 400 (field messages); tests/integration/test_gateway_rules.py shows it.
    body = PoolingRequest.model_validate({"input": "x", "messages": [{"role": "user", "content": "y"}]})
    message = pool_request_to_proto(body, "r")
    assert [i.text for i in message.inputs] == ["x"]
    assert [m.content[0].text for m in message.messages] == ["y"]


@pytest.mark.parametrize(
    ("task", "value"),
    [
        ("token_embed", common_pb2.POOLING_TASK_TOKEN_EMBED),
        ("token_classify", common_pb2.POOLING_TASK_TOKEN_CLASSIFY),
        ("embed", common_pb2.POOLING_TASK_EMBED),
        ("classify", common_pb2.POOLING_TASK_CLASSIFY),
    ],
)
def test_pooling_tasks(task: str, value: int) -> None:
    assert pool_request_to_proto(PoolingRequest.model_validate({"input": "x", "task": task}), "r").task == value


@pytest.mark.parametrize("task", ["plugin", "encode", "TOKEN_EMBED", ""])
def test_pooling_unknown_task_is_400_on_task(task: str) -> None:
    with pytest.raises(GatewayError) as info:
        pool_request_to_proto(PoolingRequest.model_validate({"input": "x", "task": task}), "r")
    error = info.value.api_error
    assert (error.status, error.type, error.param) == (400, "BadRequestError", "task")
    assert error.message.startswith(f"Unsupported task: {task!r}")


def test_pooling_forwards_dimensions() -> None:
    # The server refuses it as vLLM ("dimensions is currently not supported").
    message = pool_request_to_proto(PoolingRequest.model_validate({"input": "x", "dimensions": 8}), "r")
    assert message.HasField("dimensions") and message.dimensions == 8


def test_pooling_options_and_extensions() -> None:
    body = PoolingRequest.model_validate(
        {
            "input": "x",
            "task": "token_classify",
            "encoding_format": "base64",
            "embed_dtype": "bfloat16",
            "normalize": False,
            "add_special_tokens": False,
            "truncate_prompt_tokens": 16,
            "truncation_side": "left",
            "embedding_mode": "document",
            "return_lexical_weights": True,
        }
    )
    message = pool_request_to_proto(body, "r")
    assert message.dtype == common_pb2.DTYPE_BFLOAT16
    assert message.HasField("normalize") and message.normalize is False
    assert message.options.add_special_tokens is False
    assert message.options.truncate_prompt_tokens == 16
    assert message.options.truncation_side == common_pb2.TRUNCATION_SIDE_LEFT
    assert message.options.embedding_mode == common_pb2.EMBEDDING_MODE_DOCUMENT
    assert message.return_lexical_weights is True


def test_pooling_float_format_asks_float32_and_use_activation_is_forwarded() -> None:
    body = PoolingRequest.model_validate({"input": "x", "embed_dtype": "float16", "use_activation": False})
    message = pool_request_to_proto(body, "r")
    assert message.dtype == common_pb2.DTYPE_FLOAT32  # embed_dtype only matters for base64, as vLLM
    assert message.HasField("use_activation") and message.use_activation is False
    assert not message.HasField("normalize")  # the server reads the two names
    unset = pool_request_to_proto(PoolingRequest.model_validate({"input": "x"}), "r")
    assert not unset.HasField("normalize") and not unset.HasField("use_activation")


def test_embed_request_to_proto() -> None:
    body = EmbeddingRequest.model_validate(
        {"model": "m", "input": ["a", "b"], "dimensions": 64, "normalize": True, "encoding_format": "base64"}
    )
    message = embed_request_to_proto(body, "rid")
    assert [i.text for i in message.inputs] == ["a", "b"]
    assert message.HasField("dimensions") and message.dimensions == 64
    assert message.normalize is True
    assert message.dtype == common_pb2.DTYPE_FLOAT32
    assert message.request_id == "rid"
    assert not embed_request_to_proto(EmbeddingRequest.model_validate({"input": "a"}), "r").HasField("dimensions")


def test_tokenize_request_to_proto() -> None:
    plain = tokenize_request_to_proto(TokenizeRequest.model_validate({"prompt": "What is ColBERT?"}))
    assert plain.prompt == "What is ColBERT?"
    assert not plain.HasField("add_special_tokens")  # server default per form
    assert not plain.HasField("add_generation_prompt")
    assert not plain.HasField("chat")
    assert plain.return_token_strs is False
    strs = tokenize_request_to_proto(
        TokenizeRequest.model_validate({"prompt": "x", "add_special_tokens": False, "return_token_strs": True})
    )
    assert strs.add_special_tokens is False and strs.return_token_strs is True
    chat = tokenize_request_to_proto(
        TokenizeRequest.model_validate(
            {"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": False}
        )
    )
    assert chat.prompt == ""
    assert chat.messages[0].content[0].text == "hi"
    assert chat.chat.HasField("add_generation_prompt") and chat.chat.add_generation_prompt is False


def test_detokenize_request_to_proto() -> None:
    message = detokenize_request_to_proto(DetokenizeRequest.model_validate({"model": "m", "tokens": [101, 102]}))
    assert list(message.tokens) == [101, 102]
    assert message.model == "m"


# ---------------------------------------------------------------- responses (byte-exact vs vLLM)

MINILM_DOCS = [
    "Paris is the capital of France.",
    "Berlin is the capital of Germany.",
    "The quick brown fox jumps over the lazy dog.",
]


@pytest.mark.parametrize(
    "name",
    ["vllm-minilm-rerank.json", "vllm-minilm-v1-rerank.json", "vllm-tiny-rerank.json", "vllm-minilm-rerank-1x20.json"],
)
def test_rerank_response_matches_vllm_bytes(name: str) -> None:
    text, data = golden(name)
    documents = [f"doc {i}" for i in range(20)]
    for result in data["results"]:
        documents[result["index"]] = result["document"]["text"]
    response = rerank_service_pb2.RerankResponse(
        id=data["id"],
        model=data["model"],
        usage=common_pb2.Usage(**data["usage"]),
        results=[
            rerank_service_pb2.RerankResult(
                index=r["index"], document=text_input(r["document"]["text"]), relevance_score=r["relevance_score"]
            )
            for r in data["results"]
        ],
    )
    body = RerankRequest.model_validate({"query": "what is the capital of france", "documents": documents})
    assert dumps(rerank_response_to_json(response, body)) == text


def test_rerank_echoes_multimodal_documents_as_sent() -> None:
    doc = {"content": [IMAGE, {"type": "text", "text": "a red square", "extra": 1}]}
    body = RerankRequest.model_validate({"query": "red", "documents": ["blue", doc]})
    response = rerank_service_pb2.RerankResponse(
        id="score-x",
        model="m",
        results=[
            rerank_service_pb2.RerankResult(index=1, relevance_score=2.5),
            rerank_service_pb2.RerankResult(index=0, relevance_score=1.0),
        ],
    )
    out = rerank_response_to_json(response, body)
    assert out["results"][0]["document"] == {"text": None, "multi_modal": doc["content"]}
    assert out["results"][1]["document"] == {"text": "blue", "multi_modal": None}
    assert list(out) == ["id", "model", "usage", "results"]
    assert out["usage"] == {"prompt_tokens": 0, "total_tokens": 0}


def test_rerank_falls_back_to_the_servers_echo_for_unknown_indices() -> None:
    body = RerankRequest.model_validate({"query": "q", "documents": ["a"]})
    response = rerank_service_pb2.RerankResponse(
        results=[rerank_service_pb2.RerankResult(index=5, document=text_input("echo"), relevance_score=1.0)]
    )
    assert rerank_response_to_json(response, body)["results"][0]["document"] == {"text": "echo", "multi_modal": None}


@pytest.mark.parametrize("name", ["vllm-minilm-score.json", "vllm-minilm-score-qd.json", "vllm-tiny-score.json"])
def test_score_response_matches_vllm_bytes(name: str) -> None:
    text, data = golden(name)
    usage = data["usage"]
    response = score_service_pb2.ScoreResponse(
        id=data["id"],
        model=data["model"],
        usage=common_pb2.Usage(prompt_tokens=usage["prompt_tokens"], total_tokens=usage["total_tokens"]),
        results=[score_service_pb2.ScoreResult(index=d["index"], score=d["score"]) for d in data["data"]],
    )
    assert dumps(score_response_to_json(response, data["created"])) == text


@pytest.mark.parametrize("name", ["vllm-minilm-pooling.json", "vllm-tiny-pooling.json"])
def test_pooling_response_matches_vllm_bytes(name: str) -> None:
    text, data = golden(name)
    usage = data["usage"]
    matrix = np.asarray(data["data"][0]["data"], dtype=np.float32)
    response = pool_service_pb2.PoolResponse(
        id=data["id"],
        model=data["model"],
        usage=common_pb2.Usage(prompt_tokens=usage["prompt_tokens"], total_tokens=usage["total_tokens"]),
        outputs=[pool_service_pb2.PoolOutput(index=0, data=to_tensor(matrix))],
    )
    body = PoolingRequest.model_validate({"input": "hello world", "task": "token_embed"})
    assert dumps(pool_response_to_json(response, body, data["created"])) == text


@pytest.mark.parametrize(
    "name", ["vllm-minilm-tokenize.json", "vllm-minilm-tokenize-strs.json", "vllm-tiny-tokenize.json"]
)
def test_tokenize_response_matches_vllm_bytes(name: str) -> None:
    text, data = golden(name)
    response = tokenize_service_pb2.TokenizeResponse(
        count=data["count"],
        max_model_len=data["max_model_len"],
        tokens=data["tokens"],
        token_strs=data["token_strs"] or ["ignored"],
    )
    body = TokenizeRequest.model_validate({"prompt": "What is ColBERT?", "return_token_strs": bool(data["token_strs"])})
    assert dumps(tokenize_response_to_json(response, body)) == text


def test_pooling_base64_and_lexical_weights() -> None:
    vectors = np.array([[0.5, -1.25], [3.0, 0.1]], dtype=np.float32)
    weights = [pool_service_pb2.LexicalWeight(token_id=2673, token="hi", weight=0.25)]
    response = pool_service_pb2.PoolResponse(
        id="pooling-1",
        model="m",
        outputs=[pool_service_pb2.PoolOutput(index=0, data=to_tensor(vectors), lexical_weights=weights)],
    )
    body = PoolingRequest.model_validate({"input": "x", "encoding_format": "base64", "return_lexical_weights": True})
    item = pool_response_to_json(response, body, 0)["data"][0]
    assert list(item) == ["index", "object", "data", "lexical_weights"]
    decoded = np.frombuffer(base64.b64decode(item["data"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, vectors.ravel())
    assert item["lexical_weights"] == [{"token_id": 2673, "token": "hi", "weight": 0.25}]


def test_pooling_without_lexical_weights_has_vllm_keys_only() -> None:
    response = pool_service_pb2.PoolResponse(
        outputs=[pool_service_pb2.PoolOutput(index=0, data=to_tensor(np.array([0.5], dtype=np.float32)))]
    )
    out = pool_response_to_json(response, PoolingRequest.model_validate({"input": "x"}), 7)
    assert list(out) == ["id", "object", "created", "model", "data", "usage"]
    assert out["data"] == [{"index": 0, "object": "pooling", "data": [0.5]}]
    assert out["created"] == 7


@pytest.mark.parametrize(
    ("embed_dtype", "endianness", "numpy_dtype"),
    [
        ("float32", "little", "<f4"),
        ("float32", "big", ">f4"),
        ("float16", "native", "<f2"),
        ("float16", "big", ">f2"),
    ],
)
def test_base64_dtypes_and_byte_order(embed_dtype: str, endianness: str, numpy_dtype: str) -> None:
    values = np.array([1.5, -2.0, 0.25], dtype=np.float32)
    # The server answered in float32 even though float16 was asked for: the gateway still converts.
    encoded = common.tensor_to_json(
        to_tensor(values), encoding_format="base64", embed_dtype=embed_dtype, endianness=endianness
    )
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(encoded), dtype=numpy_dtype), values)


def test_base64_passes_the_servers_bytes_through() -> None:
    tensor = to_tensor(np.array([[1.0, 2.0]], dtype=np.float32), common_pb2.DTYPE_BFLOAT16)
    encoded = common.tensor_to_json(tensor, encoding_format="base64", embed_dtype="bfloat16")
    assert base64.b64decode(encoded) == tensor.data


def test_float_format_decodes_half_precision_tensors() -> None:
    tensor = to_tensor(np.array([[1.5, -2.0], [0.5, 4.0]], dtype=np.float32), common_pb2.DTYPE_FLOAT16)
    assert common.tensor_to_json(tensor) == [[1.5, -2.0], [0.5, 4.0]]


def test_embed_response_json() -> None:
    response = embed_service_pb2.EmbedResponse(
        id="embd-abc",
        model="m",
        embeddings=[
            embed_service_pb2.Embedding(index=0, data=to_tensor(np.array([0.25, 0.5], dtype=np.float32))),
            embed_service_pb2.Embedding(index=1, data=to_tensor(np.array([1.0, 0.0], dtype=np.float32))),
        ],
        usage=common_pb2.Usage(prompt_tokens=9, total_tokens=9),
    )
    out = embed_response_to_json(response, EmbeddingRequest.model_validate({"input": ["a", "b"]}), 1730000000)
    assert dumps(out) == (
        '{"id":"embd-abc","object":"list","created":1730000000,"model":"m","data":['
        '{"index":0,"object":"embedding","embedding":[0.25,0.5]},'
        '{"index":1,"object":"embedding","embedding":[1.0,0.0]}],'
        '"usage":{"prompt_tokens":9,"total_tokens":9,"completion_tokens":0,'
        '"prompt_tokens_details":null,"completion_tokens_details":null}}'
    )


def test_models_list_json() -> None:
    info = info_service_pb2.GetInfoResponse(
        models=[info_service_pb2.ModelInfo(id="colbert-minilm", source="models/colbert-minilm", max_model_len=512)],
        version="0.1.0",
    )
    assert models_to_json(info, 5) == {
        "object": "list",
        "data": [
            {
                "id": "colbert-minilm",
                "object": "model",
                "created": 5,
                "owned_by": "lateserve",
                "root": "models/colbert-minilm",
                "parent": None,
                "max_model_len": 512,
            }
        ],
    }


def test_timing_headers() -> None:
    headers = common.timing_headers(common_pb2.Timings(tokenize_ns=1, queue_ns=22, inference_ns=333, total_ns=4000))
    assert headers == {
        "x-lateserve-prepare-ms": "0.000",
        "x-lateserve-queue-ms": "0.000",
        "x-lateserve-inference-ms": "0.000",
        "x-lateserve-total-ms": "0.004",
        "x-tokenize-ns": "1",
        "x-queue-ns": "22",
        "x-inference-ns": "333",
    }


# ---------------------------------------------------------------- error table


def rpc_error(details: wire_status.ErrorDetails | None, code: grpc.StatusCode, message: str) -> grpc.aio.AioRpcError:
    """A client-side error as grpc.aio raises it, with the server's packed google.rpc.Status trailer."""
    trailing = grpc.aio.Metadata()
    if details is not None:
        status = rpc_status.to_status(wire_status.pack_status(details))
        trailing = grpc.aio.Metadata(*status.trailing_metadata)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, message)


def lateserve_error(
    code: grpc.StatusCode, reason: str, message: str, field: str | None = None, retry: float | None = None
) -> grpc.aio.AioRpcError:
    details = wire_status.ErrorDetails(code=code, message=message, reason=reason, field=field, retry_after_s=retry)
    return rpc_error(details, code, message)


@pytest.mark.parametrize(
    ("error", "status", "type_", "param", "retry_after"),
    [
        (
            lateserve_error(
                grpc.StatusCode.INVALID_ARGUMENT,
                wire_status.UNSUPPORTED_TASK,
                "Unsupported task: 'embed' Supported tasks: ['token_embed']",
                field="task",
            ),
            400,
            "BadRequestError",
            "task",
            None,
        ),
        (
            lateserve_error(
                grpc.StatusCode.INVALID_ARGUMENT, wire_status.INPUT_TOO_LONG, "too long", field="documents[3]"
            ),
            400,
            "BadRequestError",
            "input_tokens",
            None,
        ),
        (
            lateserve_error(
                grpc.StatusCode.INVALID_ARGUMENT, wire_status.UNSUPPORTED_INPUT, "no images", field="documents[3]"
            ),
            400,
            "BadRequestError",
            "documents[3]",
            None,
        ),
        # vLLM's envelope has param null for its pairing checks even though the server names the field.
        (
            lateserve_error(
                grpc.StatusCode.INVALID_ARGUMENT,
                wire_status.EMPTY_INPUT,
                "At least one text_pair element must be given",
                field="documents",
            ),
            400,
            "BadRequestError",
            None,
            None,
        ),
        (
            lateserve_error(
                grpc.StatusCode.INVALID_ARGUMENT,
                wire_status.PAIRING_MISMATCH,
                "Input lengths must be either 1:1, 1:N or N:N",
                field="documents",
            ),
            400,
            "BadRequestError",
            None,
            None,
        ),
        (
            lateserve_error(
                grpc.StatusCode.NOT_FOUND,
                wire_status.MODEL_NOT_FOUND,
                "The model `nope` does not exist.",
                field="model",
            ),
            404,
            "NotFoundError",
            None,
            None,
        ),
        (
            lateserve_error(grpc.StatusCode.UNIMPLEMENTED, wire_status.UNSUPPORTED_TASK, "no embed"),
            501,
            "NotImplementedError",
            None,
            None,
        ),
        (
            lateserve_error(grpc.StatusCode.RESOURCE_EXHAUSTED, wire_status.QUEUE_FULL, "queue full", retry=1.2),
            429,
            "RateLimitError",
            None,
            "2",
        ),
        (
            lateserve_error(grpc.StatusCode.UNAVAILABLE, wire_status.WORKER_UNAVAILABLE, "worker died", retry=3),
            503,
            "ServiceUnavailableError",
            None,
            "3",
        ),
        (
            lateserve_error(grpc.StatusCode.UNAVAILABLE, wire_status.SHUTTING_DOWN, "draining"),
            503,
            "ServiceUnavailableError",
            None,
            None,
        ),
        (
            lateserve_error(grpc.StatusCode.DEADLINE_EXCEEDED, wire_status.DEADLINE_EXCEEDED, "late"),
            504,
            "GatewayTimeoutError",
            None,
            None,
        ),
        (
            lateserve_error(grpc.StatusCode.INTERNAL, wire_status.INTERNAL, "boom"),
            500,
            "InternalServerError",
            None,
            None,
        ),
        (rpc_error(None, grpc.StatusCode.UNAVAILABLE, "failed to connect"), 503, "ServiceUnavailableError", None, None),
        (rpc_error(None, grpc.StatusCode.UNKNOWN, "?"), 500, "InternalServerError", None, None),
        (rpc_error(None, grpc.StatusCode.CANCELLED, "cancelled"), 500, "InternalServerError", None, None),
        # gRPC's own size limit (no lateserve ErrorInfo) is not a rate limit.
        (
            rpc_error(None, grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max"),
            413,
            "RequestEntityTooLargeError",
            None,
            None,
        ),
    ],
)
def test_rpc_error_table(
    error: grpc.aio.AioRpcError, status: int, type_: str, param: str | None, retry_after: str | None
) -> None:
    api_error = errors.from_rpc_error(error)
    assert (api_error.status, api_error.type, api_error.param) == (status, type_, param)
    assert api_error.message == error.details()
    assert api_error.headers.get("Retry-After") == retry_after
    assert api_error.body() == {"error": {"message": error.details(), "type": type_, "param": param, "code": status}}
    assert errors.from_exception(error) == api_error


def test_unparsable_status_trailer_keeps_code_and_message() -> None:
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.NOT_FOUND,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(("grpc-status-details-bin", b"\xff\x00garbage")),
        "The model `nope` does not exist.",
    )
    api_error = errors.from_rpc_error(error)
    assert (api_error.status, api_error.type, api_error.message) == (404, "NotFoundError", error.details())


def test_unexpected_exception_is_500_without_internals() -> None:
    api_error = errors.from_exception(KeyError("secret internals"))
    assert (api_error.status, api_error.type) == (500, "InternalServerError")
    assert "secret" not in api_error.message


def test_error_response_envelope() -> None:
    response = errors.error_response(
        errors.ApiError(status=429, message="queue full", type="RateLimitError", headers={"Retry-After": "1"})
    )
    assert response.status == 429
    assert response.headers["Retry-After"] == "1"
    assert response.content_type == "application/json"
    assert response.text == '{"error":{"message":"queue full","type":"RateLimitError","param":null,"code":429}}'
