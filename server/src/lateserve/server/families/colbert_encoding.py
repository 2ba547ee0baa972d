"""Faithful ColBERT query/document encoding, token for token as PyLate 1.6.0 does it.

vLLM (embedding_mode "raw") tokenizes the text as is and embeds every token. ColBERT checkpoints
were trained differently, and this module reproduces PyLate's `ColBERT.tokenize` + `encode`:

* the text is stripped (and lowercased when sentence_bert_config.json says do_lower_case), then
  tokenized with the tokenizer's own special tokens, truncated on the tokenizer's truncation side
  to `length - 1` tokens (specials kept);
* the marker token (query or document prefix) is inserted after the first token ([CLS] / BOS);
* queries, when `do_query_expansion`, are padded to `query_length` with the expansion token
  (the tokenizer's mask token, else its EOS, else its pad token) on the tokenizer's padding side;
  those positions get attention mask 0 unless `attend_to_expansion_tokens`, and every one of the
  `query_length` rows is returned;
* documents drop the rows of tokens in the skiplist (punctuation by default) through `keep`.

Settings come from `artifact.metadata` (Stanford HF_ColBERT layout) or from
`config_sentence_transformers.json` (Sentence-Transformers/PyLate layout). Families call:

    encoder = ColbertEncoder.from_checkpoint(source, tokenizer)          # once, in the server process
    seq = encoder.encode(item, options, max_length=max_model_len)         # per item, faithful modes
    seq = encoder.encode_query("what is colbert?")                        # or directly

No torch here: this runs in the server process.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from lateserve.server.domain import (
    EmbeddingMode,
    EncodeOptions,
    InvalidArgument,
    Item,
    ModelLoadError,
    Sequence,
    TextItem,
)
from lateserve.server.families.base import ModelSource
from lateserve.server.families.tokenizer import TextTokenizer

STANFORD_METADATA = "artifact.metadata"
ST_CONFIG = "config_sentence_transformers.json"
ST_MODULES = "modules.json"
SBERT_CONFIG = "sentence_bert_config.json"

STANFORD_QUERY_PREFIX = "[unused0]"
STANFORD_DOCUMENT_PREFIX = "[unused1]"
PYLATE_QUERY_PREFIX = "[Q] "
PYLATE_DOCUMENT_PREFIX = "[D] "
DEFAULT_QUERY_LENGTH = 32
DEFAULT_DOCUMENT_LENGTH = 180
DEFAULT_SKIPLIST: tuple[str, ...] = tuple(string.punctuation)


@dataclass(frozen=True, slots=True)
class ColbertEncodingConfig:
    """What a checkpoint declares about its query/document encoding (PyLate's attributes)."""

    query_prefix: str = STANFORD_QUERY_PREFIX
    """Token string inserted after the first query token; "" inserts nothing."""
    document_prefix: str = STANFORD_DOCUMENT_PREFIX
    query_length: int = DEFAULT_QUERY_LENGTH
    """Total query tokens, marker and expansion included."""
    document_length: int = DEFAULT_DOCUMENT_LENGTH
    """Most document tokens, marker included."""
    do_query_expansion: bool = True
    attend_to_expansion_tokens: bool = False
    skiplist_words: tuple[str, ...] = DEFAULT_SKIPLIST
    """Token strings whose document rows are dropped."""
    lowercase: bool = False
    """sentence_bert_config.json do_lower_case: Sentence-Transformers lowercases before tokenizing."""
    source: str = "defaults"
    """Which file the settings came from, for messages and Info."""

    @classmethod
    def from_checkpoint(
        cls,
        source: ModelSource,
        *,
        default_query_prefix: str = STANFORD_QUERY_PREFIX,
        default_document_prefix: str = STANFORD_DOCUMENT_PREFIX,
    ) -> ColbertEncodingConfig:
        """Read the checkpoint's settings as PyLate does.

        A Sentence-Transformers layout (modules.json) reads config_sentence_transformers.json; any
        other layout reads artifact.metadata (Stanford ColBERT). Unset values take PyLate's defaults,
        except the prefixes, which take the family's (Stanford "[unused0]"/"[unused1]", PyLate
        "[Q] "/"[D] ", Jina "[QueryMarker]"/"[DocumentMarker]").
        """
        base = cls(query_prefix=default_query_prefix, document_prefix=default_document_prefix)
        if (source.path / ST_MODULES).is_file():
            st = _read(source, ST_CONFIG)
            sbert = _read(source, SBERT_CONFIG) or {}
            config = base.with_st_config(st) if st is not None else base
            return replace(config, lowercase=bool(sbert.get("do_lower_case", False)))
        metadata = _read(source, STANFORD_METADATA)
        return base.with_stanford_metadata(metadata) if metadata is not None else base

    def with_st_config(self, data: Mapping[str, Any]) -> ColbertEncodingConfig:
        """Apply config_sentence_transformers.json (keys as PyLate saves them)."""
        skip = data.get("skiplist_words")
        return self._checked(
            replace(
                self,
                query_prefix=_str(data, "query_prefix", self.query_prefix),
                document_prefix=_str(data, "document_prefix", self.document_prefix),
                query_length=_int(data, "query_length", self.query_length),
                document_length=_int(data, "document_length", self.document_length),
                do_query_expansion=_bool(data, "do_query_expansion", self.do_query_expansion),
                attend_to_expansion_tokens=_bool(data, "attend_to_expansion_tokens", self.attend_to_expansion_tokens),
                skiplist_words=tuple(str(w) for w in skip) if isinstance(skip, list) else self.skiplist_words,
                source=ST_CONFIG,
            )
        )

    def with_stanford_metadata(self, data: Mapping[str, Any]) -> ColbertEncodingConfig:
        """Apply Stanford ColBERT's artifact.metadata.

        `mask_punctuation: false` empties the skiplist, as in Stanford ColBERT (PyLate ignores the key
        and always skips punctuation; the checkpoints on the Hub all say true).
        """
        keep_punctuation = data.get("mask_punctuation") is False
        return self._checked(
            replace(
                self,
                query_prefix=_str(data, "query_token_id", self.query_prefix),
                document_prefix=_str(data, "doc_token_id", self.document_prefix),
                query_length=_int(data, "query_maxlen", self.query_length),
                document_length=_int(data, "doc_maxlen", self.document_length),
                attend_to_expansion_tokens=_bool(data, "attend_to_mask_tokens", self.attend_to_expansion_tokens),
                skiplist_words=() if keep_punctuation else self.skiplist_words,
                source=STANFORD_METADATA,
            )
        )

    @staticmethod
    def _checked(config: ColbertEncodingConfig) -> ColbertEncodingConfig:
        for name in ("query_length", "document_length"):
            if getattr(config, name) < 2:
                raise ModelLoadError(f"{config.source}: {name} must be at least 2, got {getattr(config, name)}")
        if not config.do_query_expansion:  # PyLate: no expansion tokens, nothing to attend to
            config = replace(config, attend_to_expansion_tokens=False)
        return config


class ColbertEncoder:
    """Encodes text as a ColBERT query or document; ids are resolved once from the tokenizer.

    A checkpoint whose tokenizer lacks a marker (PyLate would add it with a random embedding) or
    an expansion token still serves raw mode; only the faithful modes then fail, per request.
    """

    def __init__(self, tokenizer: TextTokenizer, config: ColbertEncodingConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        vocab = tokenizer.get_vocab()
        self.query_prefix_id = vocab.get(config.query_prefix) if config.query_prefix else None
        self.document_prefix_id = vocab.get(config.document_prefix) if config.document_prefix else None
        self.expansion_id = _first_id(tokenizer.mask_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
        skip = (_token_id(tokenizer, w) for w in config.skiplist_words)
        self.skiplist_ids = frozenset(i for i in skip if i is not None)
        self.pad_left = tokenizer.padding_side == "left"

    @classmethod
    def from_checkpoint(
        cls,
        source: ModelSource,
        tokenizer: TextTokenizer,
        *,
        default_query_prefix: str = STANFORD_QUERY_PREFIX,
        default_document_prefix: str = STANFORD_DOCUMENT_PREFIX,
    ) -> ColbertEncoder:
        config = ColbertEncodingConfig.from_checkpoint(
            source, default_query_prefix=default_query_prefix, default_document_prefix=default_document_prefix
        )
        return cls(tokenizer, config)

    def encode(self, item: Item, options: EncodeOptions, *, max_length: int | None = None) -> Sequence:
        """Encode one request item in options.embedding_mode (query or document).

        Lengths are the checkpoint's, lowered by options.truncate_prompt_tokens and `max_length`
        (the model's max_model_len) when those are smaller. Truncation is on the tokenizer's side, as
        in PyLate, whatever options.truncation_side says. Raises InvalidArgument naming
        embedding_mode for what the faithful modes cannot do.
        """
        mode = options.embedding_mode
        if mode not in (EmbeddingMode.QUERY, EmbeddingMode.DOCUMENT):
            raise InvalidArgument(f"unsupported embedding_mode {mode.value!r}", field="embedding_mode")
        if not isinstance(item, TextItem):
            raise InvalidArgument(
                f"embedding_mode {mode.value!r} encodes text (ColBERT markers and expansion apply to text); "
                "send text or use embedding_mode 'raw' for token ids",
                field="embedding_mode",
            )
        if not options.add_special_tokens:
            raise InvalidArgument(
                f"embedding_mode {mode.value!r} always adds the tokenizer's special tokens; "
                "add_special_tokens=false needs embedding_mode 'raw'",
                field="embedding_mode",
            )
        limits = [n for n in (options.truncate_prompt_tokens, max_length) if n is not None and n > 0]
        limit = min(limits) if limits else None
        if mode is EmbeddingMode.QUERY:
            return self.encode_query(item.text, limit=limit)
        return self.encode_document(item.text, limit=limit)

    def encode_query(self, text: str, *, limit: int | None = None) -> Sequence:
        """[first] [query marker] tokens... [expansion]* to query_length; every row is returned."""
        length = _bounded(self.config.query_length, limit)
        prefix = self._prefix_id(self.query_prefix_id, self.config.query_prefix, "query")
        ids = self._tokens(text, length - (prefix is not None))
        mask = [1] * len(ids)
        if self.config.do_query_expansion:
            if self.expansion_id is None:
                raise InvalidArgument(
                    "embedding_mode 'query' pads queries with the tokenizer's mask, EOS or pad token, "
                    "and this tokenizer has none",
                    field="embedding_mode",
                )
            pad = length - (prefix is not None) - len(ids)
            if self.pad_left:
                ids, mask = [self.expansion_id] * pad + ids, [0] * pad + mask
            else:
                ids, mask = ids + [self.expansion_id] * pad, mask + [0] * pad
        ids, mask = _insert(ids, prefix), _insert(mask, 1 if prefix is not None else None)
        attention = None if self.config.attend_to_expansion_tokens or all(mask) else tuple(mask)
        return Sequence(ids=tuple(ids), attention_mask=attention, prompt_tokens=len(ids))

    def encode_document(self, text: str, *, limit: int | None = None) -> Sequence:
        """[first] [document marker] tokens... up to document_length; skiplist rows are dropped."""
        length = _bounded(self.config.document_length, limit)
        prefix = self._prefix_id(self.document_prefix_id, self.config.document_prefix, "document")
        ids = _insert(self._tokens(text, length - (prefix is not None)), prefix)
        keep = tuple(i for i, t in enumerate(ids) if t not in self.skiplist_ids)
        return Sequence(ids=tuple(ids), keep=None if len(keep) == len(ids) else keep, prompt_tokens=len(ids))

    def _tokens(self, text: str, max_tokens: int) -> list[int]:
        """Sentence-Transformers' Transformer.tokenize for one text: strip, lowercase, truncate."""
        text = text.strip()
        if self.config.lowercase:
            text = text.lower()
        return self.tokenizer.encode(text, add_special_tokens=True, max_length=max_tokens).ids

    def _prefix_id(self, resolved: int | None, token: str, role: str) -> int | None:
        if not token:
            return None
        if resolved is None:
            raise InvalidArgument(
                f"embedding_mode {role!r} inserts the {role} marker {token!r} ({self.config.source}), "
                "which this checkpoint's tokenizer does not have",
                field="embedding_mode",
            )
        return resolved


def _bounded(length: int, limit: int | None) -> int:
    return max(2, min(length, limit)) if limit is not None else length


def _insert(values: list[int], value: int | None) -> list[int]:
    """PyLate's insert_prefix_token: after the first position."""
    return values if value is None else [*values[:1], value, *values[1:]]


def _first_id(*candidates: int | None) -> int | None:
    return next((int(c) for c in candidates if c is not None), None)


def _token_id(tokenizer: TextTokenizer, token: str) -> int | None:
    """convert_tokens_to_ids as PyLate calls it: unknown words map to the unk id when there is one."""
    return tokenizer.convert_tokens_to_ids(token)


def _read(source: ModelSource, relative: str) -> dict[str, Any] | None:
    try:
        return source.read_json(relative)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {source.path / relative}: {exc}") from exc


def _str(data: Mapping[str, Any], key: str, default: str) -> str:
    value = data.get(key)
    return default if value is None else str(value)


def _int(data: Mapping[str, Any], key: str, default: int) -> int:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelLoadError(f"{key} must be an integer, got {value!r}")
    return value


def _bool(data: Mapping[str, Any], key: str, default: bool) -> bool:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ModelLoadError(f"{key} must be true or false, got {value!r}")
    return value
