"""Qwen2-VL / Qwen3-VL image preparation against transformers' own PIL-backend processor.

The oracle is `Qwen2VLImageProcessorPil` from the installed transformers (5.24), built with the same
settings; only this test imports it. Grid, placeholder count and pixel values must agree: the values are
compared with max abs diff <= 1e-6 (the implementation is in fact bit-identical, and that is checked too, so a
regression to an "equivalent" float formula is noticed).
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lateserve.server.families.qwen_vl.image_processor import (
    PreparedImage,
    QwenVisionSettings,
    preprocess,
    smart_resize,
)
from lateserve.server.media.decode import to_rgb

_pil_module = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
Qwen2VLImageProcessorPil = _pil_module.Qwen2VLImageProcessorPil
reference_smart_resize = _pil_module.smart_resize

QWEN3 = QwenVisionSettings()
TOMORO_LIKE = QwenVisionSettings(min_pixels=4096, max_pixels=1310720)
QWEN2_LIKE = QwenVisionSettings(
    patch_size=14,
    min_pixels=56 * 56,
    max_pixels=28 * 28 * 1280,
    image_mean=(0.48145466, 0.4578275, 0.40821073),
    image_std=(0.26862954, 0.26130258, 0.27577711),
)

_REFERENCES: dict[QwenVisionSettings, Any] = {}


def reference_for(settings: QwenVisionSettings) -> Any:
    if settings not in _REFERENCES:
        _REFERENCES[settings] = Qwen2VLImageProcessorPil(
            size={"shortest_edge": settings.min_pixels, "longest_edge": settings.max_pixels},
            patch_size=settings.patch_size,
            temporal_patch_size=settings.temporal_patch_size,
            merge_size=settings.merge_size,
            image_mean=list(settings.image_mean),
            image_std=list(settings.image_std),
            rescale_factor=settings.rescale_factor,
        )
    return _REFERENCES[settings]


def random_image(height: int, width: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Noise plus a gradient: noise exercises every level, the gradient gives the resampler structure."""
    rng = np.random.default_rng(seed)
    bands = len(Image.new(mode, (1, 1)).getbands())
    noise = rng.integers(0, 256, (height, width, bands), dtype=np.uint8)
    ramp = (np.arange(width, dtype=np.uint16)[None, :, None] * 255 // max(width - 1, 1)).astype(np.uint8)
    pixels = np.where(rng.random((height, width, 1)) < 0.5, noise, ramp)
    if bands == 1:
        return Image.fromarray(pixels[:, :, 0], "L").convert(mode) if mode != "L" else Image.fromarray(pixels[:, :, 0])
    return Image.fromarray(pixels, mode)


def assert_matches_reference(ours: PreparedImage, image: Image.Image, settings: QwenVisionSettings) -> float:
    expected = reference_for(settings)(image, return_tensors="np")
    grid = tuple(int(v) for v in expected["image_grid_thw"][0])
    assert ours.grid_thw == grid
    assert ours.num_patches == math.prod(grid)
    assert ours.num_tokens == math.prod(grid) // settings.merge_size**2
    assert ours.pixel_values.dtype == np.float32
    assert ours.pixel_values.shape == expected["pixel_values"].shape
    diff = float(np.abs(ours.pixel_values - expected["pixel_values"]).max())
    assert diff <= 1e-6
    assert np.array_equal(ours.pixel_values, expected["pixel_values"])
    return diff


SIZES = [
    pytest.param(80, 80, QWEN3, id="80x80-qwen3"),
    pytest.param(80, 80, TOMORO_LIKE, id="80x80-min4096"),
    pytest.param(112, 112, QWEN3, id="112x112-qwen3"),
    pytest.param(112, 112, TOMORO_LIKE, id="112x112-min4096"),
    pytest.param(64, 64, QWEN3, id="64x64"),
    pytest.param(64, 32, QWEN3, id="64x32"),
    pytest.param(32, 32, TOMORO_LIKE, id="32x32-min4096"),
    pytest.param(1024, 768, QWEN3, id="1024x768"),
    pytest.param(2200, 1700, TOMORO_LIKE, id="2200x1700-max1310720"),
    pytest.param(333, 517, QWEN3, id="333x517"),
    pytest.param(517, 333, TOMORO_LIKE, id="517x333-min4096"),
    pytest.param(2, 400, QWEN3, id="2x400-aspect200"),
    pytest.param(401, 3, TOMORO_LIKE, id="401x3-aspect133"),
    pytest.param(1, 150, QWEN3, id="1x150"),
    pytest.param(300, 500, QWEN2_LIKE, id="300x500-qwen2-clip-mean-patch14"),
    # Odd patch (15x15 = 225 values per channel): the one-pixel-per-look-up path, per channel and shared.
    pytest.param(300, 500, QwenVisionSettings(patch_size=15, image_mean=QWEN2_LIKE.image_mean), id="odd-patch-clip"),
    pytest.param(250, 190, QwenVisionSettings(patch_size=15, temporal_patch_size=3), id="odd-patch-t3"),
    pytest.param(250, 190, QwenVisionSettings(merge_size=1, temporal_patch_size=1), id="merge1-t1"),
]


@pytest.mark.parametrize(("height", "width", "settings"), SIZES)
def test_matches_transformers(height: int, width: int, settings: QwenVisionSettings) -> None:
    image = random_image(height, width, seed=height * 7919 + width)
    assert_matches_reference(preprocess(image, settings), image, settings)


def test_matches_transformers_large_page_default_settings() -> None:
    image = random_image(2200, 1700, seed=3)
    ours = preprocess(image, QWEN3)
    assert ours.grid_thw == (1, 138, 106)
    assert ours.num_tokens == 3657
    assert_matches_reference(ours, image, QWEN3)


def test_rows_are_merge_window_major() -> None:
    """Row r of pixel_values is patch (by, bx) of window (wy, wx); its first P*P values are channel 0, frame 0."""
    settings = QwenVisionSettings(min_pixels=32 * 64, max_pixels=32 * 64)
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    for py in range(2):
        for px in range(4):
            pixels[py * 16 : (py + 1) * 16, px * 16 : (px + 1) * 16, 0] = py * 4 + px
    ours = preprocess(Image.fromarray(pixels), settings)
    assert ours.grid_thw == (1, 2, 4)
    levels = np.rint((ours.pixel_values[:, :256] * 0.5 + 0.5) * 255).astype(int)
    assert [int(row[0]) for row in levels] == [0, 1, 4, 5, 2, 3, 6, 7]
    assert (levels == levels[:, :1]).all()
    row = ours.pixel_values.reshape(8, 3, 2, 256)
    assert np.array_equal(row[:, :, 0], row[:, :, 1])  # temporal duplication of the still frame


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK"])
def test_other_modes_match_transformers(mode: str) -> None:
    image = random_image(96, 130, mode="RGB" if mode == "P" else mode, seed=11)
    if mode == "P":
        image = image.quantize(64)
    assert_matches_reference(preprocess(image, QWEN3), image, QWEN3)


def test_palette_with_transparency_is_composited_like_transformers() -> None:
    image = random_image(70, 90, seed=5).quantize(32)
    image.info["transparency"] = 3
    assert_matches_reference(preprocess(image, QWEN3), image, QWEN3)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA"])
def test_media_loader_output_gives_the_same_values(mode: str) -> None:
    """The server path (media.to_rgb first) agrees with transformers given the original image.

    preprocess composites alpha onto white exactly as transformers' PIL path does (`alpha_composite`), and
    media.to_rgb's paste-with-mask composite yields the same pixels, so both routes are bit-identical.
    """
    image = random_image(120, 88, mode=mode, seed=17)
    assert_matches_reference(preprocess(to_rgb(image), QWEN3), image, QWEN3)


def test_aspect_ratio_over_200_raises_like_transformers() -> None:
    image = random_image(1, 201)
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess(image, QWEN3)
    with pytest.raises(ValueError, match="aspect ratio"):
        reference_for(QWEN3)(image, return_tensors="np")


@pytest.mark.parametrize(
    ("height", "width", "settings", "expected", "tokens"),
    [
        (64, 64, QWEN3, (256, 256), 64),
        (32, 32, QWEN3, (256, 256), 64),
        (64, 32, QWEN3, (384, 192), 72),
        (1024, 768, QWEN3, (1024, 768), 768),
        (2200, 1700, QWEN3, (2208, 1696), 3657),
        (2200, 1700, QwenVisionSettings(max_pixels=1310720), (1280, 992), 1240),
        (80, 80, TOMORO_LIKE, (64, 64), 4),
    ],
)
def test_smart_resize_worked_values(
    height: int, width: int, settings: QwenVisionSettings, expected: tuple[int, int], tokens: int
) -> None:
    """vl-families.md §1.1's table (80 at factor 32 rounds half to even: 64, not 96)."""
    size = smart_resize(height, width, settings.factor, settings.min_pixels, settings.max_pixels)
    assert size == expected
    assert (size[0] // settings.patch_size) * (size[1] // settings.patch_size) // settings.merge_size**2 == tokens


def test_smart_resize_agrees_with_transformers_on_many_sizes() -> None:
    rng = np.random.default_rng(1)
    edges = [v for k in range(1, 80) for v in (16 * k - 1, 16 * k, 16 * k + 1)]
    sizes = [(h, w) for h in edges[::7] for w in edges[::5]] + [
        (int(h), int(w)) for h, w in rng.integers(1, 5000, (400, 2))
    ]
    bounds = [(65536, 16777216), (4096, 1310720), (3136, 1003520), (1, 10**9)]
    checked = 0
    for factor in (28, 32):
        for min_pixels, max_pixels in bounds:
            for h, w in sizes:
                if max(h, w) / min(h, w) > 200:
                    continue
                got = smart_resize(h, w, factor, min_pixels, max_pixels)
                assert got == reference_smart_resize(h, w, factor, min_pixels, max_pixels), (h, w, factor)
                checked += 1
    assert checked > 5000


def test_smart_resize_rejects_bad_input() -> None:
    assert smart_resize(1, 200, 32, 65536, 16777216) == reference_smart_resize(1, 200, 32, 65536, 16777216)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 201, 32, 65536, 16777216)
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 10, 32, 65536, 16777216)


QWEN3_CONFIG: dict[str, Any] = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}


def test_from_config_reads_qwen3_config() -> None:
    before = copy.deepcopy(QWEN3_CONFIG)
    assert QwenVisionSettings.from_config(QWEN3_CONFIG, {"size": {"longest_edge": 2**20}}).max_pixels == 2**20
    assert before == QWEN3_CONFIG  # neither the config nor its size dict is written to
    assert QwenVisionSettings.from_config(QWEN3_CONFIG) == QWEN3
    assert QwenVisionSettings.from_config(None) == QWEN3
    assert QWEN3.factor == 32


def test_from_config_legacy_pixels_override_size_as_transformers_does() -> None:
    config = {
        **QWEN3_CONFIG,
        "min_pixels": 4096,
        "max_pixels": 1310720,
        "rescale_factor": 0.00392156862745098,
        "resample": 3,
    }
    settings = QwenVisionSettings.from_config(config)
    assert (settings.min_pixels, settings.max_pixels) == (4096, 1310720)
    # deepcopy: transformers' __init__ writes the legacy values into the caller's `size` dict.
    loaded = Qwen2VLImageProcessorPil(**copy.deepcopy({k: v for k, v in config.items() if k != "image_processor_type"}))
    assert (loaded.size["shortest_edge"], loaded.size["longest_edge"]) == (4096, 1310720)
    qwen2 = {
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    settings = QwenVisionSettings.from_config(qwen2)
    assert (settings.min_pixels, settings.max_pixels, settings.patch_size, settings.factor) == (3136, 12845056, 14, 28)
    assert settings.image_mean == (0.48145466, 0.4578275, 0.40821073)


def test_from_config_overrides_apply_on_top() -> None:
    settings = QwenVisionSettings.from_config(QWEN3_CONFIG, {"max_pixels": 1310720})
    assert (settings.min_pixels, settings.max_pixels) == (65536, 1310720)
    settings = QwenVisionSettings.from_config(QWEN3_CONFIG, {"size": {"shortest_edge": 4096}})
    assert (settings.min_pixels, settings.max_pixels) == (4096, 16777216)
    settings = QwenVisionSettings.from_config(
        QWEN3_CONFIG, {"size": {"shortest_edge": 4096, "longest_edge": 2**22}, "max_pixels": 1310720}
    )
    assert (settings.min_pixels, settings.max_pixels) == (4096, 1310720)
    legacy = {**QWEN3_CONFIG, "max_pixels": 1310720}
    assert QwenVisionSettings.from_config(legacy, {"max_pixels": 2**21}).max_pixels == 2**21


def test_from_config_unknown_override_keys_are_named() -> None:
    with pytest.raises(ValueError, match=r"\['max_pixel', 'patch_size'\]"):
        QwenVisionSettings.from_config(QWEN3_CONFIG, {"max_pixel": 1, "patch_size": 14, "min_pixels": 4096})
    with pytest.raises(ValueError, match=r"\['height'\]"):
        QwenVisionSettings.from_config(QWEN3_CONFIG, {"size": {"height": 224}})


@pytest.mark.parametrize(
    ("config", "overrides"),
    [
        ({}, {"max_pixels": 0}),
        ({}, {"min_pixels": -5}),
        ({}, {"min_pixels": True}),
        ({}, {"max_pixels": 1.5}),
        ({}, {"max_pixels": "many"}),
        ({}, {"size": 4096}),
        ({}, {"min_pixels": 2**25}),  # above max_pixels
        ({"patch_size": 0}, None),
        ({"image_mean": [0.5, 0.5]}, None),
        ({"image_std": [0.5, 0.0, 0.5]}, None),
        ({"image_std": "abc"}, None),
        ({"rescale_factor": -1.0}, None),
        ({"do_normalize": False}, None),
        ({"resample": 2}, None),
    ],
)
def test_from_config_bad_values_raise(config: dict[str, Any], overrides: dict[str, Any] | None) -> None:
    with pytest.raises(ValueError):
        QwenVisionSettings.from_config(config, overrides)


def test_from_config_accepts_integral_floats_and_scalar_mean() -> None:
    settings = QwenVisionSettings.from_config({"image_mean": 0.5, "image_std": 0.5}, {"max_pixels": 1310720.0})
    assert settings.max_pixels == 1310720
    assert isinstance(settings.max_pixels, int)
    assert settings.image_mean == (0.5, 0.5, 0.5)


def test_module_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, lateserve.server.families.qwen_vl.image_processor as m;"
        "bad = [n for n in ('torch', 'torchvision', 'transformers') if n in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
