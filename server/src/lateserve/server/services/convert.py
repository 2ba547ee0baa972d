"""proto <-> domain conversions shared by the servicers (the only server code that reads proto
messages besides the servicers themselves)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf import json_format

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
from lateserve.v1 import common_pb2 as pb
from lateserve.v1 import embed_service_pb2 as embed_pb
from lateserve.v1 import pool_service_pb2 as pool_pb

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


def usage(prompt_tokens: int) -> pb.Usage:
    return pb.Usage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)


def timings(t: Timings) -> pb.Timings:
    return pb.Timings(tokenize_ns=t.tokenize_ns, queue_ns=t.queue_ns, inference_ns=t.inference_ns, total_ns=t.total_ns)
