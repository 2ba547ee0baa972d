"""The family plug-in seam: what a model family provides to the server and to the workers.

A family owns config detection, weight loading, input preparation (tokenization, markers,
truncation), the forward pass and its heads, and declares its scoring kind. It never sees
proto, gRPC, asyncio or queues. `InputProcessor` runs in the server process (tokenizer only);
`ModelRunner` runs in a worker process (torch). Modules defining families import torch only
inside `Family.runner` or in separate runner modules, so the server process stays light.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lateserve.server.domain import (
    ChatItem,
    EncodeOptions,
    Item,
    ItemOutputs,
    ModelSpec,
    RenderedChat,
    Role,
    Sequence,
    TextPart,
    WorkItem,
)
from lateserve.server.media import MediaPolicy


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where a model comes from and how the user asked to load it."""

    path: Path
    """Local directory holding config.json and weights (a Hub id is resolved before this)."""
    name: str
    """What the user passed (Hub id or directory), reported by Info."""
    config: dict[str, Any]
    """config.json with --hf-overrides merged in."""
    trust_remote_code: bool = False
    max_model_len: int | None = None
    chat_template: str | None = None
    media: MediaPolicy = field(default_factory=MediaPolicy)
    """Where image inputs may come from and their limits (vision families load images under it)."""
    mm_processor_kwargs: dict[str, Any] = field(default_factory=dict)
    """--mm-processor-kwargs: image processor settings over the checkpoint's (e.g. max_pixels)."""

    def read_json(self, relative: str) -> dict[str, Any] | None:
        """A JSON file of the checkpoint, or None when absent."""
        file = self.path / relative
        if not file.is_file():
            return None
        with file.open(encoding="utf-8") as fh:
            data: dict[str, Any] = json.load(fh)
        return data


class InputProcessor(ABC):
    """Turns request items into token sequences. Runs in the server process, on the CPU."""

    @abstractmethod
    def encode(self, item: Item, options: EncodeOptions, role: Role) -> Sequence:
        """Tokenize one item. Applies truncation from options; never checks max_model_len
        (the engine does, once, for every family). Raises InvalidArgument for bad input."""

    def encode_many(self, items: Seq[Item], options: EncodeOptions, role: Role) -> list[Sequence]:
        """Tokenize a request's items; families override it to tokenize in one batched call
        (the per-item Python loop is a large share of the server process's CPU under load)."""
        return [self.encode(item, options, role) for item in items]

    def encode_pair(self, query: Item, document: Item, options: EncodeOptions) -> Sequence:
        """One joint input for a cross-encoder: (query, document) as the model was trained to read them
        (a tokenizer text pair with segment ids, or a rendered score template). Bi-encoder and
        late-interaction families never get here (the engine routes by ModelSpec.kind)."""
        from lateserve.server.domain import Unimplemented

        raise Unimplemented("this model does not score joint (query, document) pairs")

    def truncate_text(self, text: str, max_tokens: int) -> str:
        """`text` cut to its first `max_tokens` tokens, special tokens not counted (max_tokens_per_doc).
        This default goes through token ids; families with a tokenizer keep the original prefix."""
        ids = self.tokenize(text, False)
        return text if len(ids) <= max_tokens else self.detokenize(ids[:max_tokens])

    @abstractmethod
    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        """Plain tokenization for /tokenize."""

    @abstractmethod
    def token_strings(self, ids: Seq[int]) -> list[str]:
        """Vocabulary strings of token ids."""

    @abstractmethod
    def detokenize(self, ids: Seq[int]) -> str:
        """Text of token ids; raises InvalidArgument for ids outside the vocabulary."""

    def render_chat(
        self,
        messages: Seq[dict[str, Any]],
        add_generation_prompt: bool,
        *,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """Chat messages rendered into one prompt with the chat template (families/chat_template.py)."""
        from lateserve.server.domain import InvalidArgument

        raise InvalidArgument("this model has no chat template; pass --chat-template", field="messages")

    def render(self, chat: ChatItem) -> RenderedChat:
        """A ChatItem as its prompt text plus its images in order. Content parts reach the template as
        Hugging Face passes them: text parts as {"type": "text", "text"}, images as {"type": "image"}."""
        messages = [
            {
                "role": m.role,
                "content": [
                    {"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"} for p in m.parts
                ],
            }
            for m in chat.messages
        ]
        text = self.render_chat(
            messages,
            chat.add_generation_prompt,
            continue_final_message=chat.continue_final_message,
            chat_template_kwargs=dict(chat.template_kwargs),
        )
        return RenderedChat(text, chat.images)


class ModelRunner(ABC):
    """A loaded model replica. Runs in a worker process; owns torch."""

    @abstractmethod
    def forward(self, batch: Seq[WorkItem]) -> list[ItemOutputs]:
        """Run one batch; return, per item, a float32 array for each task it asked for.

        classify returns raw logits, shape [num_labels] (the engine applies the activation).

        An item's outputs must not depend on the other items of the batch."""

    def warmup(self) -> None:  # noqa: B027 - optional hook
        """Run once after loading so the first request does not pay for lazy init."""


class Family(ABC):
    """A model family plug-in, registered by architecture name in `registry`."""

    architectures: ClassVar[tuple[str, ...]] = ()

    def __init__(self, source: ModelSource) -> None:
        self.source = source

    @abstractmethod
    def spec(self) -> ModelSpec:
        """Capabilities, dims and limits, read from config and file headers (no torch)."""

    @abstractmethod
    def processor(self) -> InputProcessor:
        """The tokenizer side, for the server process."""

    @abstractmethod
    def runner(self, device: str, dtype: str) -> ModelRunner:
        """Load weights onto `device` in `dtype` ("float32", "float16", "bfloat16").

        Raises ModelLoadError naming missing or unexpected weights; never random-initialises."""
