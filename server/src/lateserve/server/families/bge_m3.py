"""BGE-M3 (`BgeM3EmbeddingModel`): an XLM-R encoder with dense, sparse and multi-vector heads.

BAAI/bge-m3 declares `XLMRobertaModel`; as with vLLM it is served as BGE-M3 only when asked:
`--hf-overrides '{"architectures": ["BgeM3EmbeddingModel"]}'` (vllm-spec 1.6). Heads, all in
float32 on the last hidden state of one forward pass, whatever tasks a batch item asks for:

* `embed`: the first (CLS, `<s>`) token's state, L2-normalised (the dense vector);
* `token_embed`: `colbert_linear` (hidden -> hidden, with bias, from `colbert_linear.pt`) on every
  token, L2-normalised, the leading BOS dropped and the EOS kept (FlagEmbedding's colbert vectors);
* `token_classify`: relu(`sparse_linear`) (hidden -> 1, from `sparse_linear.pt`) per token,
  squeezed to 1-D, the leading BOS and the trailing EOS dropped (relu only when use_activation,
  which travels as WorkItem.normalize).

Kind bi-encoder: /score and /rerank default to the dense cosine, as vLLM; `score_mode` picks
FlagEmbedding's other scores (see engine/pairs.py). torch and transformers are imported only in
the runner.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lateserve.server.domain import (
    ItemOutputs,
    LexicalSpec,
    ModelKind,
    ModelLoadError,
    ModelSpec,
    Sequence,
    Task,
    UnsupportedTask,
    WorkItem,
    trimmed_span,
)
from lateserve.server.families import loading
from lateserve.server.families.base import Family, ModelRunner, ModelSource
from lateserve.server.families.batching import pad_batch
from lateserve.server.families.colbert import BertProcessor
from lateserve.server.families.tokenizer import TextTokenizer

if TYPE_CHECKING:
    import torch

ARCHITECTURE = "BgeM3EmbeddingModel"
TASKS = frozenset({Task.EMBED, Task.TOKEN_EMBED, Task.TOKEN_CLASSIFY})
SCORE_MODES = ("dense", "sparse", "colbert", "weighted")
HEAD_FILES = {"colbert_linear": "colbert_linear.pt", "sparse_linear": "sparse_linear.pt"}
_PREFIX = "roberta."  # some exports nest the backbone; BAAI/bge-m3 uses root keys


def _head_files_present(model_dir: Path) -> None:
    missing = [name for name in HEAD_FILES.values() if not (model_dir / name).is_file()]
    if missing:
        raise ModelLoadError(
            f"{ARCHITECTURE} checkpoint {model_dir} is missing {', '.join(missing)}: BGE-M3 needs "
            "colbert_linear.pt (token_embed head) and sparse_linear.pt (token_classify head) beside its weights"
        )


class BgeM3(Family):
    """BAAI/bge-m3 layout: root XLMRobertaModel weights plus the two `.pt` heads."""

    architectures = (ARCHITECTURE,)

    @cached_property
    def _tokenizer(self) -> TextTokenizer:
        return loading.load_tokenizer(self.source.path, trust_remote_code=self.source.trust_remote_code)

    @cached_property
    def _hidden(self) -> int:
        return int(self.source.config["hidden_size"])

    @cached_property
    def _max_model_len(self) -> int:
        config = self.source.config
        # XLM-R positions start at padding_idx + 1, so two position slots are never used by tokens.
        offset = int(config.get("pad_token_id", 1)) + 1
        return loading.max_model_len(self.source, int(config.get("max_position_embeddings", 514)) - offset)

    def lexical_spec(self) -> LexicalSpec:
        """BOS/EOS from config.json (as vLLM's BOSEOSFilter); skipped ids as FlagEmbedding's unused_tokens."""
        config, tok = self.source.config, self._tokenizer
        skip = {tok.cls_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
        return LexicalSpec(
            bos_token_id=_int_or_none(config.get("bos_token_id", tok.bos_token_id)),
            eos_token_id=_int_or_none(config.get("eos_token_id", tok.eos_token_id)),
            skip_ids=frozenset(int(i) for i in skip if isinstance(i, int)),
        )

    def spec(self) -> ModelSpec:
        _head_files_present(self.source.path)
        return ModelSpec(
            architecture=ARCHITECTURE,
            kind=ModelKind.BI_ENCODER,
            tasks=TASKS,
            default_task=Task.TOKEN_EMBED,  # vLLM's /pooling default: token_embed when supported
            token_dim=self._hidden,
            embed_dim=self._hidden,
            max_model_len=self._max_model_len,
            score_modes=SCORE_MODES,
            lexical=self.lexical_spec(),
        )

    def processor(self) -> BertProcessor:
        vocab_size = int(self.source.config.get("vocab_size") or len(self._tokenizer))
        return BertProcessor(
            self._tokenizer,
            architecture=ARCHITECTURE,
            vocab_size=vocab_size,
            max_model_len=self._max_model_len,
            chat_template=self.source.chat_template,
        )

    def runner(self, device: str, dtype: str) -> BgeM3Runner:
        lexical = self.lexical_spec()
        return BgeM3Runner(
            self.source,
            device=device,
            dtype=dtype,
            bos_token_id=lexical.bos_token_id,
            eos_token_id=lexical.eos_token_id,
        )


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and value >= 0 else None


def load_head(model_dir: Path, name: str) -> dict[str, torch.Tensor]:
    """A head's state dict from `<name>.pt` (weights_only: never unpickles code)."""
    import torch

    file = model_dir / HEAD_FILES[name]
    if not file.is_file():
        _head_files_present(model_dir)
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {file}: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{file} is not a state dict of tensors (expected weight and bias)")
    return {str(k): v for k, v in state.items()}


class BgeM3Runner(ModelRunner):
    """transformers' XLMRobertaModel plus the two heads, all loaded strictly."""

    def __init__(
        self,
        source: ModelSource,
        *,
        device: str,
        dtype: str,
        bos_token_id: int | None,
        eos_token_id: int | None,
    ) -> None:
        import torch
        from transformers import XLMRobertaConfig, XLMRobertaModel

        if dtype not in ("float32", "float16", "bfloat16"):
            raise ModelLoadError(f"unsupported dtype {dtype!r}; use float32, float16 or bfloat16")
        config = XLMRobertaConfig.from_dict(dict(source.config))
        config._attn_implementation = "sdpa"
        hidden = int(config.hidden_size)
        with loading.skip_weight_init():
            backbone = XLMRobertaModel(config, add_pooling_layer=False)
        modules: dict[str, torch.nn.Module] = {
            "model": backbone,
            "colbert_linear": torch.nn.Linear(hidden, hidden),
            "sparse_linear": torch.nn.Linear(hidden, 1),
        }
        model = torch.nn.ModuleDict(modules)

        persistent = set(backbone.state_dict())
        recomputed = {name for name, _ in backbone.named_buffers()} - persistent
        state: dict[str, torch.Tensor] = {}
        names: dict[str, str] = {}
        for name, tensor in loading.load_safetensors(source.path).items():
            short = name.removeprefix(_PREFIX)
            if short.startswith("pooler.") or short in recomputed:
                continue  # vLLM never runs the pooler; old exports carry recomputed buffers
            state[f"model.{short}"] = tensor
            names[f"model.{short}"] = name
        for head in HEAD_FILES:
            for key, tensor in load_head(source.path, head).items():
                state[f"{head}.{key}"] = tensor
                names[f"{head}.{key}"] = f"{HEAD_FILES[head]}:{key}"
        loading.load_state_dict_strict(model, state, what=f"{ARCHITECTURE} checkpoint {source.path}", names=names)

        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        model.to(self.device).eval()
        backbone.to(self.dtype)  # the heads stay float32, as vLLM's head_dtype
        self.model = backbone
        self.colbert_linear = modules["colbert_linear"]
        self.sparse_linear = modules["sparse_linear"]
        self.hidden = hidden
        self.pad_id = int(config.pad_token_id if config.pad_token_id is not None else 1)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

    def forward(self, batch: Seq[WorkItem]) -> list[ItemOutputs]:
        import torch

        for item in batch:
            if item.tasks - TASKS:
                raise UnsupportedTask(
                    f"{ARCHITECTURE} computes embed, token_embed and token_classify, not {sorted(item.tasks)}"
                )
        if not batch:
            return []
        ids, mask, lengths = pad_batch(batch, self.pad_id)
        width = ids.shape[1]
        wanted = frozenset().union(*(item.tasks for item in batch))
        with torch.inference_mode():
            hidden = self._hidden(ids.to(self.device), mask.to(self.device)) if width else None
            colbert = self.colbert_linear(hidden) if hidden is not None and Task.TOKEN_EMBED in wanted else None
            sparse = (
                self.sparse_linear(hidden).squeeze(-1) if hidden is not None and Task.TOKEN_CLASSIFY in wanted else None
            )
            return [self._outputs(item, row, lengths[row], hidden, colbert, sparse) for row, item in enumerate(batch)]

    def _hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[batch, width] -> [batch, width, hidden] float32; positions as XLM-R numbers them
        (padding_idx + 1 onwards for real tokens), from the mask rather than the ids, so an
        input that contains the pad id keeps its positions."""
        import torch

        positions = torch.where(mask.bool(), torch.cumsum(mask, dim=1) + self.pad_id, self.pad_id)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, token_type_ids=torch.zeros_like(ids)
        )
        hidden: torch.Tensor = out.last_hidden_state.float()
        return hidden

    def _outputs(
        self,
        item: WorkItem,
        row: int,
        length: int,
        hidden: torch.Tensor | None,
        colbert: torch.Tensor | None,
        sparse: torch.Tensor | None,
    ) -> ItemOutputs:
        import torch
        import torch.nn.functional as F

        ids = item.sequence.ids
        start, end = trimmed_span(ids, self.bos_token_id, self.eos_token_id)
        outputs: ItemOutputs = {}
        if Task.EMBED in item.tasks:
            dense = hidden[row, 0] if hidden is not None and length else torch.zeros(self.hidden)
            if item.normalize:
                dense = F.normalize(dense, p=2, dim=-1)
            outputs[Task.EMBED] = _numpy(dense)
        if Task.TOKEN_EMBED in item.tasks:
            vectors = colbert[row, :length] if colbert is not None else torch.zeros((0, self.hidden))
            if item.normalize:
                vectors = F.normalize(vectors, p=2, dim=-1)
            outputs[Task.TOKEN_EMBED] = _numpy(vectors[start:])  # BOS dropped, EOS kept (vLLM, FlagEmbedding)
        if Task.TOKEN_CLASSIFY in item.tasks:
            weights = sparse[row, :length] if sparse is not None else torch.zeros(0)
            if item.normalize:  # use_activation
                weights = torch.relu(weights)
            outputs[Task.TOKEN_CLASSIFY] = _numpy(weights[start:end])
        return outputs

    def warmup(self) -> None:
        ids = tuple(i for i in (self.bos_token_id, self.eos_token_id) if i is not None) or (self.pad_id,)
        self.forward([WorkItem(Sequence(ids=ids), TASKS)])


def _numpy(tensor: torch.Tensor) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.array(tensor.detach().cpu().numpy(), dtype=np.float32)
