"""Checkpoint key layouts of the Qwen3-VL late-interaction models, mapped onto transformers' `Qwen3VLModel`.

Torch-free (generic over the value type), so the server process can read projection shapes from
safetensors headers with the same rules the worker loads weights with.

The prefixes are vLLM's `hf_to_vllm_mapper` for ColQwen3 (vllm-spec 1.4), in its order, ending at
`Qwen3VLModel`'s own names (`visual.*`, `language_model.*`) instead of vLLM's:

| checkpoint key | layout | Qwen3VLModel key |
|---|---|---|
| `vlm.model.visual.X` | Tomoro (`ColQwen3`) | `visual.X` |
| `vlm.model.language_model.X` | Tomoro | `language_model.X` |
| `model.visual.X` | NVIDIA (`Qwen3VLNemotronEmbedModel`) | `visual.X` |
| `model.language_model.model.X`, `model.language_model.X` | NVIDIA | `language_model.X` |
| `visual.X`, `language_model.model.X`, `language_model.X` | OpenSearch (`OpsColQwen3Model`) | same |
| `vlm.lm_head.*`, `lm_head.*`, `language_model.lm_head.*` | any | ignored (generation head) |
| `…custom_text_proj.{weight,bias}` (ColPali, Ops), `…embedding_proj_layer.*` (Tomoro) | any | the projection |

Anything else is kept under its own name, so the strict load reports it as unexpected.

ColQwen3.5 (`ColQwen3_5`, colpali's `ColQwen3_5(Qwen3_5Model)`) has its own, narrower table: vLLM's
`ColQwen3_5Model.hf_to_vllm_mapper` maps only `language_model.` (to its `language_model.model.`) and skips
`mtp.` (vllm-spec 1.5), so `QWEN3_5_LAYOUT` keeps `visual.X` and `language_model.X` as `Qwen3_5Model`
names, ignores the multi-token-prediction head `mtp.*` (and an `lm_head.*`, never used), and leaves
every other prefix (`model.`, `vlm.`) unexpected.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

PREFIXES: tuple[tuple[str, str], ...] = (
    ("vlm.model.visual.", "visual."),
    ("vlm.model.language_model.", "language_model."),
    ("model.visual.", "visual."),
    ("model.language_model.model.", "language_model."),
    ("model.language_model.", "language_model."),
    ("visual.", "visual."),
    ("language_model.model.", "language_model."),
    ("language_model.", "language_model."),
)
"""(checkpoint prefix, Qwen3VLModel prefix); the first match wins."""

IGNORED_PREFIXES = ("vlm.lm_head.", "lm_head.", "language_model.lm_head.")
"""The language-modelling head of the generative checkpoint the model was trained from; never used."""

QWEN3_5_PREFIXES: tuple[tuple[str, str], ...] = (
    ("visual.", "visual."),
    ("language_model.", "language_model."),
)
"""ColQwen3.5: (checkpoint prefix, Qwen3_5Model prefix)."""

QWEN3_5_IGNORED = ("mtp.", "lm_head.", "language_model.lm_head.")
"""ColQwen3.5: the multi-token-prediction head (vLLM skips `mtp.`) and a generation head; never used."""


@dataclass(frozen=True)
class Layout:
    """How one family's checkpoint names map onto its transformers backbone."""

    prefixes: tuple[tuple[str, str], ...]
    ignored: tuple[str, ...]


QWEN3_VL_LAYOUT = Layout(PREFIXES, IGNORED_PREFIXES)
QWEN3_5_LAYOUT = Layout(QWEN3_5_PREFIXES, QWEN3_5_IGNORED)

_PROJECTION = re.compile(r"(?:^|.*\.)(custom_text_proj|embedding_proj_layer)\.(weight|bias)")


@dataclass
class SplitCheckpoint(Generic[T]):
    """A checkpoint's entries sorted into backbone, projection and ignored, with the names on disk."""

    backbone: dict[str, T] = field(default_factory=dict)
    """Under Qwen3VLModel's names."""
    projection: dict[str, T] = field(default_factory=dict)
    """"weight" and, when the checkpoint has one, "bias"."""
    origin: dict[str, str] = field(default_factory=dict)
    """Qwen3VLModel name (or "proj.weight"/"proj.bias") -> checkpoint name, for error messages."""
    ignored: list[str] = field(default_factory=list)


def split_checkpoint(state: Mapping[str, T], layout: Layout = QWEN3_VL_LAYOUT) -> SplitCheckpoint[T]:
    """Sort `state` by the layout's table (module docstring); Qwen3-VL's unless told."""
    split: SplitCheckpoint[T] = SplitCheckpoint()
    for name, value in state.items():
        if name.startswith(layout.ignored):
            split.ignored.append(name)
            continue
        found = _PROJECTION.fullmatch(name)
        if found is not None:
            part = found.group(2)
            if part in split.projection:  # two projections (e.g. both namings): the second is unexpected
                split.backbone[name] = value
                split.origin[name] = name
            else:
                split.projection[part] = value
                split.origin[f"proj.{part}"] = name
            continue
        short = name
        for old, new in layout.prefixes:
            if name.startswith(old):
                short = new + name[len(old) :]
                break
        split.backbone[short] = value
        split.origin[short] = name
    return split
