"""proto <-> domain conversions shared by the servicers (the only server code that reads proto
messages besides the servicers themselves)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from lateserve.server import metrics
from lateserve.server.domain import (
    ChatItem,
    ChatMessage,
    EmbeddingMode,
    EncodeOptions,
    ImagePart,
    InvalidArgument,
    Item,
    ModelNotFound,
    MultiModalItem,
    Part,
    Task,
    TextItem,
    TextPart,
    Timings,
    TokenItem,
    TruncationSide,
)
from lateserve.server.engine.engine import Engine
from lateserve.server.rpc import CALL_REQUEST_ID, begin_call, to_rpc_status
from lateserve.v1 import common_pb2 as pb
from lateserve.v1 import embed_service_pb2 as embed_pb
from lateserve.v1 import pool_service_pb2 as pool_pb
from lateserve.wire import reasons

log = logging.getLogger(__name__)

TASKS = {
    pb.POOLING_TASK_TOKEN_EMBED: Task.TOKEN_EMBED,
    pb.POOLING_TASK_TOKEN_CLASSIFY: Task.TOKEN_CLASSIFY,
    pb.POOLING_TASK_EMBED: Task.EMBED,
    pb.POOLING_TASK_CLASSIFY: Task.CLASSIFY,
}
TASK_TO_PROTO = {task: value for value, task in TASKS.items()}
MODES = {
    pb.EMBEDDING_MODE_UNSPECIFIED: EmbeddingMode.AUTO,
    pb.EMBEDDING_MODE_RAW: EmbeddingMode.RAW,
    pb.EMBEDDING_MODE_QUERY: EmbeddingMode.QUERY,
    pb.EMBEDDING_MODE_DOCUMENT: EmbeddingMode.DOCUMENT,
}


@dataclass(frozen=True, slots=True)
class ServedModel:
    """The model this server serves, under the name clients use."""

    name: str
    engine: Engine

    def check(self, requested: str) -> None:
        """Empty means the served model; anything else must match (vLLM answers 404)."""
        if requested and requested != self.name:
            raise ModelNotFound(
                f"The model `{requested}` does not exist.", field="model", metadata={"model": requested}
            )


def request_id(given: str) -> str:
    return given or uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Cheap bounds checked on the request message before anything is built from it: no domain item,
    no tokenization, no image fetch happens for a request over one of them (a 400 names the limit)."""

    max_input_chars: int = 1_000_000
    max_request_chars: int = 8_000_000
    max_items_per_request: int = 4096
    max_request_id_chars: int = 256

    def check(self, request: Message) -> None:
        """Raise InvalidArgument (REQUEST_TOO_LARGE) when `request` is over a limit.

        Costs O(1) for counts; characters are only walked when the encoded message is larger than a
        limit (a message's byte size bounds its characters), over at most max_items_per_request inputs.

        >>> from lateserve.v1 import rerank_service_pb2 as rr
        >>> limits = RequestLimits(max_input_chars=5, max_items_per_request=2)
        >>> limits.check(rr.RerankRequest(query=pb.Input(text="hi"), documents=[pb.Input(text="ok")]))
        >>> def refusal(request):
        ...     try:
        ...         limits.check(request)
        ...     except InvalidArgument as exc:
        ...         return exc.field, exc.reason, exc.metadata
        >>> refusal(rr.RerankRequest(documents=[pb.Input(text="a")] * 3))
        ('documents', 'REQUEST_TOO_LARGE', {'limit': '2', 'requested': '3'})
        >>> refusal(rr.RerankRequest(documents=[pb.Input(text="a"), pb.Input(text="abcdef")]))
        ('documents[1]', 'REQUEST_TOO_LARGE', {'limit': '5', 'requested': '6'})
        """
        descriptor = request.DESCRIPTOR
        if "request_id" in descriptor.fields_by_name:
            rid = getattr(request, "request_id", "")
            if len(rid) > self.max_request_id_chars:
                raise _too_large(
                    f"request_id has {len(rid)} characters, more than the {self.max_request_id_chars} allowed "
                    "(--max-request-id-chars)",
                    "request_id",
                    self.max_request_id_chars,
                    len(rid),
                )
        inputs: list[tuple[str, Message | str | Iterable[int]]] = []
        for fd in descriptor.fields:
            value = getattr(request, fd.name)
            name = _JSON_NAMES.get(fd.name, fd.name)
            if fd.type == fd.TYPE_MESSAGE and fd.message_type is not None and fd.message_type.name in _INPUT_MESSAGES:
                if _is_repeated(fd):
                    if len(value) > self.max_items_per_request:
                        raise _too_large(
                            f"{len(value)} inputs in {name}, more than the {self.max_items_per_request} allowed per "
                            "request (--max-items-per-request)",
                            name,
                            self.max_items_per_request,
                            len(value),
                        )
                    inputs.extend((f"{name}[{i}]", v) for i, v in enumerate(value))
                elif request.HasField(fd.name):
                    inputs.append((name, value))
            elif fd.name in _TEXT_FIELDS:
                inputs.append((name, value))
        if request.ByteSize() <= min(self.max_input_chars, self.max_request_chars):
            return  # UTF-8 bytes >= characters: nothing here can be over a character limit
        total = 0
        for where, value in inputs:
            n = _chars(value)
            if n > self.max_input_chars:
                raise _too_large(
                    f"{where} has {n} characters, more than the {self.max_input_chars} allowed per input "
                    "(--max-input-chars)",
                    where,
                    self.max_input_chars,
                    n,
                )
            total += n
            if total > self.max_request_chars:
                raise _too_large(
                    f"the inputs have more than {self.max_request_chars} characters together, the most one request "
                    "may carry (--max-request-chars)",
                    where.split("[")[0],
                    self.max_request_chars,
                    total,
                )


# Messages that are one input each; strings and id lists that are one input each (TokenizeRequest.prompt,
# DetokenizeRequest.tokens). Image URLs are not characters: --max-image-bytes bounds them.
_INPUT_MESSAGES = frozenset({"Input", "ChatMessage"})
_TEXT_FIELDS = frozenset({"prompt", "tokens"})
_JSON_NAMES = {"inputs": "input"}


def _is_repeated(fd: Any) -> bool:
    is_repeated = getattr(fd, "is_repeated", None)
    return bool(is_repeated) if is_repeated is not None else fd.label == fd.LABEL_REPEATED


def _chars(value: Message | str | Iterable[int]) -> int:
    """Characters of text (and count of token ids) in an input, image URLs left out."""
    if isinstance(value, str):
        return len(value)
    if not isinstance(value, Message):
        return len(list(value))
    total = 0
    for fd, field_value in value.ListFields():
        if fd.name == "url":
            continue
        if fd.type == fd.TYPE_STRING:
            total += sum(map(len, field_value)) if _is_repeated(fd) else len(field_value)
        elif fd.type == fd.TYPE_MESSAGE:
            items = field_value if _is_repeated(fd) else [field_value]
            total += sum(_chars(item) for item in items)
        elif _is_repeated(fd) and fd.name == "ids":
            total += len(field_value)
    return total


def _too_large(message: str, field: str, limit: int, requested: int) -> InvalidArgument:
    return InvalidArgument(
        message,
        reason=reasons.REQUEST_TOO_LARGE,
        field=field,
        metadata={"limit": str(limit), "requested": str(requested)},
    )


class MemoryTrimmer:
    """Gives freed heap back to the OS after large requests (glibc's malloc_trim), at most once a second.

    glibc keeps freed memory in its arenas (one per thread that allocated: the preparation threads, the
    tokenizer's), so a single 10 MB request would leave the process hundreds of MB larger for good."""

    def __init__(self, threshold_bytes: int = 1 << 20, min_interval_s: float = 1.0) -> None:
        self.threshold_bytes = threshold_bytes
        self.min_interval_s = min_interval_s
        self._last = 0.0
        self._pending = False
        self._trim = _malloc_trim()

    def after(self, nbytes: int) -> None:
        """Call when a request of `nbytes` finished; trims in a thread when it was large."""
        if self._trim is None or nbytes < self.threshold_bytes or self._pending:
            return
        now = time.monotonic()
        if now - self._last < self.min_interval_s:
            return
        self._last = now
        self._pending = True
        loop = asyncio.get_running_loop()
        loop.run_in_executor(None, self._run).add_done_callback(lambda _: setattr(self, "_pending", False))

    def _run(self) -> None:
        if self._trim is not None:
            self._trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """libc's malloc_trim where the C library is glibc; None elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


class LimitedServicer:
    """A servicer whose RPC methods check `RequestLimits` on the request first (over gRPC and for the
    in-process gateway alike, since both call these objects), and trim the heap after large requests."""

    def __init__(self, servicer: Any, limits: RequestLimits, trimmer: MemoryTrimmer | None = None) -> None:
        self._servicer = servicer
        self._limits = limits
        self._trimmer = trimmer or MemoryTrimmer()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._servicer, name)
        if not name[:1].isupper() or not callable(method):
            return method
        wrapped = self._stream(name, method) if _is_async_gen(method) else self._unary(name, method)
        setattr(self, name, wrapped)
        return wrapped

    async def _reject(self, name: str, request: Any, context: Any) -> bool:
        """Resolve the call's request id (CALL_REQUEST_ID, for the wrapped method), then check the limits;
        a request over one is answered here, with its id. The caller resets CALL_REQUEST_ID."""
        rid = None
        try:
            rid = begin_call(request, context, self._limits.max_request_id_chars)
            CALL_REQUEST_ID.set(rid)
            self._limits.check(request)
        except InvalidArgument as exc:
            metrics.REQUESTS.labels(name, exc.code_name).inc()
            metrics.FAILURES.labels(exc.reason).inc()
            await context.abort_with_status(to_rpc_status(exc, rid or uuid.uuid4().hex))
            return True
        return False

    def _unary(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            token = CALL_REQUEST_ID.set(None)
            try:
                await self._reject(name, request, context)
                return await method(request, context)
            finally:
                CALL_REQUEST_ID.reset(token)
                self._trimmer.after(request.ByteSize())

        return call

    def _stream(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            token = CALL_REQUEST_ID.set(None)
            try:
                if await self._reject(name, request, context):
                    return
                async for message in method(request, context):
                    yield message
            finally:
                with contextlib.suppress(ValueError):  # finalized in another context
                    CALL_REQUEST_ID.reset(token)
                self._trimmer.after(request.ByteSize())

        return call


def _is_async_gen(method: Any) -> bool:
    return inspect.isasyncgenfunction(method) or inspect.isasyncgenfunction(getattr(method, "__func__", None))


def _part(part: pb.ContentPart, where: str) -> Part:
    kind = part.WhichOneof("kind")
    if kind == "text":
        return TextPart(part.text)
    if kind == "image_url":
        return ImagePart(part.image_url.url)
    raise InvalidArgument(f"{where} is an empty content part", field=where)


def item_from_proto(value: pb.Input, where: str) -> Item:
    kind = value.WhichOneof("kind")
    if kind == "text":
        return TextItem(value.text)
    if kind == "token_ids":
        return TokenItem(tuple(value.token_ids.ids))
    if kind == "content":
        parts = tuple(_part(p, f"{where}.content[{i}]") for i, p in enumerate(value.content.parts))
        if not parts:
            raise InvalidArgument(f"{where} has no content parts", field=where)
        return MultiModalItem(parts)
    raise InvalidArgument(f"{where} is empty: set text, token_ids or content", field=where)


def items_from_proto(values: Iterable[pb.Input], field: str) -> list[Item]:
    return [item_from_proto(v, f"{field}[{i}]") for i, v in enumerate(values)]


def options_from_proto(options: pb.EncodeOptions, *, chat: bool = False) -> EncodeOptions:
    """Tokenization options. The one place vLLM's add_special_tokens default is applied: true for the
    completion form, false for chat (the template brings its own special tokens)."""
    if options.embedding_mode not in MODES:
        raise InvalidArgument(f"unknown embedding_mode {options.embedding_mode}", field="embedding_mode")
    return EncodeOptions(
        truncate_prompt_tokens=options.truncate_prompt_tokens if options.HasField("truncate_prompt_tokens") else None,
        truncation_side=TruncationSide.RIGHT
        if options.truncation_side == pb.TRUNCATION_SIDE_RIGHT
        else TruncationSide.LEFT,
        add_special_tokens=options.add_special_tokens if options.HasField("add_special_tokens") else not chat,
        embedding_mode=MODES[options.embedding_mode],
        mm_processor_kwargs=tuple(sorted(json_format.MessageToDict(options.mm_processor_kwargs).items()))
        if options.HasField("mm_processor_kwargs")
        else (),
    )


RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "add_generation_prompt", "continue_final_message"})


def chat_from_proto(
    messages: Iterable[pb.ChatMessage], options: pb.ChatOptions, *, generation_default: bool = False
) -> ChatItem:
    """Chat messages and how to render them. add_generation_prompt defaults differ by route (vLLM:
    false for pooling and embedding, true for tokenize); the caller says which."""
    chat = tuple(
        ChatMessage(m.role, tuple(_part(p, f"messages[{i}].content[{k}]") for k, p in enumerate(m.content)))
        for i, m in enumerate(messages)
    )
    for i, message in enumerate(chat):
        if not message.role:
            raise InvalidArgument(f"messages[{i}].role is required", field=f"messages[{i}].role")
    kwargs = json_format.MessageToDict(options.chat_template_kwargs) if options.HasField("chat_template_kwargs") else {}
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if reserved:
        raise InvalidArgument(
            f"chat_template_kwargs may not set {', '.join(reserved)}; use the request field instead",
            field="chat_template_kwargs",
        )
    generation = options.add_generation_prompt if options.HasField("add_generation_prompt") else generation_default
    if generation and options.continue_final_message:
        raise InvalidArgument(
            "continue_final_message and add_generation_prompt cannot both be true", field="continue_final_message"
        )
    return ChatItem(chat, generation, options.continue_final_message, tuple(sorted(kwargs.items())))


CompletionOrChat = pool_pb.PoolRequest | pool_pb.StreamPoolRequest | embed_pb.EmbedRequest
"""The request shapes that take either form: Pool, StreamPool and Embed."""


def request_inputs(request: CompletionOrChat) -> tuple[list[Item], EncodeOptions]:
    """The one rule for vLLM's two request forms: `input` (completion) or `messages` (chat), never
    both; chat options only with messages; the add_special_tokens default follows the form."""
    if request.inputs and request.messages:
        raise InvalidArgument("set either input or messages, not both", field="messages")
    if request.HasField("chat") and not request.messages:
        raise InvalidArgument(
            "add_generation_prompt, continue_final_message and chat_template_kwargs apply to messages only",
            field="chat",
        )
    if request.messages:
        return [chat_from_proto(request.messages, request.chat)], options_from_proto(request.options, chat=True)
    if not request.inputs:
        raise InvalidArgument("input must not be empty", field="input")
    return items_from_proto(request.inputs, "input"), options_from_proto(request.options)


def use_activation(request: CompletionOrChat) -> bool:
    """The one reading of vLLM's `normalize` and its newer name `use_activation` (Pool, StreamPool,
    Embed): whichever is set, both only when equal, unset true (vLLM's default)."""
    normalize = request.normalize if request.HasField("normalize") else None
    activation = request.use_activation if request.HasField("use_activation") else None
    if normalize is not None and activation is not None and normalize != activation:
        raise InvalidArgument(
            f"use_activation ({activation}) contradicts normalize ({normalize}): use_activation is the newer "
            "name of normalize; set one of them",
            field="use_activation",
        )
    for value in (activation, normalize):
        if value is not None:
            return value
    return True


def usage(prompt_tokens: int) -> pb.Usage:
    return pb.Usage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)


def count_tensor_bytes(method: str, tensors: Iterable[pb.Tensor]) -> None:
    """Adds the tensors' data bytes to lateserve_response_tensor_bytes_total{method}."""
    metrics.RESPONSE_BYTES.labels(method).inc(sum(len(t.data) for t in tensors))


def timings(t: Timings) -> pb.Timings:
    return pb.Timings(tokenize_ns=t.tokenize_ns, queue_ns=t.queue_ns, inference_ns=t.inference_ns, total_ns=t.total_ns)
