"""Sentence-Transformers Dense projections (`1_Dense/` and friends), as vLLM's `_load_st_projector` reads them.

`modules.json` entries of type `sentence_transformers.models.Dense` or `pylate.models.Dense.Dense`,
each with `{path}/config.json` (in_features, out_features, bias default true, activation_function)
and weights in `{path}/model.safetensors` else `{path}/pytorch_model.bin` under `weight`,
`linear.weight` or `dense.weight` (bias: the same name with `bias`). Layers chain in file order.

Unlike vLLM, which logs a failure and serves without a projector, every problem here is a
ModelLoadError naming the file or weight: serving unprojected vectors would silently change dims.
`find_dense_layers` reads JSON and safetensors headers only; `build_projector` needs torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lateserve.server.domain import ModelLoadError
from lateserve.server.families import loading
from lateserve.server.families.base import ModelSource

if TYPE_CHECKING:
    import torch

DENSE_TYPES = frozenset({"sentence_transformers.models.Dense", "pylate.models.Dense.Dense"})
WEIGHT_KEYS = ("weight", "linear.weight", "dense.weight")  # vLLM's order
SAFETENSORS = "model.safetensors"
PICKLED = "pytorch_model.bin"
# activation_function as Sentence-Transformers saves it (fullname of the module) -> torch.nn class.
ACTIVATIONS: dict[str, str] = {
    "torch.nn.modules.linear.Identity": "Identity",
    "torch.nn.modules.activation.Tanh": "Tanh",
    "torch.nn.modules.activation.ReLU": "ReLU",
    "torch.nn.modules.activation.GELU": "GELU",
    "torch.nn.modules.activation.Sigmoid": "Sigmoid",
    "torch.nn.modules.activation.SiLU": "SiLU",
}


@dataclass(frozen=True, slots=True)
class DenseLayer:
    """One projection layer as declared on disk."""

    path: Path
    """The module folder (e.g. <model>/1_Dense)."""
    in_features: int
    out_features: int
    bias: bool
    activation: str | None
    """torch.nn class name, None for identity."""
    weight_file: Path
    prefix: str | None
    """'' for `weight`, 'linear.' / 'dense.' otherwise; None when only a pickled file exists (read at load)."""

    @property
    def name(self) -> str:
        return self.path.name


def find_dense_layers(source: ModelSource) -> list[DenseLayer]:
    """The checkpoint's Dense modules in order; [] when modules.json is absent or declares none."""
    modules = source.read_json("modules.json") if (source.path / "modules.json").is_file() else None
    entries: list[Any] = modules if isinstance(modules, list) else []
    return [
        _layer(source.path, entry) for entry in entries if isinstance(entry, dict) and entry.get("type") in DENSE_TYPES
    ]


def _layer(root: Path, entry: dict[str, Any]) -> DenseLayer:
    folder = root / str(entry.get("path") or "")
    config_file = folder / "config.json"
    try:
        config: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8"))
        in_features, out_features = int(config["in_features"]), int(config["out_features"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"cannot read the Dense module config {config_file}: {exc}") from exc
    if config.get("use_residual"):
        raise ModelLoadError(f"{config_file}: use_residual Dense layers (PyLate) are not supported")
    name = config.get("activation_function")
    activation: str | None = None
    if name:
        if name not in ACTIVATIONS:
            raise ModelLoadError(
                f"{config_file}: unsupported activation_function {name!r}; known: {', '.join(sorted(ACTIVATIONS))}"
            )
        activation = None if ACTIVATIONS[name] == "Identity" else ACTIVATIONS[name]
    bias = bool(config.get("bias", True))
    weight_file, prefix = _weights(folder, bias)
    return DenseLayer(folder, in_features, out_features, bias, activation, weight_file, prefix)


def _weights(folder: Path, bias: bool) -> tuple[Path, str | None]:
    """Which file holds the weights and under which prefix, from the safetensors header when there is one."""
    file = folder / SAFETENSORS
    if not file.is_file():
        pickled = folder / PICKLED
        if pickled.is_file():
            return pickled, None
        raise ModelLoadError(f"Dense module {folder.name} has no weights: neither {file} nor {pickled} exists")
    shapes = loading.read_safetensors_file_shapes(file)
    return file, _prefix(shapes, file, bias)


def _prefix(keys: Any, file: Path, bias: bool) -> str:
    for key in WEIGHT_KEYS:
        if key in keys:
            prefix = key.removesuffix("weight")
            if bias and f"{prefix}bias" not in keys:
                raise ModelLoadError(f"{file} has no {prefix}bias, but its config.json declares bias: true")
            return prefix
    raise ModelLoadError(
        f"{file} has no projection weight (looked for {', '.join(WEIGHT_KEYS)}); found: {sorted(keys)}"
    )


def build_projector(layers: list[DenseLayer]) -> torch.nn.Sequential:
    """The layers as one float32 torch module, each loaded strictly (extra tensors are reported)."""
    import torch

    blocks: list[torch.nn.Module] = []
    for index, layer in enumerate(layers):
        if index and layer.in_features != layers[index - 1].out_features:
            raise ModelLoadError(
                f"Dense module {layer.name} takes {layer.in_features} features, "
                f"but {layers[index - 1].name} gives {layers[index - 1].out_features}"
            )
        state = _read_state(layer.weight_file)
        prefix = layer.prefix if layer.prefix is not None else _prefix(state, layer.weight_file, layer.bias)
        linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias, dtype=torch.float32)
        renamed = {key.removeprefix(prefix): value.float() for key, value in state.items() if key.startswith(prefix)}
        names = {key.removeprefix(prefix): key for key in state if key.startswith(prefix)}
        others = {key: value for key, value in state.items() if not key.startswith(prefix)}
        loading.load_state_dict_strict(
            linear, {**renamed, **others}, what=f"Dense module {layer.weight_file}", names=names
        )
        blocks.append(linear)
        if layer.activation is not None:
            blocks.append(getattr(torch.nn, layer.activation)())
    return torch.nn.Sequential(*blocks)


def _read_state(file: Path) -> dict[str, torch.Tensor]:
    import torch

    try:
        if file.name == PICKLED:
            state: dict[str, torch.Tensor] = torch.load(file, map_location="cpu", weights_only=True)
            return state
        from safetensors.torch import load_file

        return load_file(str(file), device="cpu")
    except Exception as exc:
        raise ModelLoadError(f"cannot read {file}: {exc}") from exc
