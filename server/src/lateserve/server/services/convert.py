"""proto <-> domain conversions shared by the servicers (the only server code that reads proto
messages besides the servicers themselves)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lateserve.server.domain import (
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


def options_from_proto(options: pb.EncodeOptions) -> EncodeOptions:
    if options.embedding_mode not in MODES:
        raise InvalidArgument(f"unknown embedding_mode {options.embedding_mode}", field="embedding_mode")
    return EncodeOptions(
        truncate_prompt_tokens=options.truncate_prompt_tokens if options.HasField("truncate_prompt_tokens") else None,
        truncation_side=TruncationSide.RIGHT
        if options.truncation_side == pb.TRUNCATION_SIDE_RIGHT
        else TruncationSide.LEFT,
        add_special_tokens=options.add_special_tokens if options.HasField("add_special_tokens") else True,
        embedding_mode=MODES[options.embedding_mode],
    )


def messages_to_dicts(messages: Iterable[Any]) -> list[dict[str, Any]]:
    """Chat messages as the dicts chat templates expect (OpenAI content-part form)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        parts: list[dict[str, Any]] = []
        for p in m.content:
            if p.WhichOneof("kind") == "text":
                parts.append({"type": "text", "text": p.text})
            else:
                parts.append({"type": "image_url", "image_url": {"url": p.image_url.url}})
        out.append({"role": m.role, "content": parts})
    return out


def usage(prompt_tokens: int) -> pb.Usage:
    return pb.Usage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)


def timings(t: Timings) -> pb.Timings:
    return pb.Timings(tokenize_ns=t.tokenize_ns, queue_ns=t.queue_ns, inference_ns=t.inference_ns, total_ns=t.total_ns)
