"""Sentence-Transformers bi-encoders: a BERT or XLM-R `Transformer` module, `Pooling`, optional `Dense` and `Normalize`.

Layout (sentence-transformers/all-MiniLM-L6-v2, BAAI/bge-small-en-v1.5, intfloat/multilingual-e5-small):
config.json declares the bare backbone (`BertModel` / `XLMRobertaModel`) with root-level (or `bert.` /
`roberta.` / `model.` prefixed) keys in model.safetensors; modules.json lists the modules in order:
`Transformer` (path ""), `Pooling` (`1_Pooling/config.json`), then optionally `Dense` (`2_Dense/`, see
`st_dense`) and `Normalize` (`2_Normalize`, no files). sentence_bert_config.json's `max_seq_length`
(which the library truncates to, and vLLM serves as max_model_len) is NOT a serving limit here: the
limit is the backbone's positions (and --max-model-len), so the bundled all-MiniLM-L6-v2 keeps serving
512-token late-interaction inputs as it always has; pass --max-model-len to cap it. It may ask for
lower-cased input (`do_lower_case`, applied to the text before tokenization, as vLLM does).

Tasks, all from one forward pass in float32 heads:

* `embed`: the Pooling module's vector (cls: the first token; mean: the average over attention-masked
  tokens; lasttoken: the last attended token) -> the Dense modules in order -> L2 normalised when
  `WorkItem.normalize` (vLLM's `normalize`, default on). A checkpoint's own `Normalize` module at the end
  is what that default reproduces: `SentenceTransformer.encode` of such a checkpoint equals the default
  output, and `normalize: false` returns the unnormalised vector as vLLM does. A `Normalize` module
  followed by more modules is applied where it stands. `embed_normalize_default` says what the checkpoint
  itself asks for (False when modules.json has no trailing Normalize).
* `token_embed`: every token's last hidden state (through the Dense modules when there are any, as vLLM's
  Sentence-Transformers projector), L2 normalised when `WorkItem.normalize`: for the plain BERT of
  all-MiniLM-L6-v2 exactly what `colbert.BertColBERT` serves (same backbone, same CPU path).

Registry: `BertModel` and `XLMRobertaModel` go through `encoder_family`, which picks this family when
modules.json declares a Pooling module and otherwise `colbert.BertColBERT` (plain BERT served as late
interaction). torch and transformers are imported only in the runner.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from lateserve.server.domain import (
    EncodeOptions,
    Item,
    ItemOutputs,
    ModelKind,
    ModelLoadError,
    ModelSpec,
    Role,
    Sequence,
    Task,
    TextItem,
    UnsupportedTask,
    WorkItem,
)
from lateserve.server.families import loading
from lateserve.server.families.base import Family, ModelRunner, ModelSource
from lateserve.server.families.batching import pad_batch
from lateserve.server.families.colbert import BertProcessor
from lateserve.server.families.st_dense import DENSE_TYPES, DenseLayer, find_dense_layers

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

TASKS = frozenset({Task.EMBED, Task.TOKEN_EMBED})
# Declared architecture -> transformers model_type of the backbone.
BACKBONES: dict[str, str] = {"BertModel": "bert", "XLMRobertaModel": "xlm-roberta"}
POOLING_MODES = ("cls", "mean", "lasttoken")
# Legacy 1_Pooling/config.json booleans (every Hub checkpoint) -> the mode names Sentence-Transformers 5+ saves.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_PREFIXES = ("model.", "bert.", "roberta.")
_BGE_M3_HEADS = ("colbert_linear.pt", "sparse_linear.pt")


def _module_kind(entry: Any) -> str:
    """'Transformer', 'Pooling', 'Normalize', 'Dense' or the declared type, for a modules.json entry.

    Sentence-Transformers 2-4 write `sentence_transformers.models.Pooling`, 5+ the same class under
    `sentence_transformers.<...>.modules.<module>.Pooling`; both name the class last."""
    declared = str(entry.get("type") or "") if isinstance(entry, dict) else ""
    if declared in DENSE_TYPES:
        return "Dense"
    name = declared.rsplit(".", 1)[-1]
    if declared.startswith("sentence_transformers.") and name in ("Transformer", "Pooling", "Normalize"):
        return name
    return declared or "(no type)"


def has_st_pooling(source: ModelSource) -> bool:
    """modules.json declares a Sentence-Transformers Pooling module (the checkpoint is a bi-encoder)."""
    modules = source.read_json("modules.json") if (source.path / "modules.json").is_file() else None
    return isinstance(modules, list) and any(_module_kind(e) == "Pooling" for e in modules)


def encoder_family(source: ModelSource) -> Family:
    """Registry entry of `BertModel` / `XLMRobertaModel`: a Sentence-Transformers bi-encoder when modules.json
    has a Pooling module, else BERT's normalised token states as late interaction (the bundled default's
    historical serving; the server's score-type flag decides how it scores)."""
    declared = source.config.get("architectures") or []
    architecture = next((a for a in declared if a in BACKBONES), "BertModel")
    if architecture == "XLMRobertaModel" and all((source.path / f).is_file() for f in _BGE_M3_HEADS):
        raise ModelLoadError(
            f"{source.path} declares XLMRobertaModel but carries the BGE-M3 heads ({', '.join(_BGE_M3_HEADS)}); "
            'serve it with --hf-overrides \'{"architectures": ["BgeM3EmbeddingModel"]}\''
        )
    if has_st_pooling(source):
        return StEmbed(source)
    if architecture == "BertModel":
        from lateserve.server.families.colbert import BertColBERT

        return BertColBERT(source)
    raise ModelLoadError(
        f"unsupported architecture {architecture} without a Sentence-Transformers Pooling module "
        f"(modules.json + 1_Pooling/config.json) in {source.path}; set the family with --hf-overrides "
        '\'{"architectures": ["..."]}\''
    )


@dataclass(frozen=True, slots=True)
class Step:
    """One module after Pooling: a Dense layer, or a Normalize applied where it stands."""

    kind: str
    dense: DenseLayer | None = None


@dataclass(frozen=True, slots=True)
class Pipeline:
    """What modules.json declares after the Transformer module."""

    pooling: str
    steps: tuple[Step, ...]
    normalize_last: bool
    """A Normalize module ends the chain (what `WorkItem.normalize` reproduces)."""

    @property
    def dense(self) -> list[DenseLayer]:
        return [s.dense for s in self.steps if s.dense is not None]


def read_pooling_mode(source: ModelSource, folder: str) -> str:
    """The single pooling mode of `<folder>/config.json`; ModelLoadError for any other configuration."""
    file = f"{folder}/config.json"
    config = source.read_json(file)
    if config is None:
        raise ModelLoadError(f"the Pooling module's {source.path / file} is missing")
    declared = config.get("pooling_mode")
    if declared is not None:
        modes = [declared] if isinstance(declared, str) else list(declared)
    else:
        modes = [mode for key, mode in _LEGACY_POOLING_KEYS.items() if config.get(key) is True]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ModelLoadError(
            f"{source.path / file}: pooling {modes or '(none)'} is not supported; "
            f"exactly one of {', '.join(POOLING_MODES)} is"
        )
    if config.get("include_prompt") is False:
        raise ModelLoadError(f"{source.path / file}: include_prompt false (prompt tokens left out) is not supported")
    return str(modes[0])


def read_pipeline(source: ModelSource, hidden: int) -> Pipeline:
    """Transformer (path "") first, one Pooling, then Dense / Normalize modules; anything else is refused."""
    modules = source.read_json("modules.json") if (source.path / "modules.json").is_file() else None
    entries: list[Any] = modules if isinstance(modules, list) else []
    kinds = [_module_kind(e) for e in entries]
    if not kinds or kinds[0] != "Transformer" or str(entries[0].get("path") or "") != "":
        raise ModelLoadError(f'{source.path}/modules.json must start with a Transformer module at path ""')
    if kinds.count("Pooling") != 1 or kinds[1] != "Pooling":
        raise ModelLoadError(
            f"{source.path}/modules.json must have exactly one Pooling module, right after Transformer"
        )
    unknown = [k for k in kinds[2:] if k not in ("Dense", "Normalize")]
    if unknown:
        raise ModelLoadError(
            f"{source.path}/modules.json: module {unknown[0]} is not supported (after Pooling: Dense, Normalize)"
        )
    pooling = read_pooling_mode(source, str(entries[1].get("path") or "1_Pooling"))
    layers = iter(find_dense_layers(source))
    steps = tuple(Step("Dense", next(layers)) if k == "Dense" else Step("Normalize") for k in kinds[2:])
    width = hidden
    for step in steps:
        if step.dense is not None:
            if step.dense.in_features != width:
                raise ModelLoadError(
                    f"Dense module {step.dense.name} takes {step.dense.in_features} features, but gets {width}"
                )
            width = step.dense.out_features
    normalize_last = bool(steps) and steps[-1].kind == "Normalize"
    return Pipeline(pooling, steps[:-1] if normalize_last else steps, normalize_last)


def split_backbone(state: Mapping[str, T]) -> tuple[dict[str, T], dict[str, str]]:
    """(backbone entries under the bare model's names, new name -> file name); the pooler is kept."""
    backbone: dict[str, T] = {}
    origin: dict[str, str] = {}
    for name, value in state.items():
        short = name
        for prefix in _PREFIXES:
            short = short.removeprefix(prefix)
        backbone[short] = value
        origin[short] = name
    return backbone, origin


class StEmbed(Family):
    """A Sentence-Transformers bi-encoder on a BERT or XLM-R backbone."""

    architectures = tuple(BACKBONES)

    @cached_property
    def architecture(self) -> str:
        declared = self.source.config.get("architectures") or []
        return next((a for a in declared if a in BACKBONES), self.architectures[0])

    @cached_property
    def xlmr(self) -> bool:
        return self.architecture == "XLMRobertaModel" or self.source.config.get("model_type") == "xlm-roberta"

    @cached_property
    def _hidden(self) -> int:
        return int(self.source.config["hidden_size"])

    @cached_property
    def pipeline(self) -> Pipeline:
        return read_pipeline(self.source, self._hidden)

    @cached_property
    def _sbert(self) -> dict[str, Any]:
        return self.source.read_json("sentence_bert_config.json") or {}

    @property
    def embed_normalize_default(self) -> bool:
        """What `SentenceTransformer.encode` does by default: normalise when modules.json ends with Normalize."""
        return self.pipeline.normalize_last

    @cached_property
    def _dim(self) -> int:
        dense = self.pipeline.dense
        return dense[-1].out_features if dense else self._hidden

    @cached_property
    def _max_model_len(self) -> int:
        return encoder_max_model_len(self.source, self.xlmr)

    def spec(self) -> ModelSpec:
        return ModelSpec(
            architecture=self.architecture,
            kind=ModelKind.BI_ENCODER,
            tasks=TASKS,
            default_task=Task.EMBED,
            token_dim=self._dim,
            embed_dim=self._dim,
            max_model_len=self._max_model_len,
        )

    def processor(self) -> StEmbedProcessor:
        tokenizer = loading.load_tokenizer(self.source.path, trust_remote_code=self.source.trust_remote_code)
        return StEmbedProcessor(
            tokenizer,
            architecture=self.architecture,
            vocab_size=int(self.source.config.get("vocab_size") or len(tokenizer)),
            max_model_len=self._max_model_len,
            lower_case=bool(self._sbert.get("do_lower_case")),
        )

    def runner(self, device: str, dtype: str) -> StEmbedRunner:
        return StEmbedRunner(
            self.source,
            architecture=self.architecture,
            pipeline=self.pipeline,
            xlmr=self.xlmr,
            device=device,
            dtype=dtype,
        )


def encoder_max_model_len(source: ModelSource, xlmr: bool, max_seq_length: Any = None) -> int:
    """Positions the backbone has (XLM-R numbers real tokens from padding_idx + 1), the tokenizer's and
    --max-model-len limits, and the Sentence-Transformers max_seq_length when given."""
    config = source.config
    positions = int(config.get("max_position_embeddings", 514 if xlmr else 512))
    if xlmr:
        positions -= int(config.get("pad_token_id", 1)) + 1
    limit = loading.max_model_len(source, positions)
    if isinstance(max_seq_length, int) and max_seq_length > 0:
        limit = min(limit, max_seq_length)
    return limit


class StEmbedProcessor(BertProcessor):
    """vLLM's raw encoding (the tokenizer's own special tokens), lower-casing text first when
    sentence_bert_config.json says do_lower_case."""

    def __init__(self, tokenizer: Any, *, architecture: str, vocab_size: int, max_model_len: int, lower_case: bool):
        super().__init__(tokenizer, architecture=architecture, vocab_size=vocab_size, max_model_len=max_model_len)
        self._lower_case = lower_case

    def _text(self, item: Item) -> Item:
        return TextItem(item.text.lower()) if self._lower_case and isinstance(item, TextItem) else item

    def encode(self, item: Item, options: EncodeOptions, role: Role) -> Sequence:
        return super().encode(self._text(item), options, role)

    def encode_many(self, items: Seq[Item], options: EncodeOptions, role: Role) -> list[Sequence]:
        return super().encode_many([self._text(i) for i in items], options, role)


class EncoderBackbone:
    """transformers' BertModel / XLMRobertaModel loaded strictly from the checkpoint, run through the CPU
    fast path on CPU (families/acceleration.py), returning float32 last hidden states.

    `pooler` True also loads BERT's pooler (cross-encoders run it); it is then `self.pooler`, in float32.
    `extra` are further modules (heads) loaded in the same strict pass, under their own names."""

    def __init__(
        self,
        source: ModelSource,
        *,
        xlmr: bool,
        device: str,
        dtype: str,
        what: str,
        pooler: bool = False,
        state: Mapping[str, torch.Tensor] | None = None,
        extra: Mapping[str, torch.nn.Module] | None = None,
        extra_state: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        import torch
        from transformers import BertConfig, BertModel, XLMRobertaConfig, XLMRobertaModel

        if dtype not in ("float32", "float16", "bfloat16"):
            raise ModelLoadError(f"unsupported dtype {dtype!r}; use float32, float16 or bfloat16")
        settings = dict(source.config)
        backbone: BertModel | XLMRobertaModel
        with loading.skip_weight_init():
            if xlmr:
                xlmr_config = XLMRobertaConfig.from_dict(settings)
                xlmr_config._attn_implementation = "sdpa"
                backbone = XLMRobertaModel(xlmr_config, add_pooling_layer=pooler)
            else:
                bert_config = BertConfig.from_dict(settings)
                bert_config._attn_implementation = "sdpa"
                backbone = BertModel(bert_config, add_pooling_layer=pooler)
        config = backbone.config
        tensors = loading.load_safetensors(source.path) if state is None else state
        short, origin = split_backbone(tensors)
        persistent = set(backbone.state_dict())
        recomputed = {name for name, _ in backbone.named_buffers()} - persistent
        weights: dict[str, torch.Tensor] = {}
        names: dict[str, str] = {}
        for key, value in short.items():
            if key in recomputed or (not pooler and key.startswith("pooler.")):
                continue  # vLLM never runs the pooler of an embedding model; old exports carry recomputed buffers
            weights[f"backbone.{key}"] = value
            names[f"backbone.{key}"] = origin[key]
        for key, value in (extra_state or {}).items():
            weights[key] = value
            names[key] = key
        modules: dict[str, torch.nn.Module] = {"backbone": backbone, **(extra or {})}
        model = torch.nn.ModuleDict(modules)
        loading.load_state_dict_strict(model, weights, what=what, names=names)

        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.xlmr = xlmr
        self.pad_id = int(config.pad_token_id if config.pad_token_id is not None else (1 if xlmr else 0))
        self.hidden = int(config.hidden_size)
        model.to(self.device).eval()
        self.pooler = backbone.pooler.float() if pooler and backbone.pooler is not None else None
        if pooler:
            backbone.pooler = None  # run separately in float32; the fast path computes the encoder only
        from lateserve.server.families.acceleration import optimize_for_cpu

        self.model = optimize_for_cpu(backbone, self.dtype) if self.device.type == "cpu" else backbone.to(self.dtype)

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, token_types: torch.Tensor | None) -> torch.Tensor:
        """[batch, width] -> [batch, width, hidden] float32. XLM-R positions count from padding_idx + 1 over
        the attended tokens (from the mask, so an input holding the pad id keeps its positions)."""
        import torch

        types = torch.zeros_like(ids) if token_types is None else token_types
        if self.xlmr:
            positions = torch.where(mask.bool(), torch.cumsum(mask, dim=1) + self.pad_id, self.pad_id)
            out = self.model(input_ids=ids, attention_mask=mask, token_type_ids=types, position_ids=positions)
        else:
            out = self.model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        hidden: torch.Tensor = out.last_hidden_state.float()
        return hidden


class StEmbedRunner(ModelRunner):
    """The backbone, the Pooling module and the Dense chain in float32 (vLLM's head_dtype)."""

    def __init__(
        self, source: ModelSource, *, architecture: str, pipeline: Pipeline, xlmr: bool, device: str, dtype: str
    ) -> None:

        from lateserve.server.families.st_dense import build_projector

        self.backbone = EncoderBackbone(
            source, xlmr=xlmr, device=device, dtype=dtype, what=f"{architecture} checkpoint {source.path}"
        )
        self.device = self.backbone.device
        self.pipeline = pipeline
        self.steps: list[torch.nn.Module | None] = [
            build_projector([s.dense]).to(self.device).eval() if s.dense is not None else None for s in pipeline.steps
        ]
        self.dim = pipeline.dense[-1].out_features if pipeline.dense else self.backbone.hidden

    def _project(self, x: torch.Tensor, *, tokens: bool) -> torch.Tensor:
        """The modules after Pooling; on token vectors only the Dense layers (vLLM's projector)."""
        import torch.nn.functional as F

        for module in self.steps:
            if module is not None:
                x = module(x)
            elif not tokens:
                x = F.normalize(x, p=2, dim=-1)
        return x

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One sequence's [length, hidden] states and [length] mask -> [hidden], as Sentence-Transformers pools."""
        import torch

        mode = self.pipeline.pooling
        attended = mask.nonzero().squeeze(1)
        if mode == "cls":
            return hidden[attended[0]] if attended.numel() else hidden[0]
        if mode == "lasttoken":
            return hidden[attended[-1]] if attended.numel() else torch.zeros_like(hidden[0])
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        total: torch.Tensor = (hidden * weights).sum(dim=0) / weights.sum().clamp(min=1e-9)
        return total

    def forward(self, batch: Seq[WorkItem]) -> list[ItemOutputs]:
        import torch
        import torch.nn.functional as F

        for item in batch:
            if item.tasks - TASKS:
                raise UnsupportedTask(f"this model computes embed and token_embed, not {sorted(item.tasks)}")
        if not batch:
            return []
        ids, mask, lengths = pad_batch(batch, self.backbone.pad_id)
        outputs: list[ItemOutputs] = []
        with torch.inference_mode():
            hidden = self.backbone(ids.to(self.device), mask.to(self.device), None) if ids.shape[1] else None
            for row, item in enumerate(batch):
                n = lengths[row]
                states = hidden[row, :n] if hidden is not None else torch.zeros((0, self.backbone.hidden))
                out: ItemOutputs = {}
                if Task.EMBED in item.tasks:
                    row_mask = mask[row, :n].to(states.device)
                    vector = self._project(
                        self._pool(states, row_mask) if n else states.new_zeros(states.shape[1]), tokens=False
                    )
                    if item.normalize:
                        vector = F.normalize(vector, p=2, dim=-1)
                    out[Task.EMBED] = _numpy(vector)
                if Task.TOKEN_EMBED in item.tasks:
                    rows = self._project(states, tokens=True) if self.pipeline.dense else states
                    if item.sequence.keep is not None:
                        rows = rows[list(item.sequence.keep)]
                    if item.normalize:
                        rows = F.normalize(rows, p=2, dim=-1)
                    out[Task.TOKEN_EMBED] = _numpy(rows)
                outputs.append(out)
        return outputs

    def warmup(self) -> None:
        pad = self.backbone.pad_id
        self.forward([WorkItem(Sequence(ids=(pad, pad)), TASKS)])


def _numpy(tensor: torch.Tensor) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.array(tensor.detach().cpu().numpy(), dtype=np.float32)
