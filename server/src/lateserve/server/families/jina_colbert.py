"""Jina XLM-RoBERTa late-interaction family: ColBERTJinaRobertaModel (jinaai/jina-colbert-v2).

Served as vLLM serves it (vllm-spec 1.2) after `--hf-overrides '{"architectures":
["ColBERTJinaRobertaModel"]}'`: text tokenized with the tokenizer's own special tokens
(`<s> ... </s>`), every token's vector returned, last_hidden_state -> `linear` (no bias) -> L2 norm
in float32. The faithful query/document modes (`colbert_encoding`, PyLate's procedure) use the
markers and lengths of artifact.metadata, defaulting to Jina's `[QueryMarker]` / `[DocumentMarker]`
and to attended query expansion tokens (see `faithful_encoder`).

The backbone is transformers' native `JinaEmbeddingsV3Model` (XLM-R with rotary position
embeddings, post-LayerNorm blocks), so Jina's remote code is never needed: `--trust-remote-code` is
accepted, as vLLM requires it for this model, and ignored. Its config is derived from the
checkpoint's XLMRobertaFlashConfig-style config.json (rotary theta from `rotary_emb_base`).
The flash-implementation weight names are renamed by the explicit table `RENAMES` and loaded
strictly: the pooler is skipped (vLLM never runs it), every other checkpoint tensor must be
consumed and every parameter filled, or ModelLoadError names the weights as the file spells them.

LoRA / task adapters: JinaEmbeddingsV3Model has no adapter or task input, and jina-colbert-v2 ships
no LoRA weights, so the plain backbone is what vLLM runs too. A checkpoint with LoRA
parametrizations (jina-embeddings-v3: `...parametrizations.weight.original`, `lora_A`, `lora_B`)
is refused with those names rather than silently merged or dropped.

torch and transformers are imported only inside the runner; the tokenizer is `tokenizer.TextTokenizer`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from collections.abc import Sequence as Seq
from dataclasses import replace
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

from lateserve.server.domain import ModelLoadError, ModelSpec, Sequence, Task, WorkItem
from lateserve.server.families import loading
from lateserve.server.families.base import Family, ModelSource
from lateserve.server.families.batching import TokenEmbedRunner
from lateserve.server.families.colbert import BertProcessor, projection_dim
from lateserve.server.families.colbert_encoding import STANFORD_METADATA, ColbertEncoder
from lateserve.server.families.tokenizer import TextTokenizer

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

ARCHITECTURE = "ColBERTJinaRobertaModel"
PROJECTION_KEYS = ("linear.weight", "colbert_linear.weight")
_PREFIXES = ("model.", "roberta.")  # stripped in this order, as vLLM's ColBERTJinaRobertaModel does
_SKIPPED = ("pooler.",)
DEFAULT_ROTARY_BASE = 10000.0
"""XLMRobertaFlashConfig's default, for a config.json without rotary_emb_base."""
QUERY_MARKER = "[QueryMarker]"
DOCUMENT_MARKER = "[DocumentMarker]"
"""Jina's markers, used by the faithful modes unless artifact.metadata names others."""
_BACKBONE = "roberta"  # the backbone's module name inside the runner, and the prefix files use

RENAMES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("embeddings.word_embeddings.weight", ("embeddings.word_embeddings.weight",)),
    ("embeddings.token_type_embeddings.weight", ("embeddings.token_type_embeddings.weight",)),
    ("emb_ln.{param}", ("embeddings.LayerNorm.{param}",)),
    (
        "encoder.layers.{layer}.mixer.Wqkv.{param}",
        (
            "layers.{layer}.self_attn.q_proj.{param}",
            "layers.{layer}.self_attn.k_proj.{param}",
            "layers.{layer}.self_attn.v_proj.{param}",
        ),
    ),
    ("encoder.layers.{layer}.mixer.out_proj.{param}", ("layers.{layer}.self_attn.o_proj.{param}",)),
    ("encoder.layers.{layer}.norm1.{param}", ("layers.{layer}.post_attention_layernorm.{param}",)),
    ("encoder.layers.{layer}.mlp.fc1.{param}", ("layers.{layer}.mlp.fc1.{param}",)),
    ("encoder.layers.{layer}.mlp.fc2.{param}", ("layers.{layer}.mlp.fc2.{param}",)),
    ("encoder.layers.{layer}.norm2.{param}", ("layers.{layer}.post_mlp_layernorm.{param}",)),
)
"""Flash-implementation name (after the prefixes) -> JinaEmbeddingsV3Model names. `{layer}` is a
layer index, `{param}` weight or bias; a fused Wqkv is split into q, k, v along dim 0 (its rows are
laid out (three, heads, head_dim), as in flash-attn's MHA)."""


def _pattern(template: str) -> re.Pattern[str]:
    escaped = re.escape(template)
    escaped = escaped.replace(re.escape("{layer}"), r"(?P<layer>\d+)").replace(
        re.escape("{param}"), "(?P<param>weight|bias)"
    )
    return re.compile(f"^{escaped}$")


_FORWARD = [(_pattern(jina), natives) for jina, natives in RENAMES]
_INVERSE = [(_pattern(native), jina) for jina, natives in RENAMES for native in natives]


def strip_prefixes(name: str) -> str:
    for prefix in _PREFIXES:
        name = name.removeprefix(prefix)
    return name


def backbone_names(name: str) -> tuple[str, ...] | None:
    """JinaEmbeddingsV3Model names of a flash-implementation name (prefixes stripped), or None."""
    for pattern, natives in _FORWARD:
        match = pattern.match(name)
        if match:
            return tuple(native.format(**match.groupdict()) for native in natives)
    return None


def checkpoint_name(native: str) -> str:
    """The name a checkpoint file uses for a JinaEmbeddingsV3Model parameter (for error messages)."""
    for pattern, jina in _INVERSE:
        match = pattern.match(native)
        if match:
            return f"{_BACKBONE}.{jina.format(**match.groupdict())}"
    return f"{_BACKBONE}.{native}"


def split_checkpoint(state: Mapping[str, T]) -> tuple[dict[str, T], T | None, dict[str, str]]:
    """(backbone entries still under their flash names, the projection or None, unmatched names).

    The pooler is dropped; names neither renamable nor skipped come back in the third dict (stripped
    name -> file name), so the caller reports them.
    """
    backbone: dict[str, T] = {}
    unmatched: dict[str, str] = {}
    projection: T | None = None
    for name, value in state.items():
        short = strip_prefixes(name)
        if short in PROJECTION_KEYS and projection is None:
            projection = value
        elif short.startswith(_SKIPPED):
            continue
        elif backbone_names(short) is not None:
            backbone[short] = value
        else:
            unmatched[short] = name
    return backbone, projection, unmatched


def backbone_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """JinaEmbeddingsV3Config arguments from an XLMRobertaFlashConfig-style config.json.

    Raises ModelLoadError for rotary variants JinaEmbeddingsV3Model cannot express.
    """
    position = config.get("position_embedding_type") or "rotary"  # the flash config's default
    if position != "rotary":
        raise ModelLoadError(
            f"{ARCHITECTURE} needs rotary position embeddings (position_embedding_type {position!r}); "
            "an absolute-position XLM-R is not a Jina XLM-RoBERTa"
        )
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = hidden // heads
    rotary_dim = config.get("rotary_emb_dim")
    if rotary_dim not in (None, head_dim):
        raise ModelLoadError(f"{ARCHITECTURE}: partial rotary (rotary_emb_dim {rotary_dim} != head dim {head_dim})")
    if config.get("rotary_emb_interleaved"):
        raise ModelLoadError(f"{ARCHITECTURE}: interleaved rotary embeddings are not supported")
    if config.get("rotary_emb_scale_base") or config.get("rope_scaling"):
        raise ModelLoadError(f"{ARCHITECTURE}: scaled rotary embeddings are not supported")
    rope = config.get("rope_parameters") or {}
    theta = rope.get("rope_theta") or config.get("rope_theta") or config.get("rotary_emb_base") or DEFAULT_ROTARY_BASE
    return {
        "vocab_size": int(config["vocab_size"]),
        "hidden_size": hidden,
        "num_hidden_layers": int(config["num_hidden_layers"]),
        "num_attention_heads": heads,
        "intermediate_size": int(config["intermediate_size"]),
        "hidden_act": str(config.get("hidden_act", "gelu")),
        "max_position_embeddings": int(config.get("max_position_embeddings", 8194)),
        "type_vocab_size": int(config.get("type_vocab_size", 1)),
        "layer_norm_eps": float(config.get("layer_norm_eps", 1e-5)),
        "pad_token_id": int(config.get("pad_token_id", 1)),
        "bos_token_id": int(config.get("bos_token_id", 0)),
        "eos_token_id": int(config.get("eos_token_id", 2)),
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(theta)},
    }


class JinaColBERT(Family):
    """jina-colbert-v2: JinaEmbeddingsV3Model backbone + `linear` projection, vLLM's raw semantics."""

    architectures = (ARCHITECTURE,)

    def spec(self) -> ModelSpec:
        return ModelSpec.late_interaction(ARCHITECTURE, self._token_dim, self._max_model_len)

    @cached_property
    def _token_dim(self) -> int:
        return projection_dim(self.source, ARCHITECTURE)

    @cached_property
    def _max_model_len(self) -> int:
        return loading.max_model_len(self.source, int(self.source.config.get("max_position_embeddings", 8194)))

    def processor(self) -> BertProcessor:
        # Never remote code, even with --trust-remote-code: config.json's auto_map points at Jina's
        # modeling code, and the (stock XLM-R) tokenizer is plain tokenizer.json data anyway.
        tokenizer = loading.load_tokenizer(self.source.path, trust_remote_code=False)
        vocab_size = int(self.source.config.get("vocab_size") or len(tokenizer))
        return BertProcessor(
            tokenizer,
            architecture=ARCHITECTURE,
            vocab_size=vocab_size,
            max_model_len=self._max_model_len,
            colbert=faithful_encoder(self.source, tokenizer),
            chat_template=self.source.chat_template,
        )

    def runner(self, device: str, dtype: str) -> JinaRunner:
        return JinaRunner(self.source, dim=self._token_dim, device=device, dtype=dtype)


def faithful_encoder(source: ModelSource, tokenizer: TextTokenizer) -> ColbertEncoder:
    """PyLate's query/document encoding with Jina's defaults: `[QueryMarker]` / `[DocumentMarker]`, and
    expansion tokens attended (the model card's `attend_to_expansion_tokens=True`) unless
    artifact.metadata says otherwise through attend_to_mask_tokens."""
    encoder = ColbertEncoder.from_checkpoint(
        source, tokenizer, default_query_prefix=QUERY_MARKER, default_document_prefix=DOCUMENT_MARKER
    )
    metadata = source.read_json(STANFORD_METADATA) if encoder.config.source == STANFORD_METADATA else None
    if metadata is not None and "attend_to_mask_tokens" not in metadata and encoder.config.do_query_expansion:
        encoder = ColbertEncoder(tokenizer, replace(encoder.config, attend_to_expansion_tokens=True))
    return encoder


def _lora_hint(names: Seq[str]) -> str:
    if any("lora_" in n or "parametrizations" in n for n in names):
        return " (LoRA adapters, as in jina-embeddings-v3, are not supported)"
    return ""


class JinaRunner(TokenEmbedRunner):
    """JinaEmbeddingsV3Model with the Jina weights renamed and loaded strictly; float32 head."""

    def __init__(self, source: ModelSource, *, dim: int, device: str, dtype: str) -> None:
        import torch
        from transformers import JinaEmbeddingsV3Config, JinaEmbeddingsV3Model

        if dtype not in ("float32", "float16", "bfloat16"):
            raise ModelLoadError(f"unsupported dtype {dtype!r}; use float32, float16 or bfloat16")
        what = f"{ARCHITECTURE} checkpoint {source.path}"
        config = JinaEmbeddingsV3Config(**backbone_config(source.config))
        config._attn_implementation = "sdpa"
        with loading.skip_weight_init():
            backbone = JinaEmbeddingsV3Model(config, add_pooling_layer=False)
        model = torch.nn.ModuleDict(
            {_BACKBONE: backbone, "linear": torch.nn.Linear(config.hidden_size, dim, bias=False)}
        )

        flash, projection, unmatched = split_checkpoint(loading.load_safetensors(source.path))
        state, names = self._rename(flash, what)
        if projection is not None:
            state["linear.weight"] = projection
            names["linear.weight"] = "linear.weight"
        missing = sorted(set(model.state_dict()) - set(state))
        if missing or unmatched:
            problems = []
            if missing:
                files = {
                    k if k == "linear.weight" else checkpoint_name(k.removeprefix(f"{_BACKBONE}.")) for k in missing
                }
                problems.append(f"missing weights: {loading.describe_keys(files)}")
            if unmatched:
                problems.append(f"unexpected weights: {loading.describe_keys(unmatched.values())}")
            hint = _lora_hint(list(unmatched.values()))
            raise ModelLoadError(f"{what} does not match the model; {'; '.join(problems)}{hint}")
        loading.load_state_dict_strict(model, state, what=what, names=names)  # shapes, and any gap left

        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.pad_id = int(config.pad_token_id if config.pad_token_id is not None else 1)
        model.to(self.device).eval()
        # The head stays float32, as vLLM's head_dtype; so do the rotary frequencies (a bfloat16
        # inv_freq is off by ~0.2%, which turns positions in the thousands by whole radians).
        for child in backbone.children():
            if child is not backbone.rotary_emb:
                child.to(self.dtype)
        self.backbone = backbone
        self.linear = model["linear"]
        self.dim = dim

    @staticmethod
    def _rename(flash: Mapping[str, torch.Tensor], what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Flash names -> `roberta.`-prefixed JinaEmbeddingsV3Model names, with Wqkv split in three."""
        state: dict[str, torch.Tensor] = {}
        names: dict[str, str] = {}
        for short, tensor in flash.items():
            natives = backbone_names(short) or ()
            if len(natives) > 1:
                if tensor.shape[0] % len(natives):
                    raise ModelLoadError(
                        f"{what}: {_BACKBONE}.{short} has {tensor.shape[0]} rows, not a multiple of {len(natives)}"
                    )
                parts = tensor.chunk(len(natives), dim=0)
            else:
                parts = (tensor,)
            for native, part in zip(natives, parts, strict=True):
                state[f"{_BACKBONE}.{native}"] = part.contiguous()
                names[f"{_BACKBONE}.{native}"] = f"{_BACKBONE}.{short}"
        return state, names

    def _embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[batch, width] ids -> [batch, width, dim] float32 token vectors, not yet normalised.

        Right padding keeps each row's rotary positions at 0..n-1, as vLLM numbers every sequence."""
        hidden = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        vectors: torch.Tensor = self.linear(hidden.float())
        return vectors

    def warmup(self) -> None:
        self.forward([WorkItem(Sequence(ids=(self.pad_id, self.pad_id)), frozenset({Task.TOKEN_EMBED}))])
