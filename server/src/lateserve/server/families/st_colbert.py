"""Sentence-Transformers/PyLate ColBERT checkpoints: ColBERTModernBertModel and ColBERTLfm2Model.

Layout (lightonai/GTE-ModernColBERT-v1, LiquidAI/LFM2-ColBERT-350M): config.json declares the bare
backbone (`ModernBertModel` / `Lfm2Model`), `model.safetensors` holds its root-level keys (an optional
`model.` prefix is stripped, as vLLM does), and the projection lives in a Sentence-Transformers Dense
module (`1_Dense/`, found through modules.json; see `st_dense`). vLLM takes a `linear.weight` from
the main checkpoint first, and so does this family. Because config.json names the backbone, the
family is chosen with `--hf-overrides '{"architectures": ["ColBERTModernBertModel"]}'`, as in vLLM.

Raw mode (vLLM): every token of the tokenizer's own encoding, backbone last hidden state -> Dense
chain in float32 -> L2 normalise. Faithful query/document modes follow PyLate through
`colbert_encoding` (prefixes "[Q] " / "[D] " unless config_sentence_transformers.json says otherwise).
The backbone is transformers' own class for the config's model_type, built from config.json and
loaded strictly. torch and transformers are imported only in the runner.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

from lateserve.server.domain import ModelLoadError, ModelSpec
from lateserve.server.families import loading
from lateserve.server.families.base import Family, ModelSource
from lateserve.server.families.colbert import BertProcessor, BertRunner
from lateserve.server.families.colbert_encoding import PYLATE_DOCUMENT_PREFIX, PYLATE_QUERY_PREFIX, ColbertEncoder
from lateserve.server.families.st_dense import DenseLayer, build_projector, find_dense_layers

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

# architecture -> the model_type its config.json must declare (the transformers backbone).
BACKBONES: dict[str, str] = {"ColBERTModernBertModel": "modernbert", "ColBERTLfm2Model": "lfm2"}
PROJECTION_KEYS = ("linear.weight", "colbert_linear.weight")


def split_checkpoint(state: Mapping[str, T]) -> tuple[dict[str, T], T | None, dict[str, str]]:
    """(backbone entries under the backbone's own names, a main-checkpoint projection or None, name -> file name)."""
    backbone: dict[str, T] = {}
    origin: dict[str, str] = {}
    projection: T | None = None
    for name, value in state.items():
        short = name.removeprefix("model.")
        if short in PROJECTION_KEYS and projection is None:
            projection = value
        else:
            backbone[short] = value
            origin[short] = name
    return backbone, projection, origin


class StColBERT(Family):
    """Both architectures: they differ only in the transformers backbone."""

    architectures = tuple(BACKBONES)

    @cached_property
    def architecture(self) -> str:
        declared = self.source.config.get("architectures") or []
        return next((a for a in declared if a in BACKBONES), self.architectures[0])

    @cached_property
    def model_type(self) -> str:
        expected = BACKBONES[self.architecture]
        found = self.source.config.get("model_type")
        if found != expected:
            raise ModelLoadError(
                f"{self.architecture} needs a {expected!r} backbone, but {self.source.path}/config.json "
                f"has model_type {found!r}"
            )
        return expected

    def spec(self) -> ModelSpec:
        _ = self.model_type
        return ModelSpec.late_interaction(self.architecture, self._token_dim, self._max_model_len)

    @cached_property
    def _main_projection(self) -> tuple[int, ...] | None:
        _, shape, _ = split_checkpoint(loading.read_safetensors_shapes(self.source.path))
        return shape

    @cached_property
    def _dense(self) -> list[DenseLayer]:
        """The Dense chain; [] when the main checkpoint carries the projection (it wins, as in vLLM)."""
        if self._main_projection is not None:
            return []
        layers = find_dense_layers(self.source)
        if not layers:
            raise ModelLoadError(
                f"{self.architecture} checkpoint {self.source.path} has no projection: no linear.weight in "
                "model.safetensors and no Dense module (1_Dense) in modules.json"
            )
        hidden = int(self.source.config["hidden_size"])
        if layers[0].in_features != hidden:
            raise ModelLoadError(
                f"Dense module {layers[0].name} takes {layers[0].in_features} features, "
                f"but the backbone's hidden_size is {hidden}"
            )
        return layers

    @cached_property
    def _token_dim(self) -> int:
        if self._main_projection is not None:
            return self._main_projection[0]
        return self._dense[-1].out_features

    @cached_property
    def _max_model_len(self) -> int:
        """vLLM: sentence_bert_config.json max_seq_length replaces max_position_embeddings when present."""
        sbert = self.source.read_json("sentence_bert_config.json") or {}
        positions = sbert.get("max_seq_length") or self.source.config.get("max_position_embeddings", 512)
        return loading.max_model_len(self.source, int(positions))

    def processor(self) -> BertProcessor:
        tokenizer = loading.load_tokenizer(self.source.path, trust_remote_code=self.source.trust_remote_code)
        colbert = ColbertEncoder.from_checkpoint(
            self.source,
            tokenizer,
            default_query_prefix=PYLATE_QUERY_PREFIX,
            default_document_prefix=PYLATE_DOCUMENT_PREFIX,
        )
        return BertProcessor(
            tokenizer,
            architecture=self.architecture,
            vocab_size=int(self.source.config.get("vocab_size") or len(tokenizer)),
            max_model_len=self._max_model_len,
            colbert=colbert,
            chat_template=self.source.chat_template,
        )

    def runner(self, device: str, dtype: str) -> StColbertRunner:
        return StColbertRunner(
            self.source,
            architecture=self.architecture,
            model_type=self.model_type,
            dense=self._dense,
            device=device,
            dtype=dtype,
        )


class StColbertRunner(BertRunner):
    """The backbone transformers builds for the model_type, plus the float32 projection head.

    Batching, masks, `keep` and normalisation are TokenEmbedRunner's `forward` (families/batching.py);
    only construction and `_embed` differ (no token_type_ids, no KV cache).
    """

    def __init__(
        self,
        source: ModelSource,
        *,
        architecture: str,
        model_type: str,
        dense: list[DenseLayer],
        device: str,
        dtype: str,
    ) -> None:
        import torch
        from transformers import AutoConfig, AutoModel

        if dtype not in ("float32", "float16", "bfloat16"):
            raise ModelLoadError(f"unsupported dtype {dtype!r}; use float32, float16 or bfloat16")
        settings = {k: v for k, v in source.config.items() if k not in ("model_type", "architectures")}
        try:
            config = AutoConfig.for_model(model_type, **settings)
            with loading.skip_weight_init():
                backbone: torch.nn.Module = AutoModel.from_config(config, attn_implementation="sdpa")
        except Exception as exc:
            raise ModelLoadError(f"cannot build the {model_type} backbone of {source.path}: {exc}") from exc
        backbone_state, projection, origin = split_checkpoint(loading.load_safetensors(source.path))
        persistent = set(backbone.state_dict())
        recomputed = {name for name, _ in backbone.named_buffers()} - persistent
        state = {f"backbone.{k}": v for k, v in backbone_state.items() if k not in recomputed}
        names = {f"backbone.{k}": v for k, v in origin.items()}
        modules: dict[str, torch.nn.Module] = {"backbone": backbone}
        if projection is not None:
            modules["linear"] = torch.nn.Linear(config.hidden_size, projection.shape[0], bias=False)
            state["linear.weight"] = projection
        model = torch.nn.ModuleDict(modules)
        loading.load_state_dict_strict(model, state, what=f"{architecture} checkpoint {source.path}", names=names)
        head = modules["linear"] if projection is not None else build_projector(dense)

        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.pad_id = int(getattr(config, "pad_token_id", None) or 0)
        self.backbone = backbone.to(self.device, self.dtype).eval()
        self.head = head.to(self.device, torch.float32).eval()  # float32 whatever the dtype, as vLLM's head_dtype
        self.dim = int(projection.shape[0]) if projection is not None else dense[-1].out_features
        self._extra: dict[str, Any] = {"use_cache": False} if model_type == "lfm2" else {}

    def _embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=ids, attention_mask=mask, **self._extra).last_hidden_state
        vectors: torch.Tensor = self.head(hidden.float())
        return vectors
