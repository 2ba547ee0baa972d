"""Request schemas (pydantic only): vLLM's field names, defaults and unions, no server."""

from __future__ import annotations

import pydantic
import pytest

from lateserve.gateway.common.protocol import ImageUrlPart, MultiModalInput, TextPart
from lateserve.gateway.embeddings.protocol import EmbeddingRequest
from lateserve.gateway.errors import from_validation_error
from lateserve.gateway.pooling.protocol import PoolingRequest
from lateserve.gateway.rerank.protocol import RerankRequest
from lateserve.gateway.score.protocol import ScoreRequest
from lateserve.gateway.tokenize.protocol import DetokenizeRequest, TokenizeRequest


def test_rerank_defaults_match_vllm() -> None:
    body = RerankRequest.model_validate({"query": "q", "documents": ["a", "b"]})
    assert body.model is None
    assert body.top_n == 0
    assert body.truncate_prompt_tokens is None
    assert body.truncation_side is None
    assert body.embedding_mode is None


def test_rerank_accepts_and_keeps_foreign_fields() -> None:
    body = RerankRequest.model_validate(
        {"query": "q", "documents": "d", "return_documents": False, "rank_fields": ["x"], "max_chunks_per_doc": 3}
    )
    assert body.documents == "d"
    # rank_fields is read now (Cohere v1 document objects); the rest stay extras.
    assert body.rank_fields == ["x"]
    assert body.model_extra == {"return_documents": False, "max_chunks_per_doc": 3}


def test_rerank_multimodal_items_parse_into_parts() -> None:
    body = RerankRequest.model_validate(
        {
            "query": {"content": [{"type": "text", "text": "red"}]},
            "documents": [
                "plain",
                {"content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
            ],
        }
    )
    assert isinstance(body.query, MultiModalInput)
    assert isinstance(body.query.content[0], TextPart)
    assert isinstance(body.documents, list)
    doc = body.documents[1]
    assert isinstance(doc, MultiModalInput)
    assert isinstance(doc.content[0], ImageUrlPart)
    assert doc.content[0].image_url.url == "data:image/png;base64,AAAA"


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"documents": ["a"]}, "query"),
        ({"query": "q", "documents": ["a", 5]}, "documents[1]"),
        (
            {"query": "q", "documents": [{"content": [{"type": "video_url", "video_url": {}}]}]},
            "documents[0].content[0]",
        ),
        ({"query": "q", "documents": ["a"], "top_n": "many"}, "top_n"),
        ({"query": "q", "documents": ["a"], "truncation_side": "middle"}, "truncation_side"),
        ({"query": "q", "documents": ["a"], "embedding_mode": "pylate"}, "embedding_mode"),
        ({"query": "q", "documents": ["a"], "top_n": 2**31}, "top_n"),
    ],
)
def test_rerank_validation_errors_name_the_field(payload: dict[str, object], param: str) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        RerankRequest.model_validate(payload)
    error = from_validation_error(info.value, payload)
    assert error.status == 400
    assert error.type == "BadRequestError"
    assert error.param == param
    assert param in error.message


def test_invalid_json_is_a_validation_error_without_param() -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        RerankRequest.model_validate_json(b"{not json")
    error = from_validation_error(info.value)
    assert error.status == 400
    assert error.param is None
    assert "JSON" in error.message


@pytest.mark.parametrize(
    ("payload", "pair"),
    [
        ({"queries": "q", "documents": ["a"]}, ("q", ["a"])),
        ({"queries": ["q"], "items": ["a", "b"]}, (["q"], ["a", "b"])),
        ({"data_1": "q", "data_2": "a"}, ("q", "a")),
        ({"text_1": ["q1", "q2"], "text_2": ["a", "b"]}, (["q1", "q2"], ["a", "b"])),
    ],
)
def test_score_spellings_resolve_to_one_pair(payload: dict[str, object], pair: tuple[object, object]) -> None:
    assert ScoreRequest.model_validate(payload).pair() == pair


def test_score_first_complete_spelling_wins() -> None:
    body = ScoreRequest.model_validate({"queries": "q", "documents": ["d"], "text_1": "t1", "text_2": "t2"})
    assert body.pair() == ("q", ["d"])


@pytest.mark.parametrize("payload", [{}, {"queries": "q"}, {"text_1": "a", "data_2": "b"}])
def test_score_without_a_complete_spelling_is_rejected(payload: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError, match="queries/documents"):
        ScoreRequest.model_validate(payload)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("hello", "hello"),
        (["a", "b"], ["a", "b"]),
        ([101, 2054, 102], [101, 2054, 102]),
        ([[101, 102], [101, 7, 102]], [[101, 102], [101, 7, 102]]),
        ([], []),
    ],
)
def test_pooling_input_union(value: object, expected: object) -> None:
    assert PoolingRequest.model_validate({"input": value}).input == expected


def test_pooling_defaults_match_vllm() -> None:
    body = PoolingRequest.model_validate({"input": "x"})
    assert (body.encoding_format, body.embed_dtype, body.endianness) == ("float", "float32", "native")
    assert body.task is None
    assert body.dimensions is None
    assert body.normalize is None
    assert body.add_special_tokens is None
    assert body.return_lexical_weights is False
    assert not body.is_chat


def test_pooling_chat_form() -> None:
    body = PoolingRequest.model_validate(
        {
            "messages": [
                {"role": "query", "content": "hi"},
                {"role": "document", "content": [{"type": "text", "text": "x"}]},
            ]
        }
    )
    assert body.is_chat
    assert body.messages is not None
    assert body.messages[0].content == "hi"


def test_pooling_needs_input_or_messages() -> None:
    with pytest.raises(pydantic.ValidationError, match="'input' or 'messages'"):
        PoolingRequest.model_validate({"task": "token_embed"})


@pytest.mark.parametrize(
    # bytes / bytes_only and fp8 are served now (issue 11); names vLLM lacks are still refused.
    ("field", "value"),
    [("encoding_format", "npy"), ("embed_dtype", "int8"), ("endianness", "middle")],
)
def test_pooling_encoding_choices(field: str, value: str) -> None:
    payload = {"input": "x", field: value}
    with pytest.raises(pydantic.ValidationError) as info:
        PoolingRequest.model_validate(payload)
    assert from_validation_error(info.value, payload).param == field


def test_pooling_task_is_free_text_at_the_schema() -> None:
    # Unknown names are rejected with vLLM's "Unsupported task" wording in translate, not here.
    assert PoolingRequest.model_validate({"input": "x", "task": "plugin"}).task == "plugin"


def test_embedding_request_fields() -> None:
    body = EmbeddingRequest.model_validate(
        {"input": ["a"], "dimensions": 64, "encoding_format": "base64", "user": "u", "model": "m"}
    )
    assert body.dimensions == 64
    assert body.encoding_format == "base64"
    assert body.model == "m"


def test_tokenize_forms() -> None:
    completion = TokenizeRequest.model_validate({"prompt": "What is ColBERT?"})
    assert completion.add_special_tokens is None
    assert completion.return_token_strs is False
    chat = TokenizeRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]})
    assert chat.prompt is None
    with pytest.raises(pydantic.ValidationError):
        TokenizeRequest.model_validate({"model": "m"})


def test_detokenize_needs_int32_tokens() -> None:
    assert DetokenizeRequest.model_validate({"tokens": [101, 102]}).tokens == [101, 102]
    payload = {"tokens": [1, 2**40]}
    with pytest.raises(pydantic.ValidationError) as info:
        DetokenizeRequest.model_validate(payload)
    assert from_validation_error(info.value, payload).param == "tokens[1]"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (
            {"query": "q", "documents": ["a"], "top_n": -3.5},
            "top_n: Input should be a valid integer, got a number with a fractional part "
            "[type=int_from_float, input_value=-3.5, input_type=float]",
        ),
        (
            {"query": "q", "documents": ["a"], "top_n": 2**31},
            "less than or equal to 2147483647 [type=less_than_equal, input_value=2147483648, input_type=int]",
        ),
        (
            {"query": "q", "documents": ["a"], "truncation_side": "middle"},
            "Input should be 'left' or 'right' [type=literal_error, input_value='middle', input_type=str]",
        ),
        (
            {"query": "q", "documents": ["a", 5]},
            "documents[1]: Input should be a valid string [type=string_type, input_value=5, input_type=int]",
        ),
    ],
)
def test_validation_messages_echo_the_bad_value(payload: dict[str, object], message: str) -> None:
    # pydantic's own wording, as vLLM's validation messages: the input is shown, so a client debugging a
    # generated request sees what it sent.
    with pytest.raises(pydantic.ValidationError) as info:
        RerankRequest.model_validate(payload)
    assert message in from_validation_error(info.value, payload).message


def test_validation_messages_echo_at_most_a_prefix_and_no_enclosing_object() -> None:
    payload = {"query": "q", "documents": ["a"], "top_n": "x" * 10_000}
    with pytest.raises(pydantic.ValidationError) as info:
        RerankRequest.model_validate(payload)
    message = from_validation_error(info.value, payload).message
    assert "input_value='" + "x" * 96 + "..., input_type=str]" in message and len(message) < 250
    missing = {"documents": ["a"]}  # a missing field: the "input" is the whole body, not echoed
    with pytest.raises(pydantic.ValidationError) as info:
        RerankRequest.model_validate(missing)
    assert from_validation_error(info.value, missing).message == "query: Field required"
