"""Unit tests of the client's pure parts: request builders, response converters, error mapping.

No server and no network: messages are built and read directly, and failed calls are fabricated
RpcError objects carrying the same trailing metadata a real server sends.
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
from grpc_status import rpc_status

from lateserve.client import (
    InvalidArgumentError,
    LateserveError,
    NotFoundError,
    OverloadedError,
    ProtocolError,
    UnauthenticatedError,
    UnavailableError,
    UnsupportedTaskError,
    requests,
    responses,
)
from lateserve.client.errors import error_class, from_rpc_error
from lateserve.v1 import common_pb2, info_service_pb2, pool_service_pb2
from lateserve.v1.common_pb2 import Dtype, EmbeddingMode, Input, PoolingTask, TruncationSide
from lateserve.v1.embed_service_pb2 import Embedding, EmbedResponse
from lateserve.v1.rerank_service_pb2 import RerankResponse, RerankResult
from lateserve.v1.score_service_pb2 import ScoreResponse, ScoreResult
from lateserve.v1.tokenize_service_pb2 import DetokenizeResponse, TokenizeResponse
from lateserve.wire import status as wire_status
from lateserve.wire.tensors import to_tensor

# --- inputs -------------------------------------------------------------------------------------


def test_to_input_text_and_token_ids() -> None:
    assert requests.to_input("hello") == Input(text="hello")
    assert list(requests.to_input([1, 2, 3]).token_ids.ids) == [1, 2, 3]
    assert list(requests.to_input((7,)).token_ids.ids) == [7]
    assert requests.to_input([]).WhichOneof("kind") == "token_ids"


def test_to_input_content_parts() -> None:
    item = {
        "content": [
            "plain",
            {"type": "text", "text": "typed"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
            {"type": "image_url", "image_url": "data:image/png;base64,BB=="},
        ]
    }
    parts = requests.to_input(item).content.parts
    assert [p.WhichOneof("kind") for p in parts] == ["text", "text", "image_url", "image_url"]
    assert parts[1].text == "typed"
    assert parts[3].image_url.url == "data:image/png;base64,BB=="
    assert [p.text for p in requests.to_input({"content": "just text"}).content.parts] == ["just text"]


def test_to_input_passes_messages_through() -> None:
    message = Input(text="as is")
    assert requests.to_input(message) is message


@pytest.mark.parametrize(
    "bad",
    [3, 2.5, b"bytes", {"text": "no content key"}, [1, "a"], [True, False], {"content": [{"video": 1}]}],
)
def test_to_input_rejects_bad_items(bad: Any) -> None:
    with pytest.raises(TypeError):
        requests.to_input(bad)


def test_to_inputs_single_or_list() -> None:
    assert [i.text for i in requests.to_inputs("one")] == ["one"]
    assert [i.text for i in requests.to_inputs(["a", "b"])] == ["a", "b"]
    # A list of ints is one pre-tokenized input; a list of such lists is several.
    assert [list(i.token_ids.ids) for i in requests.to_inputs([5, 6])] == [[5, 6]]
    assert [list(i.token_ids.ids) for i in requests.to_inputs([[5], [6, 7]])] == [[5], [6, 7]]
    assert len(requests.to_inputs({"content": ["x"]})) == 1
    assert requests.to_inputs([]) == []
    with pytest.raises(TypeError):
        requests.to_inputs(42)  # type: ignore[arg-type]


# --- request builders ---------------------------------------------------------------------------


def test_rerank_request_fields_and_presence() -> None:
    request = requests.rerank_request(
        "q", ["d0", [1, 2]], top_n=1, model="m", truncate_prompt_tokens=-1, embedding_mode="query"
    )
    assert request.model == "m"
    assert request.query.text == "q"
    assert [d.WhichOneof("kind") for d in request.documents] == ["text", "token_ids"]
    assert request.HasField("top_n") and request.top_n == 1
    assert request.options.truncate_prompt_tokens == -1
    assert request.options.embedding_mode == EmbeddingMode.EMBEDDING_MODE_QUERY
    assert not request.options.HasField("add_special_tokens")

    plain = requests.rerank_request("q", ["d"])
    assert not plain.HasField("top_n")
    assert not plain.options.HasField("truncate_prompt_tokens")
    assert plain.options.embedding_mode == EmbeddingMode.EMBEDDING_MODE_UNSPECIFIED


def test_rerank_request_rejects_string_documents_and_unknown_modes() -> None:
    with pytest.raises(TypeError):
        requests.rerank_request("q", "not a list")
    with pytest.raises(ValueError, match="embedding_mode"):
        requests.rerank_request("q", ["d"], embedding_mode="colbert")  # type: ignore[arg-type]


def test_score_request_accepts_str_or_list_each_side() -> None:
    one_to_many = requests.score_request("q", ["a", "b"], score_mode="colbert", request_id="r1")
    assert len(one_to_many.queries) == 1 and len(one_to_many.documents) == 2
    assert one_to_many.score_mode == "colbert" and one_to_many.request_id == "r1"
    one_to_one = requests.score_request("q", "d")
    assert [d.text for d in one_to_one.documents] == ["d"]


def test_per_side_token_limits_only_when_given() -> None:
    for build in (requests.rerank_request, requests.score_request):
        request = build("q", ["d"], max_tokens_per_doc=5, max_tokens_per_query=0)
        assert request.HasField("max_tokens_per_doc") and request.max_tokens_per_doc == 5
        assert request.HasField("max_tokens_per_query") and request.max_tokens_per_query == 0
        plain = build("q", ["d"])
        assert not plain.HasField("max_tokens_per_doc") and not plain.HasField("max_tokens_per_query")
        with pytest.raises(TypeError):
            build("q", ["d"], max_tokens_per_query=2.5)  # type: ignore[arg-type]


def test_auth_metadata() -> None:
    assert requests.auth_metadata("sk-1") == (("authorization", "Bearer sk-1"),)
    assert requests.auth_metadata(None) == ()
    for bad in ("", " sk", "sk\n", "clé"):
        with pytest.raises(ValueError, match="api_key"):
            requests.auth_metadata(bad)


def test_encode_options_truncation_side() -> None:
    options = requests.encode_options(truncation_side="right", add_special_tokens=False)
    assert options.truncation_side == TruncationSide.TRUNCATION_SIDE_RIGHT
    assert options.HasField("add_special_tokens") and options.add_special_tokens is False


def test_pool_request_enums_and_optional_fields() -> None:
    request = requests.pool_request(["a", "b"], task="token_classify", dtype="bfloat16", normalize=False)
    assert request.task == PoolingTask.POOLING_TASK_TOKEN_CLASSIFY
    assert request.dtype == Dtype.DTYPE_BFLOAT16
    assert request.HasField("normalize") and request.normalize is False
    defaults = requests.pool_request("a")
    assert defaults.task == PoolingTask.POOLING_TASK_TOKEN_EMBED
    assert defaults.dtype == Dtype.DTYPE_FLOAT32
    assert not defaults.HasField("normalize")
    server_default = requests.pool_request("a", task=None, dtype=None)
    assert server_default.task == PoolingTask.POOLING_TASK_UNSPECIFIED
    assert server_default.dtype == Dtype.DTYPE_UNSPECIFIED
    assert requests.pool_request("a", return_lexical_weights=True).return_lexical_weights
    with pytest.raises(ValueError, match="dtype"):
        requests.pool_request("a", dtype="int8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="task"):
        requests.pool_request("a", task="rerank")  # type: ignore[arg-type]


def test_stream_pool_request_matches_pool_request() -> None:
    stream = requests.stream_pool_request(["a"], task="embed", max_chunk_bytes=4096, request_id="x")
    assert stream.task == PoolingTask.POOLING_TASK_EMBED
    assert stream.HasField("max_chunk_bytes") and stream.max_chunk_bytes == 4096
    assert stream.request_id == "x"
    assert not requests.stream_pool_request("a").HasField("max_chunk_bytes")


def test_embed_request_optional_fields() -> None:
    request = requests.embed_request(["a"], dimensions=64, normalize=True, dtype="float16")
    assert request.HasField("dimensions") and request.dimensions == 64
    assert request.HasField("normalize") and request.normalize is True
    assert request.dtype == Dtype.DTYPE_FLOAT16
    plain = requests.embed_request("a")
    assert not plain.HasField("dimensions") and not plain.HasField("normalize")


def test_tokenize_and_detokenize_requests() -> None:
    request = requests.tokenize_request("hi", return_token_strs=True)
    assert request.prompt == "hi" and request.return_token_strs
    assert request.HasField("add_special_tokens") and request.add_special_tokens is True
    assert requests.tokenize_request("hi", add_special_tokens=False).add_special_tokens is False
    with pytest.raises(TypeError):
        requests.tokenize_request(["hi"])  # type: ignore[arg-type]
    assert list(requests.detokenize_request([101, 102], model="m").tokens) == [101, 102]
    with pytest.raises(TypeError):
        requests.detokenize_request([1.5])  # type: ignore[list-item]


def test_channel_options() -> None:
    assert dict(requests.channel_options(1024)) == {
        "grpc.max_send_message_length": 1024,
        "grpc.max_receive_message_length": 1024,
    }
    with pytest.raises(ValueError):
        requests.channel_options(0)


# --- response converters ------------------------------------------------------------------------


def _usage() -> common_pb2.Usage:
    return common_pb2.Usage(prompt_tokens=12, total_tokens=12)


def test_ranking_round_trips_documents() -> None:
    content = requests.to_input({"content": ["t", {"type": "image_url", "image_url": {"url": "data:,"}}]})
    response = RerankResponse(
        id="score-1",
        model="m",
        results=[
            RerankResult(index=2, relevance_score=9.5, document=content),
            RerankResult(index=0, relevance_score=3.0, document=Input(text="d0")),
            RerankResult(index=1, relevance_score=1.0, document=requests.to_input([4, 5])),
        ],
        usage=_usage(),
        timings=common_pb2.Timings(total_ns=5),
    )
    ranking = responses.ranking(response)
    assert [r.index for r in ranking.results] == [2, 0, 1]  # server order kept: best first
    assert ranking.results[0].document == {
        "content": [{"type": "text", "text": "t"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    }
    assert ranking.results[1].document == "d0"
    assert ranking.results[2].document == [4, 5]
    assert ranking.usage.prompt_tokens == 12 and ranking.timings.total_ns == 5
    assert (ranking.id, ranking.model) == ("score-1", "m")


def test_scores_in_pair_order() -> None:
    response = ScoreResponse(
        results=[ScoreResult(index=1, score=0.25), ScoreResult(index=0, score=0.75)], usage=_usage()
    )
    assert responses.scores(response).scores == [0.75, 0.25]


def test_pooled_decodes_tensors_in_input_order() -> None:
    a = np.arange(6, dtype=np.float32).reshape(3, 2)
    b = np.array([[1.5, -2.0]], dtype=np.float32)
    response = pool_service_pb2.PoolResponse(
        id="pooling-1",
        outputs=[
            pool_service_pb2.PoolOutput(
                index=1,
                data=to_tensor(b, Dtype.DTYPE_BFLOAT16),
                lexical_weights=[pool_service_pb2.LexicalWeight(token_id=7, token="x", weight=0.5)],
            ),
            pool_service_pb2.PoolOutput(index=0, data=to_tensor(a)),
        ],
        usage=_usage(),
    )
    pooled = responses.pooled(response)
    assert [arr.dtype for arr in pooled.arrays] == [np.float32, np.float32]
    np.testing.assert_array_equal(pooled.arrays[0], a)
    np.testing.assert_array_equal(pooled.arrays[1], b)
    assert pooled.lexical_weights[0] == []
    assert pooled.lexical_weights[1][0].token == "x"


def test_embedded_vectors() -> None:
    vec = np.array([0.6, 0.8], dtype=np.float32)
    response = EmbedResponse(embeddings=[Embedding(index=0, data=to_tensor(vec, Dtype.DTYPE_FLOAT16))])
    pooled = responses.embedded(response)
    np.testing.assert_allclose(pooled.arrays[0], vec, rtol=1e-3)
    assert pooled.arrays[0].shape == (2,)


def test_tokenize_detokenize_and_info() -> None:
    tokenized = responses.tokenized(
        TokenizeResponse(count=2, max_model_len=512, tokens=[101, 102], token_strs=["[CLS]", "[SEP]"])
    )
    assert tokenized.tokens == [101, 102] and tokenized.token_strs == ["[CLS]", "[SEP]"]
    assert responses.detokenized(DetokenizeResponse(prompt="hello")) == "hello"

    info = responses.server_info(
        info_service_pb2.GetInfoResponse(
            version="0.1.0",
            models=[
                info_service_pb2.ModelInfo(
                    id="colbert",
                    kind=common_pb2.ModelKind.MODEL_KIND_LATE_INTERACTION,
                    tasks=[
                        PoolingTask.POOLING_TASK_TOKEN_EMBED,
                        PoolingTask.ValueType(99),
                    ],  # 99: a task newer than this client
                    score_modes=["colbert"],
                    token_dim=128,
                )
            ],
            limits=info_service_pb2.Limits(max_message_bytes=1 << 20),
        )
    )
    model = info.models[0]
    assert model.kind == "late_interaction"
    assert model.tasks == ["token_embed", "99"]
    assert model.token_dim == 128
    assert info.limits.max_message_bytes == 1 << 20 and info.version == "0.1.0"


# --- StreamPool reassembly ----------------------------------------------------------------------


def _chunks(index: int, array: np.ndarray, rows: int) -> list[pool_service_pb2.StreamPoolResponse]:
    out = []
    for start in range(0, array.shape[0], rows):
        part = array[start : start + rows]
        out.append(
            pool_service_pb2.StreamPoolResponse(
                index=index,
                data=to_tensor(part),
                row_offset=start,
                total_rows=array.shape[0],
                last_chunk=start + rows >= array.shape[0],
            )
        )
    return out


def test_stream_assembler_reassembles_rows() -> None:
    rng = np.random.default_rng(0)
    first = rng.standard_normal((5, 4)).astype(np.float32)
    second = rng.standard_normal((2, 4)).astype(np.float32)
    messages = _chunks(0, first, 2) + _chunks(1, second, 8)
    messages[-1].usage.CopyFrom(_usage())
    assembler = responses.StreamAssembler()
    done = [d for d in (assembler.feed(m) for m in messages) if d is not None]
    assembler.finish()
    assert [i for i, _ in done] == [0, 1]
    np.testing.assert_array_equal(done[0][1], first)
    np.testing.assert_array_equal(done[1][1], second)
    assert assembler.usage.prompt_tokens == 12


def test_stream_assembler_one_dimensional_output() -> None:
    vec = np.array([0.1, 0.2, 0.3], dtype=np.float32)
    message = pool_service_pb2.StreamPoolResponse(index=0, data=to_tensor(vec), total_rows=3, last_chunk=True)
    index, array = responses.StreamAssembler().feed(message) or (None, None)
    assert index == 0
    np.testing.assert_array_equal(array, vec)


def test_stream_assembler_rejects_gaps_and_short_streams() -> None:
    matrix = np.zeros((4, 2), dtype=np.float32)
    chunks = _chunks(0, matrix, 2)

    assembler = responses.StreamAssembler()
    with pytest.raises(ProtocolError, match="expected 0"):
        assembler.feed(chunks[1])  # rows 2..4 before rows 0..2

    assembler = responses.StreamAssembler()
    assembler.feed(chunks[0])
    with pytest.raises(ProtocolError, match="before inputs"):
        assembler.finish()

    assembler = responses.StreamAssembler()
    wrong_total = pool_service_pb2.StreamPoolResponse()
    wrong_total.CopyFrom(chunks[1])
    wrong_total.total_rows = 9
    assembler.feed(chunks[0])
    with pytest.raises(ProtocolError, match="expected 9"):
        assembler.feed(wrong_total)

    assembler = responses.StreamAssembler()
    for message in chunks:
        assembler.feed(message)
    with pytest.raises(ProtocolError, match="again"):
        assembler.feed(chunks[0])


# --- error mapping ------------------------------------------------------------------------------


class FakeRpcError(grpc.RpcError):
    """What a failed unary call raises: an RpcError that is also a Call."""

    def __init__(self, code: grpc.StatusCode, message: str, trailing: tuple[tuple[str, Any], ...] = ()) -> None:
        super().__init__(message)
        self._code, self._message, self._trailing = code, message, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._trailing


def _rich_error(details: wire_status.ErrorDetails) -> FakeRpcError:
    status = rpc_status.to_status(wire_status.pack_status(details))
    return FakeRpcError(status.code, status.details, status.trailing_metadata)


@pytest.mark.parametrize(
    ("code", "reason", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, wire_status.INPUT_TOO_LONG, InvalidArgumentError),
        (grpc.StatusCode.INVALID_ARGUMENT, wire_status.EMPTY_INPUT, InvalidArgumentError),
        (grpc.StatusCode.INVALID_ARGUMENT, wire_status.PAIRING_MISMATCH, InvalidArgumentError),
        (grpc.StatusCode.NOT_FOUND, wire_status.MODEL_NOT_FOUND, NotFoundError),
        (grpc.StatusCode.UNIMPLEMENTED, wire_status.UNSUPPORTED_TASK, UnsupportedTaskError),
        (grpc.StatusCode.INVALID_ARGUMENT, wire_status.UNSUPPORTED_TASK, UnsupportedTaskError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, wire_status.QUEUE_FULL, OverloadedError),
        (grpc.StatusCode.UNAVAILABLE, wire_status.WORKER_UNAVAILABLE, UnavailableError),
        (grpc.StatusCode.UNAVAILABLE, wire_status.SHUTTING_DOWN, UnavailableError),
        (grpc.StatusCode.INTERNAL, wire_status.INTERNAL, LateserveError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, wire_status.DEADLINE_EXCEEDED, LateserveError),
    ],
)
def test_rich_status_maps_to_class(code: grpc.StatusCode, reason: str, cls: type[LateserveError]) -> None:
    error = from_rpc_error(_rich_error(wire_status.ErrorDetails(code=code, message="boom", reason=reason)))
    assert type(error) is cls
    assert (error.code, error.reason, error.message) == (code, reason, "boom")


def test_rich_status_carries_field_retry_and_metadata() -> None:
    details = wire_status.ErrorDetails(
        code=grpc.StatusCode.INVALID_ARGUMENT,
        message="document 3 has 600 tokens, more than 512",
        reason=wire_status.INPUT_TOO_LONG,
        metadata={"maxModelLen": "512", "documentIndex": "3"},
        field="documents[3]",
    )
    error = from_rpc_error(_rich_error(details))
    assert isinstance(error, InvalidArgumentError)
    assert error.field == "documents[3]"
    assert error.metadata == {"maxModelLen": "512", "documentIndex": "3"}
    assert error.retry_after_s is None
    assert "INPUT_TOO_LONG" in str(error)

    busy = from_rpc_error(
        _rich_error(
            wire_status.ErrorDetails(
                code=grpc.StatusCode.RESOURCE_EXHAUSTED, message="queue full", reason="QUEUE_FULL", retry_after_s=0.5
            )
        )
    )
    assert isinstance(busy, OverloadedError)
    assert busy.retry_after_s == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
        (grpc.StatusCode.NOT_FOUND, NotFoundError),
        (grpc.StatusCode.UNIMPLEMENTED, UnsupportedTaskError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, OverloadedError),
        (grpc.StatusCode.UNAVAILABLE, UnavailableError),
        (grpc.StatusCode.UNAUTHENTICATED, UnauthenticatedError),
        (grpc.StatusCode.UNKNOWN, LateserveError),
    ],
)
def test_plain_status_maps_by_code(code: grpc.StatusCode, cls: type[LateserveError]) -> None:
    error = from_rpc_error(FakeRpcError(code, "no details"))
    assert type(error) is cls
    assert error.message == "no details" and error.field is None and error.retry_after_s is None


def test_inconsistent_status_details_are_ignored() -> None:
    # The packed status says NOT_FOUND but the call failed with UNAVAILABLE: from_call rejects the
    # details, and the call's own code still decides the class.
    status = rpc_status.to_status(
        wire_status.pack_status(
            wire_status.ErrorDetails(code=grpc.StatusCode.NOT_FOUND, message="m", reason="MODEL_NOT_FOUND")
        )
    )
    error = from_rpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "m", status.trailing_metadata))
    assert type(error) is UnavailableError


def test_reason_wins_over_code() -> None:
    assert error_class(grpc.StatusCode.UNAVAILABLE, wire_status.QUEUE_FULL) is OverloadedError
    assert error_class(grpc.StatusCode.ABORTED, "SOMETHING_NEW") is LateserveError
