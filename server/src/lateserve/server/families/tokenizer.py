"""The checkpoint's tokenizer for the server process, built on `tokenizers` alone (no transformers).

transformers' AutoTokenizer imports torch, which costs the server process about 220 MB and two
seconds of startup for nothing: tokenization is the Rust `tokenizers` pipeline either way. This
module loads the same files transformers reads and applies the same load-time rules, so ids,
sequence ids, vocabulary and decoded text equal those of transformers' fast tokenizer (5.x):

* `tokenizer.json` is the pipeline; padding and truncation baked into it are switched off, as
  transformers does for a call that asks for neither;
* named special tokens (bos/eos/unk/sep/pad/cls/mask, plus any other `*_token` string and the
  `extra_special_tokens` dict) and extra special tokens (`extra_special_tokens` list, formerly
  `additional_special_tokens`) come from tokenizer_config.json, else special_tokens_map.json, as
  strings or AddedToken dicts; those the tokenizer.json lacks are added as special tokens, so text
  containing them tokenizes as transformers would;
* the post-processor is the file's (transformers keeps it, add_bos_token/add_eos_token or not);
* for tokenizer_class XLMRobertaTokenizer(Fast), the pipeline transformers 5 rebuilds around the
  file's vocabulary (see `_xlm_roberta_pipeline`);
* a checkpoint with only vocab.txt is a BERT WordPiece tokenizer built as transformers' BERT
  converter builds it (do_lower_case, tokenize_chinese_chars, strip_accents honoured);
* truncation counts the special tokens ("longest_first" with `max_length`), on `truncation_side`;
* decode skips nothing and applies clean_up_tokenization_spaces unless the model is BPE.

The chat template (tokenizer_config.json `chat_template`, string or list of {name, template}, or a
separate chat_template.jinja / chat_template.json) is carried here and rendered by `chat_template`.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Encoding, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, WordPiece

from lateserve.server.domain import ModelLoadError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
VOCAB_FILE = "vocab.txt"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"

NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
"""transformers' SPECIAL_TOKENS_ATTRIBUTES, in its order (chat templates see them by these names)."""

_BERT_DEFAULTS = {
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}
"""BertTokenizer's defaults, for a vocab.txt checkpoint whose config names no special tokens."""

_XLM_R_CLASSES = frozenset({"XLMRobertaTokenizer", "XLMRobertaTokenizerFast"})
"""tokenizer_class values for which transformers 5 rebuilds the pipeline around the file's vocabulary."""

_VERY_LARGE_INTEGER = int(1e30)
"""transformers' model_max_length when a tokenizer declares none."""

# Only clean-up replacements transformers' `clean_up_tokenization` applies, in its order.
_CLEAN_UP = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


@dataclass(frozen=True, slots=True)
class Encoded:
    """One tokenized text: ids and, per id, 0 for text tokens or None for special tokens."""

    ids: list[int]
    sequence_ids: list[int | None]


@dataclass(frozen=True, slots=True)
class PairEncoded:
    """A tokenized text pair: ids, token type ids (segments) and sequence ids (0, 1, None for specials)."""

    ids: list[int]
    type_ids: list[int]
    sequence_ids: list[int | None]


class TextTokenizer:
    """What the families need of a tokenizer, with transformers' fast-tokenizer results.

    Thread-safe: plain encoding never mutates the backend; truncating calls use a second backend
    whose truncation setting is changed under a lock (tokenizers keeps truncation as state).
    """

    def __init__(
        self,
        backend: Tokenizer,
        *,
        special_tokens: Mapping[str, str],
        extra_special_tokens: Sequence[str] = (),
        model_max_length: int = _VERY_LARGE_INTEGER,
        padding_side: str = "right",
        truncation_side: str = "right",
        clean_up_tokenization_spaces: bool = False,
        chat_template: str | dict[str, str] | None = None,
    ) -> None:
        """`backend` is used as is (the loaders have already added the special tokens to it)."""
        backend.no_truncation()
        backend.no_padding()
        self._backend = backend
        self._truncating = Tokenizer.from_str(backend.to_str())
        self._truncating_max: int | None = None
        self._lock = threading.Lock()
        self.special_tokens: dict[str, str] = dict(special_tokens)
        """Named special tokens (bos_token, ... and model-specific ones such as image_token) as strings."""
        self.extra_special_tokens: list[str] = list(extra_special_tokens)
        self.model_max_length = model_max_length
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.chat_template = chat_template
        """The checkpoint's own template(s): one string, or name -> template."""
        self._clean_up = clean_up_tokenization_spaces and not isinstance(backend.model, BPE)
        self._vocab: dict[str, int] | None = None

    # --- encoding ---------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True, max_length: int | None = None) -> Encoded:
        """One text; `max_length` truncates to that many ids, special tokens counted (HF "longest_first")."""
        if max_length is None:
            return _encoded(self._backend.encode(text, add_special_tokens=add_special_tokens))
        with self._lock:
            if self._truncating_max != max_length:
                self._truncating.enable_truncation(
                    max_length, stride=0, strategy="longest_first", direction=self.truncation_side
                )
                self._truncating_max = max_length
            try:
                encoding = self._truncating.encode(text, add_special_tokens=add_special_tokens)
            except Exception as exc:  # e.g. max_length below the number of special tokens
                raise ValueError(f"cannot truncate to {max_length} tokens: {exc}") from exc
        return _encoded(encoding)

    def truncate_text(self, text: str, max_tokens: int) -> str:
        """`text` cut after its first `max_tokens` tokens (special tokens not counted), by the tokens'
        character offsets, so the kept text is the original's prefix; unchanged when it is shorter."""
        encoding = self._backend.encode(text, add_special_tokens=False)
        if len(encoding.ids) <= max_tokens:
            return text
        if max_tokens <= 0:
            return ""
        return text[: encoding.offsets[max_tokens - 1][1]]

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[Encoded]:
        """Many texts in one call into the Rust pipeline (it parallelises; the Python loop is the cost)."""
        return [_encoded(e) for e in self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def encode_pair(self, first: str, second: str) -> PairEncoded:
        """A text pair with the post-processor's pair template (cross-encoders), untruncated."""
        encoding = self._backend.encode(first, second, add_special_tokens=True)
        return PairEncoded(
            ids=list(encoding.ids), type_ids=list(encoding.type_ids), sequence_ids=list(encoding.sequence_ids)
        )

    # --- vocabulary -------------------------------------------------------------------------

    def __len__(self) -> int:
        """The whole vocabulary, added tokens included (transformers' len(tokenizer))."""
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    def get_vocab(self) -> dict[str, int]:
        """Token -> id, added tokens included. Computed once: the backend builds a new dict per call."""
        if self._vocab is None:
            self._vocab = dict(self._backend.get_vocab(with_added_tokens=True))
        return dict(self._vocab)

    def token_to_id(self, token: str) -> int | None:
        """The id of a token string, or None when the vocabulary lacks it."""
        value = self._backend.token_to_id(token)
        return None if value is None else int(value)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        """As transformers: a token missing from the vocabulary maps to the unk id (None without unk)."""
        value = self.token_to_id(token)
        return value if value is not None else self.unk_token_id

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        """Token strings of ids (None for an id the vocabulary has no string for), specials kept."""
        return [self._backend.id_to_token(int(i)) for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids with transformers' decode defaults: no token skipped, spaces cleaned up when
        the checkpoint asks for it (never for BPE, whose spaces before punctuation are real)."""
        text = str(self._backend.decode([int(i) for i in ids], skip_special_tokens=False))
        if self._clean_up:
            for before, after in _CLEAN_UP:
                text = text.replace(before, after)
        return text

    # --- special tokens ---------------------------------------------------------------------

    def special_token_id(self, name: str) -> int | None:
        """The id of a named special token ("mask_token", ...); as transformers, a token string the
        vocabulary lacks maps to the unk id."""
        token = self.special_tokens.get(name)
        return None if token is None else self.convert_tokens_to_ids(token)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def unk_token_id(self) -> int | None:
        token = self.special_tokens.get("unk_token")
        return None if token is None else self.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.special_token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self.special_token_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self.special_token_id("pad_token")

    @property
    def cls_token_id(self) -> int | None:
        return self.special_token_id("cls_token")

    @property
    def sep_token_id(self) -> int | None:
        return self.special_token_id("sep_token")

    @property
    def mask_token_id(self) -> int | None:
        return self.special_token_id("mask_token")


def _encoded(encoding: Encoding) -> Encoded:
    return Encoded(ids=list(encoding.ids), sequence_ids=list(encoding.sequence_ids))


# --- loading ---------------------------------------------------------------------------------


def load_text_tokenizer(model_dir: Path) -> TextTokenizer:
    """The checkpoint's tokenizer from tokenizer.json (else a BERT vocab.txt) and its config files.

    Raises ModelLoadError naming the file that is missing or unreadable.
    """
    config = _read_json(model_dir / TOKENIZER_CONFIG) or {}
    special_map = _read_json(model_dir / SPECIAL_TOKENS_MAP) or {}
    settings = {**special_map, **config}  # tokenizer_config.json wins, as in transformers
    file = model_dir / TOKENIZER_FILE
    if file.is_file():
        try:
            backend = Tokenizer.from_file(str(file))
        except Exception as exc:
            raise ModelLoadError(f"cannot read {file}: {exc}") from exc
    elif (model_dir / VOCAB_FILE).is_file():
        settings = {**_BERT_DEFAULTS, **settings}
        backend = _bert_wordpiece(model_dir / VOCAB_FILE, settings)
    else:
        raise ModelLoadError(
            f"{model_dir} has no {TOKENIZER_FILE} (and no BERT {VOCAB_FILE}): lateserve reads the fast "
            "tokenizer file only; save the tokenizer with transformers to write one"
        )
    if config.get("tokenizer_class") in _XLM_R_CLASSES:
        _xlm_roberta_pipeline(backend, model_dir / TOKENIZER_FILE, config)
    named, extras = _special_tokens(settings)
    _add_missing_tokens(backend, config, named, extras)
    declared = config.get("model_max_length")
    return TextTokenizer(
        backend,
        special_tokens={k: _content(v) for k, v in named.items()},
        extra_special_tokens=[_content(t) for t in extras],
        model_max_length=int(declared) if isinstance(declared, int | float) else _VERY_LARGE_INTEGER,
        padding_side=_side(config, "padding_side"),
        truncation_side=_side(config, "truncation_side"),
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        chat_template=_chat_template(model_dir, config),
    )


def _read_json(file: Path) -> dict[str, Any] | None:
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {file}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file} must hold a JSON object")
    return data


TokenSpec = str | AddedToken
"""A special token as a config declares it: a plain string or an AddedToken (from its dict form)."""


def _token(value: Any) -> TokenSpec | None:
    """A config value as a token: strings as is, {"content": ...} dicts (transformers' AddedToken
    serialisation) as AddedToken with their flags; anything else is not a token."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return AddedToken(
            value["content"],
            single_word=bool(value.get("single_word", False)),
            lstrip=bool(value.get("lstrip", False)),
            rstrip=bool(value.get("rstrip", False)),
            normalized=bool(value.get("normalized", not value.get("special", False))),
            special=bool(value.get("special", False)),
        )
    return None


def _content(token: TokenSpec) -> str:
    return token if isinstance(token, str) else str(token.content)


def _special_tokens(settings: Mapping[str, Any]) -> tuple[dict[str, TokenSpec], list[TokenSpec]]:
    """(named special tokens, extra special tokens) as transformers 5 collects them from its kwargs:
    the standard names, any other `*_token` key holding a token, an `extra_special_tokens` dict
    (named) or list (extras), `additional_special_tokens` being the old name of the list."""
    named: dict[str, TokenSpec] = {}
    for key in NAMED_SPECIAL_TOKENS:
        token = _token(settings.get(key))
        if token is not None:
            named[key] = token
    for key, value in settings.items():
        if key.endswith("_token") and key not in named and key not in NAMED_SPECIAL_TOKENS:
            token = _token(value)
            if token is not None:
                named[key] = token
    extra = settings.get("extra_special_tokens", settings.get("additional_special_tokens"))
    extras: list[TokenSpec] = []
    if isinstance(extra, dict):
        for key, value in extra.items():
            token = _token(value)
            if token is not None:
                named[str(key)] = token
    elif isinstance(extra, list):
        extras = [t for t in (_token(v) for v in extra) if t is not None]
    return named, extras


def _add_missing_tokens(
    backend: Tokenizer, config: Mapping[str, Any], named: Mapping[str, TokenSpec], extras: Sequence[TokenSpec]
) -> None:
    """Add what transformers adds at load: `added_tokens_decoder` entries and special tokens the
    tokenizer.json does not list among its added tokens (a special token already in the base
    vocabulary keeps its id, but is then matched whole in text instead of being split)."""
    added = {str(t.content) for t in backend.get_added_tokens_decoder().values()}
    declared = config.get("added_tokens_decoder")
    pending: list[AddedToken] = []
    if isinstance(declared, dict):
        for _, value in sorted(declared.items(), key=lambda kv: int(kv[0])):
            token = _token(value)
            if isinstance(token, AddedToken) and str(token.content) not in added:
                pending.append(token)
                added.add(str(token.content))
    named_strings = {_content(t) for t in named.values()}
    for token in [*named.values(), *extras]:
        content = _content(token)
        if content in added:
            continue
        if isinstance(token, str):
            token = AddedToken(token, special=True, normalized=False)
        elif content in named_strings and not token.special:
            token.special = True
        pending.append(token)
        added.add(content)
    if pending:
        backend.add_tokens(pending)


def _xlm_roberta_pipeline(backend: Tokenizer, file: Path, config: Mapping[str, Any]) -> None:
    """transformers 5's XLMRobertaTokenizer keeps only the vocabulary, added tokens, the SentencePiece
    charsmap and the post-processor of tokenizer.json: it splits on whitespace before Metaspace (so
    runs of spaces and trailing spaces make no "▁" tokens) and drops any other normalizer. The
    same pipeline here, so both give the same ids (this is what vLLM serves under transformers 5)."""
    try:
        normalizer = json.loads(file.read_text(encoding="utf-8")).get("normalizer")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {file}: {exc}") from exc
    parts = (
        normalizer.get("normalizers", [])
        if isinstance(normalizer, dict) and normalizer.get("type") == "Sequence"
        else [normalizer]
    )
    charsmap = next(
        (p["precompiled_charsmap"] for p in parts if isinstance(p, dict) and p.get("type") == "Precompiled"), None
    )
    backend.normalizer = normalizers.Precompiled(base64.b64decode(charsmap)) if charsmap else None
    scheme = "always" if config.get("add_prefix_space", True) else "never"
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)


def _bert_wordpiece(vocab_file: Path, settings: Mapping[str, Any]) -> Tokenizer:
    """BERT's tokenizer from vocab.txt, built as transformers' BertConverter builds the fast one."""
    try:
        lines = vocab_file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ModelLoadError(f"cannot read {vocab_file}: {exc}") from exc
    vocab: dict[str, int] = {}
    for line in lines:
        token = line.rstrip("\n")
        vocab.setdefault(token, len(vocab))
    unk, cls, sep = (
        _content(_token(settings.get(k)) or _BERT_DEFAULTS[k]) for k in ("unk_token", "cls_token", "sep_token")
    )
    backend = Tokenizer(WordPiece(vocab=vocab, unk_token=unk, max_input_chars_per_word=100))
    strip = settings.get("strip_accents")
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(settings.get("tokenize_chinese_chars", True)),
        strip_accents=None if strip is None else bool(strip),
        lowercase=bool(settings.get("do_lower_case", True)),
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    missing = [t for t in (cls, sep) if t not in vocab]
    if missing:
        raise ModelLoadError(f"{vocab_file} lacks the special tokens {', '.join(missing)}")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])],
    )
    backend.decoder = decoders.WordPiece(prefix="##")
    return backend


def _side(config: Mapping[str, Any], key: str) -> str:
    value = config.get(key, "right")
    if value not in ("left", "right"):
        raise ModelLoadError(f"{TOKENIZER_CONFIG}: {key} must be 'left' or 'right', got {value!r}")
    return str(value)


def _chat_template(model_dir: Path, config: Mapping[str, Any]) -> str | dict[str, str] | None:
    """The checkpoint's chat template: chat_template.jinja, else chat_template.json, else the
    tokenizer_config.json entry (newer checkpoints keep it in the separate files, which win)."""
    jinja = model_dir / CHAT_TEMPLATE_JINJA
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except OSError as exc:
            raise ModelLoadError(f"cannot read {jinja}: {exc}") from exc
    value: Any = config.get("chat_template")
    separate = _read_json(model_dir / CHAT_TEMPLATE_JSON)
    if separate is not None and "chat_template" in separate:
        value = separate["chat_template"]
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and "name" in t and "template" in t for t in value):
        return {str(t["name"]): str(t["template"]) for t in value}
    raise ModelLoadError(f"{model_dir}: chat_template must be a string or a list of {{name, template}}")
