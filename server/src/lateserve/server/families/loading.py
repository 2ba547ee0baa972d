"""Checkpoint I/O shared by families: safetensors headers and tensors, tokenizers, strict loading.

torch, safetensors and transformers are imported inside the functions that need them, and only
worker processes call those: the server process reads headers and tokenizers (through `tokenizer`,
which needs the `tokenizers` library alone) and never imports torch.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from lateserve.server.domain import ModelLoadError
from lateserve.server.families.base import ModelSource
from lateserve.server.families.tokenizer import TextTokenizer, load_text_tokenizer

if TYPE_CHECKING:
    import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
# A safetensors header is JSON of a few KB per tensor; anything bigger means a corrupt or foreign file.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_LISTED_KEYS = 20


# A tokenizer_config model_max_length at or above this is transformers' "no limit" placeholder.
_SANE_TOKENIZER_LIMIT = 1_000_000


def max_model_len(source: ModelSource, positions: int) -> int:
    """The served input limit: the smallest of --max-model-len, the positions the backbone has,
    and the tokenizer's declared model_max_length (when it is a real number)."""
    limits: list[float] = [source.max_model_len or math.inf, positions]
    declared = (source.read_json("tokenizer_config.json") or {}).get("model_max_length")
    if isinstance(declared, int | float) and 0 < declared < _SANE_TOKENIZER_LIMIT:
        limits.append(int(declared))
    return int(min(limits))


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files holding a checkpoint: the sharded index's files, else every *.safetensors."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickled = " (pytorch_model.bin is not supported: convert it to safetensors)"
        hint = pickled if (model_dir / "pytorch_model.bin").is_file() else ""
        raise ModelLoadError(f"{model_dir} has no *.safetensors weights{hint}")
    return files


def read_safetensors_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape over all weight files, from the headers alone (no tensor is read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in weight_files(model_dir):
        shapes.update(_header_shapes(file))
    return shapes


def read_safetensors_file_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of one safetensors file (e.g. a Sentence-Transformers module's), header only."""
    return _header_shapes(file)


def _header_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    # Parsed by hand rather than with safe_open so the server process needs neither numpy nor torch here.
    try:
        with file.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > _MAX_HEADER_BYTES:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(fh.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise ModelLoadError(f"{file} is not a readable safetensors file ({exc})") from exc
    return {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}


def progress_disabled() -> bool:
    """Progress bars only for a person watching: off when stderr is not a terminal (logs, CI, pipes)."""
    try:
        return not sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return True


def load_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, on the CPU, in its stored dtype; a tqdm bar over the tensors of
    all shards on a terminal."""
    from safetensors import safe_open
    from tqdm import tqdm

    files = weight_files(model_dir)
    total = sum(len(_header_shapes(file)) for file in files)
    state: dict[str, torch.Tensor] = {}
    with tqdm(
        total=total, desc=f"Loading {model_dir.name} ({len(files)} shard(s))", unit="tensor",
        disable=progress_disabled(), leave=False,
    ) as bar:  # fmt: skip
        for file in files:
            try:
                with safe_open(str(file), framework="pt", device="cpu") as reader:
                    for name in reader.keys():  # noqa: SIM118 - safe_open is not a mapping
                        state[name] = reader.get_tensor(name)
                        bar.update(1)
            except Exception as exc:
                raise ModelLoadError(f"cannot read {file}: {exc}") from exc
    return state


def load_tokenizer(model_dir: Path, *, trust_remote_code: bool = False) -> TextTokenizer:
    """The checkpoint's own tokenizer, from its tokenizer.json (or BERT vocab.txt), without transformers.

    `trust_remote_code` is accepted for the families' sake and changes nothing: a tokenizer.json is
    data, and a checkpoint whose tokenizer exists only as remote code has none (ModelLoadError).
    """
    del trust_remote_code
    return load_text_tokenizer(model_dir)


def load_state_dict_strict(
    module: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    what: str,
    names: Mapping[str, str] | None = None,
) -> None:
    """Copy `state` into `module`, failing unless every parameter and persistent buffer is matched.

    A partially loaded model would silently serve random vectors, so any gap is fatal. `names` maps
    a state key to the name the checkpoint file uses, so unexpected weights are reported as on disk.
    """
    try:
        result = module.load_state_dict(dict(state), strict=False)
    except RuntimeError as exc:  # shape mismatches raise even when strict=False
        raise ModelLoadError(f"{what}: {exc}") from exc
    missing = list(result.missing_keys)
    unexpected = [(names or {}).get(key, key) for key in result.unexpected_keys]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing weights: {describe_keys(missing)}")
        if unexpected:
            problems.append(f"unexpected weights: {describe_keys(unexpected)}")
        raise ModelLoadError(f"{what} does not match the model; {'; '.join(problems)}")


def describe_keys(keys: Iterable[str], limit: int = _LISTED_KEYS) -> str:
    """'n: a, b, ... (and m more)', short enough for one log line even for a wholly wrong checkpoint."""
    ordered = sorted(keys)
    listed = ", ".join(ordered[:limit])
    more = f" (and {len(ordered) - limit} more)" if len(ordered) > limit else ""
    return f"{len(ordered)}: {listed}{more}"


def skip_weight_init() -> contextlib.AbstractContextManager[object]:
    """Build a transformers model without random initialisation, when a strict load overwrites it anyway.

    Initialising costs seconds for 110M parameters. The helper is semi-private in transformers, hence
    the fallback to initialising after all.
    """
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return contextlib.nullcontext()
    return no_init_weights()
