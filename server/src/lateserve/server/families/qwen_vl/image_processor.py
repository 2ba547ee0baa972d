"""Qwen2-VL / Qwen3-VL image preparation in the server process: Pillow + numpy, no torch, no transformers.

Image documents are prepared where requests are admitted, so the worker processes receive ready
`pixel_values` and the token count (the `<|image_pad|>` run) is known before scheduling. The reference is
transformers 5.24's `Qwen2VLImageProcessorPil` (the PIL backend; vLLM's default torchvision backend
resamples differently by up to one grey level, vl-families.md §0.6): the grid and the placeholder count are
identical, and the pixel values are bit-identical for the same input, because every step repeats the
reference's arithmetic (Python `round` in `smart_resize`, Pillow bicubic on uint8, float64 rescale then
float32 normalise) rather than an equivalent formula.

Speed: one scanned page or screenshot per document makes this a hot path, and Pillow's bicubic resize
(which must stay, for identical pixels) is already most of it. The rest is one uint8 transpose into patch
order, then a table look-up (uint8 in, the reference's exact float32 out, two pixels per look-up) done in
L2-sized blocks, each copied once per temporal frame into the final merge-window-major array. No float
array is ever transposed or allocated twice. Pillow's resize and numpy's large-array loops release the GIL.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

import numpy as np
from PIL import Image

__all__ = ["PreparedImage", "QwenVisionSettings", "preprocess", "smart_resize"]

MAX_ASPECT_RATIO: Final = 200
"""transformers refuses images whose long side exceeds 200x the short one; so must we, or token counts diverge."""

OVERRIDE_KEYS: Final = frozenset({"min_pixels", "max_pixels", "size"})
"""Keys vLLM forwards from --mm-processor-kwargs / per-request mm_processor_kwargs that change image sizing."""

_SIZE_KEYS: Final = frozenset({"shortest_edge", "longest_edge"})
_BICUBIC: Final = 3  # PIL.Image.Resampling.BICUBIC, the only filter the reference processors use
_WHITE: Final = (255, 255, 255, 255)
_ROWS_PER_BLOCK: Final = 128
"""Patch rows converted per step: 128 x 3 x 16 x 16 float32 = 384 KiB, a scratch block that stays in L2."""


def _positive_int(name: str, value: Any) -> int:
    # JSON numbers may arrive as 1310720.0; bools are ints to Python but never a pixel count.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        value = int(value)
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _float_triple(name: str, value: Any) -> tuple[float, float, float]:
    # transformers accepts a scalar mean/std and broadcasts it over the channels; so do we.
    items = [value] * 3 if isinstance(value, int | float) else value
    if isinstance(items, str | bytes) or not hasattr(items, "__len__") or len(items) != 3:
        raise ValueError(f"{name} must be 3 finite numbers, got {value!r}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in items):
        raise ValueError(f"{name} must be 3 finite numbers, got {value!r}")
    return float(items[0]), float(items[1]), float(items[2])


@dataclass(frozen=True, slots=True)
class QwenVisionSettings:
    """Everything that decides an image's grid and pixel values; defaults are Qwen3-VL's preprocessor_config.

    Hashable, so the per-channel look-up table is built once per distinct setting, not per image.
    """

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    def __post_init__(self) -> None:
        # Validated here, not only in from_config, so a hand-built settings object cannot reach preprocess broken.
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            object.__setattr__(self, name, _positive_int(name, getattr(self, name)))
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")
        mean = _float_triple("image_mean", self.image_mean)
        std = _float_triple("image_std", self.image_std)
        if any(s == 0.0 for s in std):
            raise ValueError(f"image_std must not contain 0, got {std!r}")
        object.__setattr__(self, "image_mean", mean)
        object.__setattr__(self, "image_std", std)
        rescale = self.rescale_factor
        if isinstance(rescale, bool) or not isinstance(rescale, int | float) or not (0 < rescale < math.inf):
            raise ValueError(f"rescale_factor must be a positive finite number, got {rescale!r}")
        object.__setattr__(self, "rescale_factor", float(rescale))

    @property
    def factor(self) -> int:
        """Side multiple of a resized image: one merge window of patches, so every window is complete."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_config(
        cls,
        preprocessor_config: Mapping[str, Any] | None,
        overrides: Mapping[str, Any] | None = None,
    ) -> QwenVisionSettings:
        """Settings as transformers would load them from preprocessor_config.json, then vLLM's kwargs on top.

        Config: `size.shortest_edge`/`size.longest_edge` bound the pixel count, and the legacy top-level
        `min_pixels`/`max_pixels` override them (transformers' `__init__` does the same; `size.min_pixels`
        and `size.max_pixels` are read as a last resort). Keys the config lacks keep this class's (Qwen3-VL)
        defaults, not transformers' Qwen2-VL class defaults: every real Qwen checkpoint spells them all out.
        Other keys (processor_class, image_processor_type, ...) are ignored, except that a config asking
        for a pipeline this module does not implement (no resize, no rescale, no normalise, another filter)
        is refused rather than served with different pixels.

        Overrides: `size` (merged key by key), then `min_pixels`/`max_pixels`, as transformers' per-call
        kwargs; anything else is an error naming the keys, so a misspelt request kwarg never passes silently.
        """
        values: dict[str, Any] = {}
        config = dict(preprocessor_config or {})
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if config.get(flag) is False:
                raise ValueError(f"preprocessor_config {flag}=false is not supported by the Qwen image processor")
        if config.get("resample") not in (None, _BICUBIC):
            raise ValueError(f"preprocessor_config resample={config['resample']!r} is not supported (only 3, bicubic)")
        size = config.get("size")
        if size is not None:
            if not isinstance(size, Mapping):
                raise ValueError(f"preprocessor_config size must be a mapping, got {size!r}")
            for target, keys in (
                ("min_pixels", ("shortest_edge", "min_pixels")),
                ("max_pixels", ("longest_edge", "max_pixels")),
            ):
                found = next((size[k] for k in keys if size.get(k) is not None), None)
                if found is not None:
                    values[target] = found
        for key in (
            "min_pixels",
            "max_pixels",
            "patch_size",
            "temporal_patch_size",
            "merge_size",
            "image_mean",
            "image_std",
            "rescale_factor",
        ):
            if config.get(key) is not None:
                values[key] = config[key]

        if overrides:
            unknown = sorted(str(k) for k in overrides if k not in OVERRIDE_KEYS)
            if unknown:
                raise ValueError(f"unsupported image processor kwargs {unknown}; supported: {sorted(OVERRIDE_KEYS)}")
            override_size = overrides.get("size")
            if override_size is not None:
                if not isinstance(override_size, Mapping):
                    raise ValueError(f"size must be a mapping with shortest_edge/longest_edge, got {override_size!r}")
                bad = sorted(str(k) for k in override_size if k not in _SIZE_KEYS)
                if bad:
                    raise ValueError(f"unsupported size keys {bad}; supported: {sorted(_SIZE_KEYS)}")
                if override_size.get("shortest_edge") is not None:
                    values["min_pixels"] = override_size["shortest_edge"]
                if override_size.get("longest_edge") is not None:
                    values["max_pixels"] = override_size["longest_edge"]
            for key in ("min_pixels", "max_pixels"):
                if overrides.get(key) is not None:
                    values[key] = overrides[key]
        return cls(**values)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) the image is resized to: multiples of `factor`, pixel count within bounds, aspect kept.

    The image-token count follows from this, so it must agree with transformers to the pixel: Python's
    `round` (half to even: 80 px at factor 32 is 2.5 -> 64 px, not 96), floor on the shrink branch, ceil on
    the grow branch, and no second check after growing.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True, slots=True, eq=False)
class PreparedImage:
    """One image ready for the vision tower; `eq=False` because ndarray equality is element-wise."""

    pixel_values: np.ndarray
    """float32 [grid_h*grid_w, C*T*P*P]; rows merge-window-major (4 consecutive rows = one 2x2 window)."""
    grid_thw: tuple[int, int, int]
    """(1, grid_h, grid_w) in patches: a still image is one temporal patch."""
    merge_size: int = 2

    @property
    def num_tokens(self) -> int:
        """Length of the `<|image_pad|>` run in the prompt: one LLM token per merge window."""
        t, h, w = self.grid_thw
        return t * h * w // (self.merge_size * self.merge_size)

    @property
    def num_patches(self) -> int:
        """Rows of `pixel_values`, the vision tower's sequence length for this image."""
        t, h, w = self.grid_thw
        return t * h * w


@lru_cache(maxsize=32)
def _value_table(rescale_factor: float, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """[C or 1, 256] float32: the reference's value for every uint8 level, computed with its own steps.

    transformers rescales in float64 and casts to float32, then normalises in float32; a fused float32
    `x * a + b` differs by an ulp. A table gives the exact values and is also the cheapest conversion. One
    row when every channel has the same mean and std (all Qwen3 checkpoints), so one look-up serves all.
    """
    levels = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None]
    table = (levels[None, :] - mean32) / std32
    if bool((table == table[0]).all()):
        table = table[:1]
    table.setflags(write=False)
    return table


@lru_cache(maxsize=32)
def _pair_tables(rescale_factor: float, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """[C or 1, 65536] float64 views of float32 pairs: two neighbouring pixels per look-up.

    Reading the uint8 patch rows as little-endian uint16 makes index `a + 256*b` stand for the pixel pair
    (a, b); entry k holds (value[k & 255], value[k >> 8]) as two float32s, stored as one 8-byte item. Half the
    gathers of a per-pixel table, ~20% off the array work (512 KiB per table, L2-resident); one table per
    row of `_value_table`.
    """
    values = _value_table(rescale_factor, mean, std)
    index = np.arange(65536)
    pairs = np.empty((values.shape[0], 65536, 2), dtype=np.float32)
    pairs[:, :, 0] = values[:, index & 255]
    pairs[:, :, 1] = values[:, index >> 8]
    table = pairs.view(np.float64).reshape(values.shape[0], 65536)
    table.setflags(write=False)
    return table


def _to_rgb(image: Image.Image) -> Image.Image:
    # Same rule as transformers' `convert_to_rgb` for PIL input: anything with an alpha band or a
    # `transparency` entry is alpha-composited onto white, the rest goes through convert("RGB").
    # lateserve.server.media already hands over RGB, for which this is free.
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(image: Image.Image, settings: QwenVisionSettings) -> PreparedImage:
    """Pixel values and grid for one image, identical to `Qwen2VLImageProcessorPil` with the same settings.

    Raises ValueError for an aspect ratio above 200 (as transformers does), before any pixel work.
    """
    patch, merge, frames = settings.patch_size, settings.merge_size, settings.temporal_patch_size
    height, width = smart_resize(image.height, image.width, settings.factor, settings.min_pixels, settings.max_pixels)
    rgb = _to_rgb(image)
    if rgb.size != (width, height):  # Pillow's resize to the same size is a plain copy, so skipping it is exact
        rgb = rgb.resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(rgb)  # (h, w, 3) uint8, channels last as Pillow stores them

    channels = pixels.shape[2]
    grid_h, grid_w = height // patch, width // patch
    # (h, w, C) -> (block row, block col, row in block, col in block, C, patch row, patch col): the reference's
    # channel-first reshape/transpose, reached from channels-last by a different permutation. uint8 keeps this
    # one real copy 4x cheaper than transposing floats.
    windows = pixels.reshape(grid_h // merge, merge, patch, grid_w // merge, merge, patch, channels)
    rows = np.ascontiguousarray(windows.transpose(0, 3, 1, 4, 6, 2, 5)).reshape(
        grid_h * grid_w, channels, patch * patch
    )

    item: type[np.floating[Any]]
    if (patch * patch) % 2:  # odd patch: pixels do not pair up within a patch row, so one per look-up
        table, item = _value_table(settings.rescale_factor, settings.image_mean, settings.image_std), np.float32
        indices = rows
    else:
        table, item = _pair_tables(settings.rescale_factor, settings.image_mean, settings.image_std), np.float64
        indices = rows.view(np.dtype("<u2"))
    count, span = grid_h * grid_w, indices.shape[2]
    out = np.empty((count, channels, frames, span), dtype=item)
    scratch = np.empty((min(_ROWS_PER_BLOCK, count), channels, span), dtype=item)
    for start in range(0, count, _ROWS_PER_BLOCK):
        stop = min(start + _ROWS_PER_BLOCK, count)
        block = scratch[: stop - start]
        if table.shape[0] == 1:
            np.take(table[0], indices[start:stop], out=block, mode="clip")
        else:
            for c in range(channels):
                np.take(table[c], indices[start:stop, c], out=block[:, c], mode="clip")
        for t in range(frames):  # a still image repeated T times: the vision tower's temporal patch
            out[start:stop, :, t] = block
    return PreparedImage(
        pixel_values=out.view(np.float32).reshape(count, channels * frames * patch * patch),
        grid_thw=(1, grid_h, grid_w),
        merge_size=merge,
    )
