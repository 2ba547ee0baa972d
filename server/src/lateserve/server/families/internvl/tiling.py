"""Dynamic image tiling of the Llama-Nemotron-VL processors, in the server process: Pillow + numpy, no torch.

What NVIDIA's processor does (vl-families.md §3.1), step for step:

1. candidate grids `(cols, rows)` with `min_tiles <= cols * rows <= max_tiles`, gathered in a Python set and
   sorted by area (ties keep the set's iteration order, which is deterministic for small int tuples; the set
   is built in the same order as the reference so exact ties resolve the same way);
2. the grid is chosen by Nemotron's area-aware rule (not InternVL's closest-ratio rule): for each candidate,
   `min(cols*rows*S*S / (W*H), 0.6) * min(r/a, a/r)` with `r = cols/rows`, `a = W/H`; the first strictly
   best one wins;
3. the image is resized to `(S*cols, S*rows)` with Pillow's default filter for RGB (bicubic) and cut into
   `cols*rows` tiles of `S x S`, row-major;
4. if `use_thumbnail` and there is more than one tile, the whole image resized to `S x S` is appended last;
5. each tile is `ToTensor()` (/255) then `Normalize(0.5, 0.5)` (SigLIP); the per-tile `Resize((S, S))` is a
   no-op on tiles that are already `S x S`.

Steps 1-4 run here and the tiles travel to the worker as uint8 `[tiles, S, S, 3]` (a quarter of float32's
bytes); step 5 is two exact float32 operations done by the worker (`internvl.runner`).
`dynamic_image_size` False means one tile and no thumbnail, as vLLM's InternVL processors resolve it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image

__all__ = ["OVERRIDE_KEYS", "TilingSettings", "choose_grid", "target_ratios", "tile_count", "tile_image"]

_BICUBIC: Final = Image.Resampling.BICUBIC
AREA_CAP: Final = 0.6

OVERRIDE_KEYS: Final = frozenset(
    {
        "max_input_tiles",
        "min_input_tiles",
        "use_thumbnail",
        "dynamic_image_size",
        # vLLM's InternVL names for the same bounds
        "max_dynamic_patch",
        "min_dynamic_patch",
    }
)
"""Keys accepted from processor_config.json overrides: --mm-processor-kwargs and per-request mm_processor_kwargs."""


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not float(value).is_integer() or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class TilingSettings:
    """Tile size and bounds; hashable (the per-setting candidate list is cached)."""

    image_size: int = 512
    min_tiles: int = 1
    max_tiles: int = 6
    use_thumbnail: bool = True
    dynamic: bool = True

    @classmethod
    def from_config(
        cls,
        image_size: int,
        processor_config: Mapping[str, Any] | None,
        overrides: Mapping[str, Any] | None = None,
        *,
        fallback: Mapping[str, Any] | None = None,
    ) -> TilingSettings:
        """processor_config.json's `min_input_tiles`/`max_input_tiles`/`use_thumbnail`/`dynamic_image_size`
        (else config.json's `min_dynamic_patch`/`max_dynamic_patch`/`use_thumbnail`/`dynamic_image_size`,
        `fallback`), with `overrides` on top. Raises ValueError for unknown or invalid override keys."""
        unknown = sorted(set(overrides or {}) - OVERRIDE_KEYS)
        if unknown:
            raise ValueError(
                f"unknown image processor setting(s) {', '.join(unknown)}; accepted: {', '.join(sorted(OVERRIDE_KEYS))}"
            )
        base = dict(processor_config or {})
        old = dict(fallback or {})
        merged: dict[str, Any] = {
            "min": base.get("min_input_tiles", old.get("min_dynamic_patch", 1)),
            "max": base.get("max_input_tiles", old.get("max_dynamic_patch", 6)),
            "thumb": base.get("use_thumbnail", old.get("use_thumbnail", True)),
            "dynamic": base.get("dynamic_image_size", old.get("dynamic_image_size", True)),
        }
        for key, value in (overrides or {}).items():
            slot = {
                "max_input_tiles": "max",
                "max_dynamic_patch": "max",
                "min_input_tiles": "min",
                "min_dynamic_patch": "min",
                "use_thumbnail": "thumb",
                "dynamic_image_size": "dynamic",
            }[key]
            merged[slot] = value
        low, high = _positive_int("min_input_tiles", merged["min"]), _positive_int("max_input_tiles", merged["max"])
        if low > high:
            raise ValueError(f"min_input_tiles ({low}) is greater than max_input_tiles ({high})")
        return cls(
            image_size=_positive_int("image_size", image_size),
            min_tiles=low,
            max_tiles=high,
            use_thumbnail=_flag("use_thumbnail", merged["thumb"]),
            dynamic=_flag("dynamic_image_size", merged["dynamic"]),
        )

    @property
    def bounds(self) -> tuple[int, int]:
        return (self.min_tiles, self.max_tiles) if self.dynamic else (1, 1)


_RATIO_CACHE: dict[tuple[int, int], tuple[tuple[int, int], ...]] = {}


def target_ratios(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Candidate `(cols, rows)` grids sorted by area, equal areas in the reference's set order.

    >>> target_ratios(1, 6)
    ((1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2), (1, 5), (5, 1), (6, 1), (2, 3), (1, 6), (3, 2))
    """
    key = (min_tiles, max_tiles)
    cached = _RATIO_CACHE.get(key)
    if cached is None:
        grids: set[tuple[int, int]] = set()
        for n in range(min_tiles, max_tiles + 1):
            for cols in range(1, n + 1):
                for rows in range(1, n + 1):
                    if min_tiles <= cols * rows <= max_tiles:
                        grids.add((cols, rows))
        cached = tuple(sorted(grids, key=lambda g: g[0] * g[1]))
        if len(_RATIO_CACHE) < 64:
            _RATIO_CACHE[key] = cached
    return cached


def choose_grid(width: int, height: int, settings: TilingSettings) -> tuple[int, int]:
    """The `(cols, rows)` grid Nemotron's area-aware rule picks for a `width x height` image.

    >>> s = TilingSettings()
    >>> choose_grid(1275, 1650, s), choose_grid(2000, 500, s), choose_grid(800, 600, s), choose_grid(64, 64, s)
    ((2, 3), (4, 1), (3, 2), (1, 1))
    """
    size = settings.image_size
    aspect = width / height
    area = width * height
    best, grid = float("-inf"), (1, 1)
    for cols, rows in target_ratios(*settings.bounds):
        ratio = cols / rows
        factor = min(cols * rows * size * size / area, AREA_CAP) * min(ratio / aspect, aspect / ratio)
        if factor > best:
            best, grid = factor, (cols, rows)
    return grid


def tile_count(width: int, height: int, settings: TilingSettings) -> int:
    """Tiles an image becomes, thumbnail included.

    >>> s = TilingSettings()
    >>> [tile_count(w, h, s) for w, h in ((64, 64), (512, 512), (1275, 1650), (2000, 500), (800, 600))]
    [1, 1, 7, 5, 7]
    """
    cols, rows = choose_grid(width, height, settings)
    blocks = cols * rows
    return blocks + 1 if settings.use_thumbnail and blocks != 1 else blocks


def tile_image(image: Image.Image, settings: TilingSettings) -> npt.NDArray[np.uint8]:
    """uint8 `[tiles, S, S, 3]`: the grid's tiles row-major, then the thumbnail when there is one."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    size = settings.image_size
    cols, rows = choose_grid(image.width, image.height, settings)
    resized = np.asarray(image.resize((size * cols, size * rows), _BICUBIC), dtype=np.uint8)
    tiles = resized.reshape(rows, size, cols, size, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, size, size, 3)
    if settings.use_thumbnail and rows * cols != 1:
        thumbnail = np.asarray(image.resize((size, size), _BICUBIC), dtype=np.uint8)
        tiles = np.concatenate([tiles, thumbnail[None]], axis=0)
    return np.ascontiguousarray(tiles)
