"""BERT late-interaction family: HF_ColBERT (BERT + `linear` projection) and plain BertModel.

Serves vLLM's raw semantics (vllm-spec 1.2): text tokenized with the tokenizer's own special
tokens, every token's vector returned, last_hidden_state -> linear (no bias) -> L2 norm in float32.
torch and transformers are imported only inside the runner: the processor (server process) tokenizes
with `tokenizer.TextTokenizer` and renders chat messages with `chat_template`.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence as Seq
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

from lateserve.server.domain import (
    EmbeddingMode,
    EncodeOptions,
    InvalidArgument,
    Item,
    ModelLoadError,
    ModelSpec,
    MultiModalItem,
    RenderedChat,
    Role,
    Sequence,
    Task,
    TextItem,
    TokenItem,
    TruncationSide,
    Unimplemented,
    WorkItem,
)
from lateserve.server.families import loading
from lateserve.server.families.base import Family, InputProcessor, ModelSource
from lateserve.server.families.batching import TokenEmbedRunner
from lateserve.server.families.chat_template import ChatRenderer
from lateserve.server.families.colbert_encoding import ColbertEncoder
from lateserve.server.families.tokenizer import Encoded, TextTokenizer
from lateserve.wire import reasons

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

PROJECTION_KEYS = ("linear.weight", "colbert_linear.weight")
_PREFIXES = ("model.", "bert.")  # stripped in this order, as vLLM's ColBERTModel does
_DIM_KEYS = ("colbert_dim", "dim", "projection_dim")
_PROJECTED = frozenset({"HF_ColBERT", "ColBERTModel"})
# transformers writes 1e30 as model_max_length when a tokenizer declares no limit.


def split_checkpoint(state: Mapping[str, T]) -> tuple[dict[str, T], T | None, dict[str, str]]:
    """(backbone entries under BertModel's own names, the projection or None, new name -> file name).

    The BERT pooler is dropped: vLLM never runs it, and its weights are in every Hub checkpoint.
    """
    backbone: dict[str, T] = {}
    origin: dict[str, str] = {}
    projection: T | None = None
    for name, value in state.items():
        short = name
        for prefix in _PREFIXES:
            short = short.removeprefix(prefix)
        if short in PROJECTION_KEYS and projection is None:
            projection = value
        elif not short.startswith("pooler."):
            backbone[short] = value
            origin[short] = name
    return backbone, projection, origin


def projection_dim(source: ModelSource, architecture: str) -> int:
    """The ColBERT projection width: colbert_dim / dim / projection_dim from config, else the
    `linear.weight` shape in the checkpoint (vLLM's order)."""
    configured = next((source.config[k] for k in _DIM_KEYS if source.config.get(k)), None)
    if configured is not None:
        return int(configured)
    _, shape, _ = split_checkpoint(loading.read_safetensors_shapes(source.path))
    if shape is None:
        raise ModelLoadError(f"{architecture} checkpoint {source.path} has no linear.weight projection")
    return shape[0]


class BertColBERT(Family):
    """One family for both layouts: the architecture decides whether a projection is required."""

    architectures = ("HF_ColBERT", "ColBERTModel", "BertModel")

    @cached_property
    def architecture(self) -> str:
        declared = self.source.config.get("architectures") or []
        return next((a for a in declared if a in self.architectures), self.architectures[0])

    @property
    def projected(self) -> bool:
        return self.architecture in _PROJECTED

    def spec(self) -> ModelSpec:
        return ModelSpec.late_interaction(self.architecture, self._token_dim, self._max_model_len)

    @cached_property
    def _token_dim(self) -> int:
        if not self.projected:
            return int(self.source.config["hidden_size"])
        return projection_dim(self.source, self.architecture)

    @cached_property
    def _max_model_len(self) -> int:
        return loading.max_model_len(self.source, int(self.source.config.get("max_position_embeddings", 512)))

    def processor(self) -> BertProcessor:
        tokenizer = loading.load_tokenizer(self.source.path, trust_remote_code=self.source.trust_remote_code)
        vocab_size = int(self.source.config.get("vocab_size") or len(tokenizer))
        # Faithful query/document modes need a ColBERT checkpoint; plain BERT serves raw only.
        colbert = ColbertEncoder.from_checkpoint(self.source, tokenizer) if self.projected else None
        return BertProcessor(
            tokenizer,
            architecture=self.architecture,
            vocab_size=vocab_size,
            max_model_len=self._max_model_len,
            colbert=colbert,
            chat_template=self.source.chat_template,
        )

    def runner(self, device: str, dtype: str) -> BertRunner:
        dim = self._token_dim if self.projected else None
        return BertRunner(self.source, architecture=self.architecture, dim=dim, device=device, dtype=dtype)


class BertProcessor(InputProcessor):
    """Tokenizer side of any text ColBERT: raw mode as vLLM, faithful query/document modes through
    `colbert_encoding` (markers, expansion with its attention mask, skiplist via `keep`).

    Nothing here is BERT-specific; the Sentence-Transformers ColBERT families use it too.
    """

    def __init__(
        self,
        tokenizer: TextTokenizer,
        *,
        architecture: str,
        vocab_size: int,
        max_model_len: int,
        colbert: ColbertEncoder | None = None,
        chat_template: str | None = None,
    ) -> None:
        """`colbert` None: only raw mode (a model that is not a ColBERT checkpoint). `chat_template`:
        the --chat-template value; None uses the checkpoint's own template, if it has one."""
        self._tokenizer = tokenizer
        self._architecture = architecture
        self._vocab_size = vocab_size
        self._max_model_len = max_model_len
        self._colbert = colbert
        self._chat = ChatRenderer(tokenizer, chat_template)

    def encode(self, item: Item, options: EncodeOptions, role: Role) -> Sequence:
        if isinstance(item, MultiModalItem):
            raise Unimplemented(
                f"multimodal input is not supported by {self._architecture}", reason=reasons.UNSUPPORTED_INPUT
            )
        if options.embedding_mode not in (EmbeddingMode.RAW, EmbeddingMode.AUTO):
            if self._colbert is None:
                raise InvalidArgument(
                    f"embedding_mode {options.embedding_mode.value!r} needs a ColBERT checkpoint; "
                    f"{self._architecture} serves 'raw' only",
                    field="embedding_mode",
                )
            return self._colbert.encode(item, options, max_length=self._max_model_len)
        limit = options.truncate_prompt_tokens
        if limit == -1:
            limit = self._max_model_len
        if isinstance(item, TextItem | RenderedChat):  # a chat reaches a text family without images
            ids = self._encode_text(item.text, options.add_special_tokens, limit, options.truncation_side)
        elif isinstance(item, TokenItem):
            ids = _truncate(list(item.ids), limit, options.truncation_side)
            self._check_ids(ids, self._vocab_size, field="input")
        else:
            raise InvalidArgument("chat messages must be rendered before encoding", field="messages")
        return Sequence(ids=tuple(ids), prompt_tokens=len(ids))

    def encode_many(self, items: Seq[Item], options: EncodeOptions, role: Role) -> list[Sequence]:
        """Raw-mode text goes through the tokenizer in one batched call; anything else item by item."""
        raw = options.embedding_mode in (EmbeddingMode.RAW, EmbeddingMode.AUTO)
        if not (raw and len(items) > 1 and all(isinstance(i, TextItem) for i in items)):
            return super().encode_many(items, options, role)
        limit = options.truncate_prompt_tokens
        if limit == -1:
            limit = self._max_model_len
        texts = [item.text for item in items if isinstance(item, TextItem)]
        sequences = []
        for encoded in self._tokenizer.encode_batch(texts, add_special_tokens=options.add_special_tokens):
            ids = self._cut_text(encoded, limit, options.truncation_side)
            sequences.append(Sequence(ids=tuple(ids), prompt_tokens=len(ids)))
        return sequences

    def _encode_text(self, text: str, special: bool, limit: int | None, side: TruncationSide) -> list[int]:
        return self._cut_text(self._tokenizer.encode(text, add_special_tokens=special), limit, side)

    @staticmethod
    def _cut_text(encoded: Encoded, limit: int | None, side: TruncationSide) -> list[int]:
        """vLLM truncates text inside the tokenizer, which drops text tokens and keeps the template's
        special tokens ([CLS] ... [SEP]); only when even those do not fit does it cut the final list."""
        ids = encoded.ids
        if limit is None or len(ids) <= limit:
            return _truncate(ids, limit, side)
        text_positions = [i for i, s in enumerate(encoded.sequence_ids) if s is not None]
        excess = len(ids) - limit
        if excess > len(text_positions):
            return _truncate(ids, limit, side)
        dropped = set(text_positions[:excess] if side is TruncationSide.LEFT else text_positions[-excess:])
        return [t for i, t in enumerate(ids) if i not in dropped]

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def truncate_text(self, text: str, max_tokens: int) -> str:
        return self._tokenizer.truncate_text(text, max_tokens)

    def token_strings(self, ids: Seq[int]) -> list[str]:
        self._check_ids(ids, len(self._tokenizer), field="tokens")
        return [str(t) for t in self._tokenizer.convert_ids_to_tokens(ids)]

    def detokenize(self, ids: Seq[int]) -> str:
        self._check_ids(ids, len(self._tokenizer), field="tokens")
        return self._tokenizer.decode(ids)

    def render_chat(
        self,
        messages: Seq[dict[str, Any]],
        add_generation_prompt: bool,
        *,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The --chat-template, else the checkpoint's own template, applied as transformers applies it."""
        return self._chat.render(
            messages,
            add_generation_prompt,
            continue_final_message=continue_final_message,
            chat_template_kwargs=chat_template_kwargs,
        )

    @staticmethod
    def _check_ids(ids: Seq[int], size: int, *, field: str) -> None:
        """An out-of-range id would crash the embedding lookup for the whole batch, or decode to garbage."""
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise InvalidArgument(f"token id {bad[0]} is out of vocabulary (size {size})", field=field)


def _truncate(ids: list[int], limit: int | None, side: TruncationSide) -> list[int]:
    """vLLM's cut of a token list: left keeps the last `limit` ids, right the first."""
    if limit is None or len(ids) <= limit:
        return ids
    return ids[len(ids) - limit :] if side is TruncationSide.LEFT else ids[:limit]


class BertRunner(TokenEmbedRunner):
    """transformers' BertModel with weights loaded strictly; the head runs in float32 whatever the dtype."""

    def __init__(self, source: ModelSource, *, architecture: str, dim: int | None, device: str, dtype: str) -> None:
        """`dim` None means plain BERT (no head); otherwise the projection must be [dim, hidden]."""
        import torch
        from transformers import BertConfig, BertModel

        if dtype not in ("float32", "float16", "bfloat16"):
            raise ModelLoadError(f"unsupported dtype {dtype!r}; use float32, float16 or bfloat16")
        config = BertConfig.from_dict(dict(source.config))
        config._attn_implementation = "sdpa"
        with loading.skip_weight_init():
            backbone = BertModel(config, add_pooling_layer=False)
        backbone_state, projection, origin = split_checkpoint(loading.load_safetensors(source.path))
        # Old checkpoints carry buffers transformers now recomputes (embeddings.position_ids).
        persistent = set(backbone.state_dict())
        recomputed = {name for name, _ in backbone.named_buffers()} - persistent
        state = {f"bert.{k}": v for k, v in backbone_state.items() if k not in recomputed}
        names = {f"bert.{k}": v for k, v in origin.items()}
        if projection is not None:
            state["linear.weight"] = projection  # unexpected, hence reported, when plain BERT has no head
        modules: dict[str, torch.nn.Module] = {"bert": backbone}
        if dim is not None:
            modules["linear"] = torch.nn.Linear(config.hidden_size, dim, bias=False)
        model = torch.nn.ModuleDict(modules)
        loading.load_state_dict_strict(model, state, what=f"{architecture} checkpoint {source.path}", names=names)

        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.pad_id = int(config.pad_token_id or 0)
        model.to(self.device).eval()
        # The head stays float32, as vLLM's head_dtype. On CPU the backbone runs through oneDNN linears
        # over unpadded tokens, bf16 only inside the matmuls (families/acceleration.py).
        from lateserve.server.families.acceleration import optimize_for_cpu

        self.bert = optimize_for_cpu(backbone, self.dtype) if self.device.type == "cpu" else backbone.to(self.dtype)
        self.linear = modules.get("linear")
        self.dim = dim or int(config.hidden_size)

    def _embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[batch, width] ids -> [batch, width, dim] float32 token vectors, not yet normalised."""
        import torch

        hidden = self.bert(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
        vectors: torch.Tensor = hidden.float()
        return self.linear(vectors) if self.linear is not None else vectors

    def warmup(self) -> None:
        self.forward([WorkItem(Sequence(ids=(self.pad_id, self.pad_id)), frozenset({Task.TOKEN_EMBED}))])
