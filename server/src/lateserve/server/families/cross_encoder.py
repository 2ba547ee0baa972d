"""Cross-encoders: BertForSequenceClassification and XLMRobertaForSequenceClassification.

Layout (cross-encoder/ms-marco-MiniLM-L6-v2, BAAI/bge-reranker-base): config.json declares the
classification architecture with `id2label` (one label for a reranker); model.safetensors holds the
backbone under `bert.` (pooler included) / `roberta.` and the head under `classifier.` (BERT: one linear
on the pooled [CLS] state; XLM-R: `classifier.dense` -> tanh -> `classifier.out_proj` on `<s>`).

Scoring kind cross-encoder (vllm-spec 2.2, 2.4): /score and /rerank feed one joint prompt per pair,
as vLLM builds it (vllm-spec 2.4): with --chat-template, the template rendered with messages
[{"role": "query", "content": q}, {"role": "document", "content": d}] and tokenized with the tokenizer's
special tokens; otherwise the tokenizer's text-pair encoding (`[CLS] q [SEP] d [SEP]` with segment 1 for
`d [SEP]`; XLM-R `<s> q </s></s> d </s>` without segments). The single logit is the score.
The runner returns RAW logits, float32 [num_labels]; the engine applies the activation (sigmoid for one label, as
`CrossEncoder.predict` does by default) per `WorkItem.activation`. A single text (/pooling classify) is
the text alone with the tokenizer's special tokens. torch and transformers are imported only in the runner.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from lateserve.server.domain import (
    EncodeOptions,
    InvalidArgument,
    Item,
    ItemOutputs,
    ModelKind,
    ModelLoadError,
    ModelSpec,
    MultiModalItem,
    Sequence,
    Task,
    TextItem,
    TruncationSide,
    Unimplemented,
    UnsupportedTask,
    WorkItem,
)
from lateserve.server.families import loading
from lateserve.server.families.base import Family, ModelRunner, ModelSource
from lateserve.server.families.batching import pad_batch
from lateserve.server.families.colbert import BertProcessor
from lateserve.server.families.st_embed import EncoderBackbone, encoder_max_model_len
from lateserve.wire import reasons

if TYPE_CHECKING:
    import torch

TASKS = frozenset({Task.CLASSIFY})
# Declared architecture -> whether the backbone is XLM-R (else BERT).
ARCHITECTURES: dict[str, bool] = {"BertForSequenceClassification": False, "XLMRobertaForSequenceClassification": True}
HEAD_PREFIX = "classifier."


def num_labels(config: dict[str, Any]) -> int:
    """As transformers reads it: the size of id2label, else num_labels, else its default of 2."""
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    return int(config.get("num_labels", 2))


def encode_text_pair(tokenizer: Any, first: str, second: str) -> tuple[list[int], list[int], list[int | None]]:
    """The tokenizer's text-pair encoding with its special tokens, untruncated: (ids, token type ids, the
    sequence index of each position, None for special tokens). The one place a pair is tokenized.

    What transformers' `tokenizer(first, text_pair=second)` returns for a fast tokenizer: the `tokenizers`
    pipeline's pair encoding (its post-processor's pair template). A tokenizer offering `encode_pair`
    is asked directly; otherwise its `tokenizers` backend (transformers' `backend_tokenizer`, or the
    server's own tokenizer wrapper's) encodes the pair."""
    pair = getattr(tokenizer, "encode_pair", None)
    if callable(pair):
        encoded = pair(first, second)
        return list(encoded.ids), list(encoded.type_ids), list(encoded.sequence_ids)
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_backend", None)
    if backend is None:
        raise Unimplemented(f"the tokenizer {type(tokenizer).__name__} cannot encode text pairs")
    encoding = backend.encode(first, second, add_special_tokens=True)
    return list(encoding.ids), list(encoding.type_ids), list(encoding.sequence_ids)


def pair_keep(sequence_ids: Seq[int | None], limit: int, side: TruncationSide) -> list[int] | None:
    """Positions kept when a pair is cut to `limit` tokens as the fast tokenizers' `longest_first` does:
    the longer text gives up tokens until both are equal, then both alike (the second keeps the odd one
    unless the first was longer); special tokens stay. None when even those do not fit."""
    first = [i for i, s in enumerate(sequence_ids) if s == 0]
    second = [i for i, s in enumerate(sequence_ids) if s == 1]
    budget = limit - (len(sequence_ids) - len(first) - len(second))
    if budget < 0:
        return None
    n1, n2 = len(first), len(second)
    swap = n1 > n2
    if swap:
        n1, n2 = n2, n1
    n2 = n1 if n1 > budget else max(n1, budget - n1)
    if n1 + n2 > budget:
        n1 = budget // 2
        n2 = n1 + budget % 2
    if swap:
        n1, n2 = n2, n1
    dropped: set[int] = set()
    for positions, keep in ((first, n1), (second, n2)):
        excess = len(positions) - keep
        if excess > 0:
            dropped.update(positions[:excess] if side is TruncationSide.LEFT else positions[len(positions) - excess :])
    return [i for i in range(len(sequence_ids)) if i not in dropped]


class CrossEncoder(Family):
    """A BERT or XLM-R sequence classifier scoring (query, document) pairs."""

    architectures = tuple(ARCHITECTURES)

    @cached_property
    def architecture(self) -> str:
        declared = self.source.config.get("architectures") or []
        return next((a for a in declared if a in ARCHITECTURES), self.architectures[0])

    @property
    def xlmr(self) -> bool:
        return ARCHITECTURES[self.architecture]

    @cached_property
    def _max_model_len(self) -> int:
        return encoder_max_model_len(self.source, self.xlmr)

    @cached_property
    def _segments(self) -> bool:
        """Whether pairs carry segment ids: the backbone has a second token type (BERT; XLM-R has one)."""
        return int(self.source.config.get("type_vocab_size", 1 if self.xlmr else 2)) > 1

    def spec(self) -> ModelSpec:
        labels = num_labels(self.source.config)
        if labels < 1:
            raise ModelLoadError(f"{self.source.path}/config.json declares no labels")
        return ModelSpec(
            architecture=self.architecture,
            kind=ModelKind.CROSS_ENCODER,
            tasks=TASKS,
            default_task=Task.CLASSIFY,
            token_dim=0,
            embed_dim=0,
            max_model_len=self._max_model_len,
            num_labels=labels,
        )

    def processor(self) -> CrossEncoderProcessor:
        tokenizer = loading.load_tokenizer(self.source.path, trust_remote_code=self.source.trust_remote_code)
        return CrossEncoderProcessor(
            tokenizer,
            architecture=self.architecture,
            vocab_size=int(self.source.config.get("vocab_size") or len(tokenizer)),
            max_model_len=self._max_model_len,
            segments=self._segments,
            chat_template=self.source.chat_template,
        )

    def runner(self, device: str, dtype: str) -> CrossEncoderRunner:
        return CrossEncoderRunner(
            self.source,
            architecture=self.architecture,
            xlmr=self.xlmr,
            num_labels=num_labels(self.source.config),
            device=device,
            dtype=dtype,
        )


class CrossEncoderProcessor(BertProcessor):
    """Single texts as vLLM's raw encoding (BertProcessor); pairs through `encode_text_pair`."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        architecture: str,
        vocab_size: int,
        max_model_len: int,
        segments: bool,
        chat_template: str | None = None,
    ) -> None:
        super().__init__(
            tokenizer,
            architecture=architecture,
            vocab_size=vocab_size,
            max_model_len=max_model_len,
            chat_template=chat_template,
        )
        self._segments = segments

    def encode_pair(self, query: Item, document: Item, options: EncodeOptions) -> Sequence:
        """One joint input. truncate_prompt_tokens cuts the texts (longest first, on the requested side);
        without it an over-long pair stays long and the engine rejects it against max_model_len."""
        texts: list[str] = []
        for item, field in ((query, "query"), (document, "document")):
            if isinstance(item, MultiModalItem):
                raise Unimplemented(
                    f"multimodal input is not supported by {self._architecture}", reason=reasons.UNSUPPORTED_INPUT
                )
            if not isinstance(item, TextItem):
                raise InvalidArgument(
                    f"{self._architecture} scores text pairs; token ids cannot be paired", field=field
                )
            texts.append(item.text)
        if self._chat.configured:
            messages = [{"role": "query", "content": texts[0]}, {"role": "document", "content": texts[1]}]
            return self.encode(TextItem(self.render_chat(messages, False)), options, "input")
        ids, types, sequence_ids = encode_text_pair(self._tokenizer, texts[0], texts[1])
        limit = options.truncate_prompt_tokens
        if limit == -1:
            limit = self._max_model_len
        if limit is not None and len(ids) > limit:
            kept = pair_keep(sequence_ids, limit, options.truncation_side)
            if kept is None:  # not even the special tokens fit: cut the final list, as for single texts
                kept = list(
                    range(len(ids) - limit, len(ids))
                    if options.truncation_side is TruncationSide.LEFT
                    else range(limit)
                )
            ids, types = [ids[i] for i in kept], [types[i] for i in kept]
        token_types = tuple(types) if self._segments else None
        return Sequence(ids=tuple(ids), prompt_tokens=len(ids), token_type_ids=token_types)


class CrossEncoderRunner(ModelRunner):
    """The backbone (BERT with its pooler) and the classification head, strictly loaded; head in float32."""

    def __init__(
        self, source: ModelSource, *, architecture: str, xlmr: bool, num_labels: int, device: str, dtype: str
    ) -> None:
        import torch

        hidden = int(source.config["hidden_size"])
        head: torch.nn.Module
        if xlmr:
            head = torch.nn.ModuleDict(
                {"dense": torch.nn.Linear(hidden, hidden), "out_proj": torch.nn.Linear(hidden, num_labels)}
            )
        else:
            head = torch.nn.Linear(hidden, num_labels)
        state = loading.load_safetensors(source.path)
        head_state = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
        body = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
        self.backbone = EncoderBackbone(
            source,
            xlmr=xlmr,
            device=device,
            dtype=dtype,
            what=f"{architecture} checkpoint {source.path}",
            pooler=not xlmr,
            state=body,
            extra={"classifier": head},
            extra_state=head_state,
        )
        self.device = self.backbone.device
        self.head = head.float().eval()
        self.xlmr = xlmr
        self.num_labels = num_labels

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[batch, width, hidden] -> [batch, num_labels] from the first token, as transformers' heads."""
        import torch

        if self.xlmr:
            assert isinstance(self.head, torch.nn.ModuleDict)
            logits: torch.Tensor = self.head["out_proj"](torch.tanh(self.head["dense"](hidden[:, 0])))
            return logits
        assert self.backbone.pooler is not None
        pooled = self.backbone.pooler(hidden)
        out: torch.Tensor = self.head(pooled)
        return out

    def forward(self, batch: Seq[WorkItem]) -> list[ItemOutputs]:
        import torch

        for item in batch:
            if item.tasks - TASKS:
                raise UnsupportedTask(f"this model only computes classify, not {sorted(item.tasks)}")
        if not batch:
            return []
        ids, mask, _ = pad_batch(batch, self.backbone.pad_id)
        types = torch.zeros_like(ids)
        for row, item in enumerate(batch):
            if item.sequence.token_type_ids is not None:
                segment = item.sequence.token_type_ids
                types[row, : len(segment)] = torch.tensor(segment, dtype=torch.long)
        with torch.inference_mode():
            if not ids.shape[1]:
                return [{Task.CLASSIFY: np.zeros(self.num_labels, dtype=np.float32)} for _ in batch]
            hidden = self.backbone(ids.to(self.device), mask.to(self.device), types.to(self.device))
            logits = self._logits(hidden).float().cpu().numpy()
        return [{Task.CLASSIFY: np.array(logits[row], dtype=np.float32)} for row in range(len(batch))]

    def warmup(self) -> None:
        pad = self.backbone.pad_id
        self.forward([WorkItem(Sequence(ids=(pad, pad)), TASKS)])
