"""Chat templates render here exactly as transformers' apply_chat_template renders them.

transformers is the reference (tests may import it; the server process may not).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from lateserve.server.domain import EncodeOptions, InvalidArgument, TextItem
from lateserve.server.families.chat_template import (
    ChatRenderer,
    compile_chat_template,
    read_chat_template_flag,
    resolve_chat_template,
)
from lateserve.server.families.registry import family_for, load_source
from lateserve.server.families.tokenizer import load_text_tokenizer
from lateserve.wire import reasons
from tests.fixtures.checkpoints import write_hf_colbert

BERT_TEMPLATE = (
    "{{ cls_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {{ sep_token }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

QWEN_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "Picture {{ image_count.value }}: <|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}{{ extra | default('') }}{{ {'a': '<b>', 'c': 'é'} | tojson }}"
)

RAISING_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('tool messages are not supported') }}"
    "{% endif %}{{ m['content'] }}{% endfor %}"
)

MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is ColBERT?"},
    {"role": "assistant", "content": "A late interaction model."},
]

MULTIMODAL: list[dict[str, Any]] = [
    {
        "role": "user",
        "content": [
            {"type": "image"},
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
            {"type": "text", "text": "Describe both pictures."},
        ],
    },
    {"role": "assistant", "content": [{"type": "text", "text": "The first shows"}]},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_colbert(tmp_path_factory.mktemp("chat_colbert"))


def _with_template(src: Path, dst: Path, template: str) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return dst


@pytest.mark.parametrize("template", [BERT_TEMPLATE, QWEN_TEMPLATE])
@pytest.mark.parametrize("messages", [MESSAGES, MULTIMODAL])
@pytest.mark.parametrize("mode", ["plain", "generation_prompt", "continue"])
def test_same_as_transformers(
    checkpoint: Path, tmp_path: Path, template: str, messages: list[dict[str, Any]], mode: str
) -> None:
    if template is BERT_TEMPLATE and messages is MULTIMODAL:
        pytest.skip("the BERT template prints content as a string")
    path = _with_template(checkpoint, tmp_path / "ckpt", template)
    ref = AutoTokenizer.from_pretrained(str(path))
    flags = {"add_generation_prompt": mode == "generation_prompt", "continue_final_message": mode == "continue"}
    expected = ref.apply_chat_template(messages, tokenize=False, **flags)
    renderer = ChatRenderer(load_text_tokenizer(path))
    got = renderer.render(
        messages, flags["add_generation_prompt"], continue_final_message=flags["continue_final_message"]
    )
    assert got == expected
    kwargs = {"extra": "<x>", "bos_token": "[B]"}
    expected = ref.apply_chat_template(messages, tokenize=False, **flags, **kwargs)
    assert renderer.render(messages, flags["add_generation_prompt"], chat_template_kwargs=kwargs) == (
        expected if mode != "continue" else ref.apply_chat_template(messages, tokenize=False, **kwargs)
    )


def test_raise_exception(checkpoint: Path, tmp_path: Path) -> None:
    path = _with_template(checkpoint, tmp_path / "ckpt", RAISING_TEMPLATE)
    messages = [{"role": "tool", "content": "x"}]
    with pytest.raises(Exception, match="tool messages are not supported"):
        AutoTokenizer.from_pretrained(str(path)).apply_chat_template(messages, tokenize=False)
    with pytest.raises(InvalidArgument, match="tool messages are not supported") as info:
        ChatRenderer(load_text_tokenizer(path)).render(messages, False)
    assert info.value.reason == reasons.TEMPLATE_ERROR


def test_syntax_error() -> None:
    with pytest.raises(InvalidArgument) as info:
        compile_chat_template("{% for m in messages %}{{ m }")
    assert info.value.reason == reasons.TEMPLATE_ERROR
    assert info.value.field == "messages"


def test_reserved_kwargs(checkpoint: Path) -> None:
    renderer = ChatRenderer(load_text_tokenizer(checkpoint), BERT_TEMPLATE)
    with pytest.raises(InvalidArgument, match="messages") as info:
        renderer.render(MESSAGES, False, chat_template_kwargs={"messages": []})
    assert info.value.field == "chat_template_kwargs"


def test_no_template(checkpoint: Path) -> None:
    with pytest.raises(InvalidArgument, match="no chat template") as info:
        ChatRenderer(load_text_tokenizer(checkpoint)).render(MESSAGES, False)
    assert info.value.field == "messages"


def test_flag_resolution(tmp_path: Path) -> None:
    file = tmp_path / "t.jinja"
    file.write_text("from file")
    assert read_chat_template_flag(str(file)) == "from file"
    assert read_chat_template_flag("{{ messages }}") == "{{ messages }}"
    assert read_chat_template_flag("x" * 5000) == "x" * 5000  # too long for a path: a template
    assert resolve_chat_template(None, "own") == "own"
    assert resolve_chat_template("{{ 1 }}", "own") == "{{ 1 }}"
    assert resolve_chat_template(None, {"default": "d", "tool_use": "t"}) == "d"
    assert resolve_chat_template("tool_use", {"default": "d", "tool_use": "t"}) == "t"
    with pytest.raises(InvalidArgument, match="no chat template"):
        resolve_chat_template(None, {"tool_use": "t"})


def test_processor_uses_flag(checkpoint: Path) -> None:
    """The --chat-template value reaches the processor of a served family; /tokenize renders with it."""
    processor = family_for(load_source(str(checkpoint), chat_template=BERT_TEMPLATE)).processor()
    prompt = processor.render_chat(MESSAGES[:2], True)
    assert prompt == "[CLS]system: Be brief. [SEP]user: What is ColBERT? [SEP]assistant:"
    assert processor.encode(TextItem(prompt), EncodeOptions(), "query").num_tokens > 0
    plain = family_for(load_source(str(checkpoint))).processor()
    with pytest.raises(InvalidArgument, match="no chat template"):
        plain.render_chat(MESSAGES, False)
