"""Pure request builders: Python values in, lateserve.v1 request messages out.

Both the sync and the asyncio client call these, so argument normalisation and validation live
in one place and can be unit-tested without a server. Bad arguments raise TypeError/ValueError
here, before anything goes on the wire.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any, cast

from lateserve.client.types import EmbeddingModeName, InputLike, Task, TruncationSideName, WireDtype
from lateserve.v1.common_pb2 import (
    ContentPart,
    EncodeOptions,
    ImageUrl,
    Input,
    MultiModalContent,
    TokenIds,
)
from lateserve.v1.embed_service_pb2 import EmbedRequest
from lateserve.v1.info_service_pb2 import GetInfoRequest
from lateserve.v1.pool_service_pb2 import PoolRequest, StreamPoolRequest
from lateserve.v1.rerank_service_pb2 import RerankRequest
from lateserve.v1.score_service_pb2 import ScoreRequest
from lateserve.v1.tokenize_service_pb2 import DetokenizeRequest, TokenizeRequest
from lateserve.wire import enums

# The name -> enum value tables are lateserve.wire.enums' (shared with the gateway); re-exported here.
TASKS = enums.POOLING_TASKS
EMBEDDING_MODES = enums.EMBEDDING_MODES
TRUNCATION_SIDES = enums.TRUNCATION_SIDES
DTYPES = enums.DTYPES


def _token_ids(items: Sequence[Any]) -> list[int]:
    """Token ids as ints; bools and floats are rejected rather than silently converted."""
    if any(isinstance(t, bool) for t in items):
        raise TypeError("token ids must be ints, not bools")
    try:
        return [operator.index(t) for t in items]
    except TypeError:
        raise TypeError("token ids must be ints") from None


def _part(part: object) -> ContentPart:
    """One content part: a string, {"type": "text", "text": ...} or {"type": "image_url", "image_url": ...}."""
    if isinstance(part, str):
        return ContentPart(text=part)
    if isinstance(part, Mapping):
        if "text" in part:
            return ContentPart(text=str(part["text"]))
        if "image_url" in part:
            image = part["image_url"]
            url = image.get("url") if isinstance(image, Mapping) else image
            if not isinstance(url, str):
                raise TypeError("image_url must be a URL string or {'url': str}")
            return ContentPart(image_url=ImageUrl(url=url))
    raise TypeError(f"unsupported content part {part!r}; expected str, {{'text': ...}} or {{'image_url': ...}}")


def _is_token_ids(item: object) -> bool:
    """A non-empty sequence of ints (so a list of documents is never mistaken for one input)."""
    return (
        isinstance(item, Sequence)
        and not isinstance(item, str | bytes)
        and len(item) > 0
        and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
    )


def to_input(item: InputLike) -> Input:
    """One Input message from a str, a list of token ids, {"content": [...]}, or an Input."""
    if isinstance(item, Input):
        return item
    if isinstance(item, str):
        return Input(text=item)
    if isinstance(item, Mapping):
        if "content" not in item:
            raise TypeError("a dict input needs a 'content' key (a list of parts or a string)")
        content = item["content"]
        parts = [content] if isinstance(content, str) else content
        if not isinstance(parts, Sequence):
            raise TypeError("'content' must be a string or a list of parts")
        return Input(content=MultiModalContent(parts=[_part(p) for p in parts]))
    if isinstance(item, Sequence) and not isinstance(item, bytes):
        return Input(token_ids=TokenIds(ids=_token_ids(item)))
    raise TypeError(f"unsupported input {type(item).__name__}; expected str, list[int], dict or Input")


def to_inputs(items: InputLike | Sequence[InputLike]) -> list[Input]:
    """Inputs from one item or a list of items (a bare str, dict, Input or list[int] is one item)."""
    if isinstance(items, str | Mapping | Input):
        return [to_input(items)]
    if _is_token_ids(items):
        return [to_input(cast(Sequence[int], items))]
    if not isinstance(items, Sequence):
        raise TypeError(f"expected an input or a list of inputs, got {type(items).__name__}")
    return [to_input(item) for item in cast(Sequence[InputLike], items)]


def encode_options(
    *,
    truncate_prompt_tokens: int | None = None,
    truncation_side: TruncationSideName | None = None,
    add_special_tokens: bool | None = None,
    embedding_mode: EmbeddingModeName | None = None,
) -> EncodeOptions:
    """EncodeOptions where None leaves each field unset, i.e. the server's default."""
    options = EncodeOptions(
        truncation_side=enums.value_of(TRUNCATION_SIDES, truncation_side, "truncation_side"),
        embedding_mode=enums.value_of(EMBEDDING_MODES, embedding_mode, "embedding_mode"),
    )
    if truncate_prompt_tokens is not None:
        options.truncate_prompt_tokens = truncate_prompt_tokens
    if add_special_tokens is not None:
        options.add_special_tokens = add_special_tokens
    return options


def rerank_request(
    query: InputLike,
    documents: Sequence[InputLike],
    *,
    top_n: int | None = None,
    model: str = "",
    truncate_prompt_tokens: int | None = None,
    embedding_mode: EmbeddingModeName | None = None,
    score_mode: str = "",
    request_id: str = "",
    max_tokens_per_doc: int | None = None,
    max_tokens_per_query: int | None = None,
) -> RerankRequest:
    """A RerankRequest; documents must be a list (a lone str would be split into characters)."""
    if isinstance(documents, str):
        raise TypeError("documents must be a list of inputs, not a single string")
    request = RerankRequest(
        model=model,
        query=to_input(query),
        documents=[to_input(d) for d in documents],
        options=encode_options(truncate_prompt_tokens=truncate_prompt_tokens, embedding_mode=embedding_mode),
        request_id=request_id,
        score_mode=score_mode,
    )
    if top_n is not None:
        request.top_n = top_n
    _set_token_limits(request, max_tokens_per_doc, max_tokens_per_query)
    return request


def _set_token_limits(
    request: RerankRequest | ScoreRequest, max_tokens_per_doc: int | None, max_tokens_per_query: int | None
) -> None:
    """The per-side truncations, set only when given (unset and 0 both mean none; the server checks the range)."""
    if max_tokens_per_doc is not None:
        request.max_tokens_per_doc = operator.index(max_tokens_per_doc)
    if max_tokens_per_query is not None:
        request.max_tokens_per_query = operator.index(max_tokens_per_query)


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The gRPC metadata carrying `api_key` as the server's --api-key expects (`authorization: Bearer <key>`);
    none without a key. A key gRPC cannot send (not printable ASCII) is a ValueError here, not a failed call.

    >>> auth_metadata("sk-1"), auth_metadata(None)
    ((('authorization', 'Bearer sk-1'),), ())
    """
    if api_key is None:
        return ()
    if not api_key or not api_key.isascii() or not api_key.isprintable() or api_key != api_key.strip():
        raise ValueError("api_key must be non-empty printable ASCII without surrounding spaces")
    return (("authorization", f"Bearer {api_key}"),)


def score_request(
    queries: InputLike | Sequence[InputLike],
    documents: InputLike | Sequence[InputLike],
    *,
    model: str = "",
    truncate_prompt_tokens: int | None = None,
    embedding_mode: EmbeddingModeName | None = None,
    score_mode: str = "",
    request_id: str = "",
    max_tokens_per_doc: int | None = None,
    max_tokens_per_query: int | None = None,
) -> ScoreRequest:
    """A ScoreRequest: one query against every document, or queries and documents zipped."""
    request = ScoreRequest(
        model=model,
        queries=to_inputs(queries),
        documents=to_inputs(documents),
        options=encode_options(truncate_prompt_tokens=truncate_prompt_tokens, embedding_mode=embedding_mode),
        request_id=request_id,
        score_mode=score_mode,
    )
    _set_token_limits(request, max_tokens_per_doc, max_tokens_per_query)
    return request


def _pool_fields(
    inputs: InputLike | Sequence[InputLike],
    *,
    task: Task | None,
    model: str,
    dtype: WireDtype | None,
    normalize: bool | None,
    truncate_prompt_tokens: int | None,
    embedding_mode: EmbeddingModeName | None,
    request_id: str,
    pool_factor: int | None = None,
    mask_non_image_embeddings: bool = False,
) -> dict[str, Any]:
    """Fields PoolRequest and StreamPoolRequest share (same names in both)."""
    fields: dict[str, Any] = {
        "model": model,
        "inputs": to_inputs(inputs),
        "task": enums.value_of(TASKS, task, "task"),
        "options": encode_options(truncate_prompt_tokens=truncate_prompt_tokens, embedding_mode=embedding_mode),
        "dtype": enums.value_of(DTYPES, dtype, "dtype"),
        "request_id": request_id,
    }
    if normalize is not None:
        fields["normalize"] = normalize
    if pool_factor is not None:
        fields["pool_factor"] = pool_factor
    if mask_non_image_embeddings:
        fields["mask_non_image_embeddings"] = True
    return fields


def pool_request(
    inputs: InputLike | Sequence[InputLike],
    *,
    task: Task | None = "token_embed",
    model: str = "",
    dtype: WireDtype | None = "float32",
    normalize: bool | None = None,
    truncate_prompt_tokens: int | None = None,
    embedding_mode: EmbeddingModeName | None = None,
    return_lexical_weights: bool = False,
    request_id: str = "",
    pool_factor: int | None = None,
    mask_non_image_embeddings: bool = False,
) -> PoolRequest:
    """A PoolRequest; task=None or dtype=None leave the choice to the server. pool_factor (token_embed on
    late-interaction models): hierarchical token pooling into at most n // pool_factor vectors per input;
    mask_non_image_embeddings: only the image tokens' vectors of inputs with images."""
    fields = _pool_fields(
        inputs,
        task=task,
        model=model,
        dtype=dtype,
        normalize=normalize,
        truncate_prompt_tokens=truncate_prompt_tokens,
        embedding_mode=embedding_mode,
        request_id=request_id,
        pool_factor=pool_factor,
        mask_non_image_embeddings=mask_non_image_embeddings,
    )
    return PoolRequest(return_lexical_weights=return_lexical_weights, **fields)


def stream_pool_request(
    inputs: InputLike | Sequence[InputLike],
    *,
    task: Task | None = "token_embed",
    model: str = "",
    dtype: WireDtype | None = "float32",
    normalize: bool | None = None,
    truncate_prompt_tokens: int | None = None,
    embedding_mode: EmbeddingModeName | None = None,
    max_chunk_bytes: int | None = None,
    request_id: str = "",
    pool_factor: int | None = None,
    mask_non_image_embeddings: bool = False,
) -> StreamPoolRequest:
    """A StreamPoolRequest; max_chunk_bytes=None keeps the server's chunk size (1 MiB); pool_factor and
    mask_non_image_embeddings as pool_request."""
    fields = _pool_fields(
        inputs,
        task=task,
        model=model,
        dtype=dtype,
        normalize=normalize,
        truncate_prompt_tokens=truncate_prompt_tokens,
        embedding_mode=embedding_mode,
        request_id=request_id,
        pool_factor=pool_factor,
        mask_non_image_embeddings=mask_non_image_embeddings,
    )
    request = StreamPoolRequest(**fields)
    if max_chunk_bytes is not None:
        request.max_chunk_bytes = max_chunk_bytes
    return request


def embed_request(
    inputs: InputLike | Sequence[InputLike],
    *,
    model: str = "",
    dimensions: int | None = None,
    normalize: bool | None = None,
    dtype: WireDtype | None = "float32",
    truncate_prompt_tokens: int | None = None,
    request_id: str = "",
) -> EmbedRequest:
    """An EmbedRequest; dimensions cuts Matryoshka vectors, None keeps them whole."""
    request = EmbedRequest(
        model=model,
        inputs=to_inputs(inputs),
        options=encode_options(truncate_prompt_tokens=truncate_prompt_tokens),
        dtype=enums.value_of(DTYPES, dtype, "dtype"),
        request_id=request_id,
    )
    if dimensions is not None:
        request.dimensions = dimensions
    if normalize is not None:
        request.normalize = normalize
    return request


def tokenize_request(
    prompt: str, *, model: str = "", add_special_tokens: bool = True, return_token_strs: bool = False
) -> TokenizeRequest:
    """A TokenizeRequest for a plain prompt (add_special_tokens is always sent explicitly)."""
    if not isinstance(prompt, str):
        raise TypeError("prompt must be a string")
    return TokenizeRequest(
        model=model, prompt=prompt, add_special_tokens=add_special_tokens, return_token_strs=return_token_strs
    )


def detokenize_request(tokens: Sequence[int], *, model: str = "") -> DetokenizeRequest:
    """A DetokenizeRequest for token ids."""
    return DetokenizeRequest(model=model, tokens=_token_ids(tokens))


def info_request() -> GetInfoRequest:
    """The (empty) GetInfoRequest."""
    return GetInfoRequest()


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC channel options: the same message limit both ways (big token matrices need room)."""
    if max_message_bytes <= 0:
        raise ValueError("max_message_bytes must be positive")
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
