"""Chat messages -> one prompt string, with a Jinja chat template, as transformers' apply_chat_template.

Templates come from checkpoints on the Hub or from the `--chat-template` flag: they are untrusted
code, so they run in jinja2's ImmutableSandboxedEnvironment. The environment and variables follow
Hugging Face's conventions so a template renders here exactly as under transformers (the server
process must not import transformers, which imports torch):

* trim_blocks and lstrip_blocks, the loopcontrols extension, and `{% generation %}` blocks
  (rendered as their body; transformers uses them only to track assistant tokens);
* `raise_exception(msg)` and `strftime_now(fmt)` globals; a `tojson` filter that does not escape
  HTML and takes ensure_ascii / indent / separators / sort_keys, as transformers defines it;
* variables: `messages`, `add_generation_prompt`, `tools` and `documents` (always None here), every
  named special token as a string (`bos_token`, `eos_token`, ..., model-specific ones such as
  `image_token`), then the caller's `chat_template_kwargs`. Those may override special tokens (as in
  transformers, where kwargs win) but not the reserved names `messages`, `add_generation_prompt`,
  `tools`, `documents` or `continue_final_message`: that is an InvalidArgument naming
  chat_template_kwargs, so a request cannot change what the messages are;
* message content is a string or a list of content-part dicts ({"type": "text", "text": ...},
  {"type": "image"}, {"type": "image_url", ...}); keys whose value is None are dropped, and
  everything is copied into plain dicts, lists and scalars before the template sees it;
* `continue_final_message`: the final message is rendered with a marker after its text, and the
  output is cut at that marker, so the prompt ends inside that message (transformers' procedure).

Template syntax errors, `raise_exception` calls and failures while rendering are InvalidArgument
with reason TEMPLATE_ERROR and the template's message. Compiled templates are cached by source.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lateserve.server.domain import InvalidArgument
from lateserve.wire import reasons

if TYPE_CHECKING:
    from lateserve.server.families.tokenizer import TextTokenizer

RESERVED_VARIABLES = frozenset({"messages", "add_generation_prompt", "tools", "documents", "continue_final_message"})
"""Template variables chat_template_kwargs may not set."""

NO_TEMPLATE = "this model has no chat template; pass --chat-template"

_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
"""transformers' marker: appended to the final message's text, then the rendered prompt is cut at it."""


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body unchanged."""

    tags = {"generation"}  # noqa: RUF012 - jinja reads the class attribute

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' tojson: plain json.dumps (jinja's own escapes <, >, & and ' for HTML)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _template_error(what: str, exc: Exception) -> InvalidArgument:
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return InvalidArgument(f"{what}: {message}", reason=reasons.TEMPLATE_ERROR, field="messages")


class ChatTemplate:
    """One compiled template; `render` is safe to call from any thread."""

    def __init__(self, source: str) -> None:
        """Compiles `source`; a syntax error is an InvalidArgument (TEMPLATE_ERROR) with jinja's message."""
        self.source = source
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise _template_error(f"chat template syntax error (line {exc.lineno})", exc) from exc
        except jinja2.TemplateError as exc:
            raise _template_error("chat template error", exc) from exc

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        special_tokens: Mapping[str, str] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt for `messages`; see the module docstring for the variables the template sees."""
        extra = dict(chat_template_kwargs or {})
        clash = sorted(RESERVED_VARIABLES & extra.keys())
        if clash:
            raise InvalidArgument(f"chat_template_kwargs may not set {', '.join(clash)}", field="chat_template_kwargs")
        if continue_final_message and add_generation_prompt:
            raise InvalidArgument(
                "continue_final_message and add_generation_prompt are not compatible", field="messages"
            )
        chat = [_plain_message(m) for m in messages]
        final_text = self._mark_final_message(chat) if continue_final_message else None
        variables = {
            **(special_tokens or {}),
            **_plain(extra),
            "messages": chat,
            "tools": None,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            rendered = self._template.render(**variables)
        except jinja2.TemplateError as exc:  # raise_exception(), undefined names, sandbox refusals
            raise _template_error("chat template error", exc) from exc
        except Exception as exc:  # the template did something the messages do not allow (e.g. str + list)
            raise _template_error("chat template failed", exc) from exc
        return rendered if final_text is None else _cut_at_tag(rendered, final_text)

    def _mark_final_message(self, chat: list[dict[str, Any]]) -> str:
        """Append the marker to the final message's (last) text; returns that text, unmarked."""
        if not chat:
            raise InvalidArgument("continue_final_message needs at least one message", field="messages")
        if "content" not in self.source:
            raise InvalidArgument(
                "continue_final_message needs a template that renders message content", field="messages"
            )
        content = chat[-1].get("content")
        if isinstance(content, str):
            chat[-1]["content"] = content + _CONTINUE_TAG
            return content
        if isinstance(content, list):
            for part in reversed(content):
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    text: str = part["text"]
                    part["text"] = text + _CONTINUE_TAG
                    return text
        raise InvalidArgument("continue_final_message: the final message has no text to continue", field="messages")


def _cut_at_tag(rendered: str, final_text: str) -> str:
    """transformers' cut: at the marker; if the template trimmed the space after it, rstrip too."""
    tag = _CONTINUE_TAG.strip()
    if final_text.strip() not in rendered or tag not in rendered:
        raise InvalidArgument(
            "continue_final_message: the chat template does not render the final message as given",
            reason=reasons.TEMPLATE_ERROR,
            field="messages",
        )
    at = rendered.rindex(tag)
    if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()


def _plain(value: Any) -> Any:
    """A copy made of dicts, lists and JSON scalars only, so the template cannot reach any object's
    methods and continue_final_message never edits the caller's messages."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def _plain_message(message: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise InvalidArgument(f"a chat message must be an object, got {type(message).__name__}", field="messages")
    # As transformers: None-valued keys are dropped (templates test for absence, not for None).
    return {str(k): _plain(v) for k, v in message.items() if v is not None}


@lru_cache(maxsize=32)
def compile_chat_template(source: str) -> ChatTemplate:
    """The compiled template for `source`, compiled once per distinct source."""
    return ChatTemplate(source)


def read_chat_template_flag(value: str) -> str:
    """vLLM's rule for `--chat-template`: an existing file's path means its text, anything else is
    the template itself."""
    try:
        path = Path(value)
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except (OSError, ValueError):  # a template is rarely a valid path: too long, NUL bytes
        pass
    return value


def resolve_chat_template(flag: str | None, own: str | Mapping[str, str] | None) -> str:
    """The template source to use: the `--chat-template` value (a file path, a template, or the name
    of one of the checkpoint's named templates), else the checkpoint's own ("default" of named ones).

    Raises InvalidArgument naming messages when there is none.
    """
    if flag is not None:
        if isinstance(own, Mapping) and flag in own:
            return own[flag]
        return read_chat_template_flag(flag)
    if isinstance(own, str):
        return own
    if isinstance(own, Mapping):
        if "default" in own:
            return own["default"]
        names = ", ".join(sorted(own))
        raise InvalidArgument(
            f"{NO_TEMPLATE} (the checkpoint's templates {names} include no 'default')", field="messages"
        )
    raise InvalidArgument(NO_TEMPLATE, field="messages")


class ChatRenderer:
    """What an InputProcessor holds: the flag and the tokenizer; the template is resolved and
    compiled on first use, so a model without one loads fine and fails only chat requests."""

    def __init__(self, tokenizer: TextTokenizer, flag: str | None = None) -> None:
        self._tokenizer = tokenizer
        self._flag = flag

    @property
    def configured(self) -> bool:
        """--chat-template was given: cross-encoders then build score prompts with it (vllm-spec 2.4)."""
        return self._flag is not None

    def template(self) -> ChatTemplate:
        return compile_chat_template(resolve_chat_template(self._flag, self._tokenizer.chat_template))

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool,
        *,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt, with the tokenizer's special tokens as template variables."""
        return self.template().render(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            special_tokens=self._tokenizer.special_tokens,
            chat_template_kwargs=chat_template_kwargs,
        )
