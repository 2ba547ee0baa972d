"""Checkpoint key layouts of the Llama-Nemotron-VL models, mapped onto the runner's modules. Torch-free.

vLLM's mappers (vllm-spec 1.7) end at vLLM's own module names; these end at transformers' (`SiglipVisionModel`
of transformers 5 is flat: `embeddings`, `encoder`, `post_layernorm`; `LlamaModel`: `embed_tokens`, `layers`,
`norm`):

| checkpoint key | runner key |
|---|---|
| `model.X` (the reranker's backbone) | as `X` below |
| `vision_model.vision_model.X` (nested, transformers 4 SigLIP), `vision_model.X` (flat) | `vision.X` |
| `language_model.model.X`, `language_model.X` | `language.X` |
| `mlp1.X` | `mlp1.X` |
| `score.weight` (the reranker's head, no bias) | `score.weight` |
| `…lm_head.*`, the SigLIP pooling head `vision_model[.vision_model].head.*` | ignored (never used) |

Anything else keeps its own name, so a strict load reports it as unexpected.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

PREFIXES: tuple[tuple[str, str], ...] = (
    ("vision_model.vision_model.", "vision."),
    ("vision_model.", "vision."),
    ("language_model.model.", "language."),
    ("language_model.", "language."),
    ("mlp1.", "mlp1."),
    ("score.", "score."),
)
"""(checkpoint prefix after `model.` is removed, runner prefix); the first match wins."""

IGNORED_PREFIXES = (
    "lm_head.",
    "language_model.lm_head.",
    "vision_model.head.",
    "vision_model.vision_model.head.",
)


@dataclass
class SplitCheckpoint(Generic[T]):
    """Entries under the runner's names, with their names on disk, and the ignored ones."""

    state: dict[str, T] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


def split_checkpoint(state: Mapping[str, T]) -> SplitCheckpoint[T]:
    """Sort `state` by the table in the module docstring."""
    split: SplitCheckpoint[T] = SplitCheckpoint()
    for name, value in state.items():
        short = name.removeprefix("model.")
        if short.startswith(IGNORED_PREFIXES):
            split.ignored.append(name)
            continue
        mapped = name
        for old, new in PREFIXES:
            if short.startswith(old):
                mapped = new + short[len(old) :]
                break
        if mapped in split.state:  # the same weight under two spellings: the second is unexpected
            mapped = name
        split.state[mapped] = value
        split.origin[mapped] = name
    return split
