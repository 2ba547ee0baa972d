"""Architecture name -> family class, imported lazily, plus resolving a model argument to files.

Third-party families register through the `lateserve.families` entry-point group
(name = architecture, value = "module:Class"); a family not installed as a distribution (a test
family, a local experiment) can be named in LATESERVE_EXTRA_FAMILIES as "Arch=module:Class,..." (the
worker processes inherit it).
"""

from __future__ import annotations

import importlib
import json
import os
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from lateserve.server.domain import ModelLoadError
from lateserve.server.families.base import Family, ModelSource
from lateserve.server.families.loading import progress_disabled
from lateserve.server.media import MediaPolicy

EXTRA_FAMILIES_ENV = "LATESERVE_EXTRA_FAMILIES"

# architecture -> (module, class). The first entry of config.architectures that is known wins.
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "HF_ColBERT": ("lateserve.server.families.colbert", "BertColBERT"),
    "ColBERTModel": ("lateserve.server.families.colbert", "BertColBERT"),
    # Plain BERT / XLM-R encoders: a Sentence-Transformers bi-encoder when modules.json has a Pooling module,
    # else (BERT) their normalised token states as late interaction (st_embed.encoder_family decides).
    "BertModel": ("lateserve.server.families.st_embed", "encoder_family"),
    "XLMRobertaModel": ("lateserve.server.families.st_embed", "encoder_family"),
    "BertForSequenceClassification": ("lateserve.server.families.cross_encoder", "CrossEncoder"),
    "XLMRobertaForSequenceClassification": ("lateserve.server.families.cross_encoder", "CrossEncoder"),
    # Sentence-Transformers/PyLate layouts; config.json says ModernBertModel / Lfm2Model, so these are
    # chosen with --hf-overrides '{"architectures": [...]}' exactly as vLLM documents.
    "ColBERTModernBertModel": ("lateserve.server.families.st_colbert", "StColBERT"),
    "ColBERTLfm2Model": ("lateserve.server.families.st_colbert", "StColBERT"),
    "ColBERTJinaRobertaModel": ("lateserve.server.families.jina_colbert", "JinaColBERT"),
    "BgeM3EmbeddingModel": ("lateserve.server.families.bge_m3", "BgeM3"),
    # Qwen3-VL late interaction (text + images): Tomoro, OpenSearch and NVIDIA layouts.
    "ColQwen3": ("lateserve.server.families.colqwen3", "ColQwen3Family"),
    "OpsColQwen3Model": ("lateserve.server.families.colqwen3", "ColQwen3Family"),
    "Qwen3VLNemotronEmbedModel": ("lateserve.server.families.colqwen3", "ColQwen3Family"),
    # Llama-Nemotron-VL (SigLIP + bidirectional Llama): embeddings (bi-encoder) and reranking (cross-encoder).
    "LlamaNemotronVLModel": ("lateserve.server.families.nemotron_vl", "NemotronVLFamily"),
    "LlamaNemotronVLForSequenceClassification": ("lateserve.server.families.nemotron_vl", "NemotronVLFamily"),
    # Qwen3.5 hybrid backbone (gated delta-net + full attention), ColQwen3's processor and head rules.
    "ColQwen3_5": ("lateserve.server.families.colqwen3_5", "ColQwen3_5Family"),
}


def known_architectures() -> dict[str, tuple[str, str]]:
    """Built-in architectures plus those plug-ins declare."""
    table = dict(ARCHITECTURES)
    for ep in entry_points(group="lateserve.families"):
        module, _, cls = ep.value.partition(":")
        table[ep.name] = (module, cls)
    for entry in filter(None, (e.strip() for e in os.environ.get(EXTRA_FAMILIES_ENV, "").split(","))):
        arch, _, target = entry.partition("=")
        module, _, cls = target.partition(":")
        if not (arch and module and cls):
            raise ModelLoadError(f"{EXTRA_FAMILIES_ENV}: {entry!r} is not Arch=module:Class")
        table[arch.strip()] = (module.strip(), cls.strip())
    return table


def resolve_model_dir(model: str) -> Path:
    """A local directory as is; otherwise a Hub id fetched (or found in the cache) by huggingface_hub."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ModelLoadError(f"{model} is a file; expected a model directory or a Hub id")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        # huggingface_hub draws its own download bars; only on a terminal (not into logs).
        quiet = progress_disabled() and not are_progress_bars_disabled()
        if quiet:
            disable_progress_bars()
        try:
            return Path(snapshot_download(repo_id=model))
        finally:
            if quiet:
                enable_progress_bars()
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load {model!r}: not a local directory, and the Hub download failed ({exc})"
        ) from exc


def load_source(
    model: str,
    *,
    hf_overrides: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    max_model_len: int | None = None,
    chat_template: str | None = None,
    media: MediaPolicy | None = None,
    mm_processor_kwargs: dict[str, Any] | None = None,
) -> ModelSource:
    """Reads config.json, merges --hf-overrides (shallow, as vLLM) and returns the source."""
    path = resolve_model_dir(model)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} has no config.json")
    config: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8"))
    config.update(hf_overrides or {})
    return ModelSource(
        path=path,
        name=model,
        config=config,
        trust_remote_code=trust_remote_code,
        max_model_len=max_model_len,
        chat_template=chat_template,
        media=media or MediaPolicy(),
        mm_processor_kwargs=dict(mm_processor_kwargs or {}),
    )


def family_for(source: ModelSource) -> Family:
    """Instantiate the family of the first known architecture in the config."""
    table = known_architectures()
    declared = list(source.config.get("architectures") or [])
    for arch in declared:
        if arch in table:
            module, cls = table[arch]
            family_cls: type[Family] = getattr(importlib.import_module(module), cls)
            return family_cls(source)
    suggestion = "..."
    if (source.path / "colbert_linear.pt").is_file() and (source.path / "sparse_linear.pt").is_file():
        suggestion = "BgeM3EmbeddingModel"  # BAAI/bge-m3 declares XLMRobertaModel (vllm-spec 1.6)
    raise ModelLoadError(
        f"unsupported architecture {declared or '(none declared)'}; known: {', '.join(sorted(table))}. "
        f'Set it with --hf-overrides \'{{"architectures": ["{suggestion}"]}}\''
    )
