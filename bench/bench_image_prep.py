"""Images/s on one core: lateserve's Qwen image preparation vs transformers' Qwen2VLImageProcessorPil.

One core because the server prepares images on its own threads next to everything else; per-core throughput
is what an operator multiplies. Both sides get the same PIL image (RGB, as lateserve.server.media hands it
over) and the same settings, and the outputs are checked to be identical before timing.

    taskset -c 0 .venv/bin/python bench/bench_image_prep.py [--reps 15] [--cpu 0]
"""

from __future__ import annotations

import os

# Before numpy is imported: its BLAS pool would otherwise start one thread per core.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from lateserve.server.families.qwen_vl.image_processor import QwenVisionSettings, preprocess  # noqa: E402


def scanned_page(width: int = 1275, height: int = 1650, seed: int = 0) -> Image.Image:
    """A 150-dpi letter page: off-white paper grain, lines of dark 'words', a little scan noise."""
    rng = np.random.default_rng(seed)
    paper = rng.normal(245, 4, (height, width)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(np.repeat(paper[:, :, None], 3, axis=2))
    draw = ImageDraw.Draw(image)
    for y in range(110, height - 110, 26):
        x = 100
        while x < width - 160:
            word = int(rng.integers(18, 90))
            ink = int(rng.integers(10, 70))
            for k in range(0, word, 4):  # glyph-like vertical strokes of varying height
                top = y + int(rng.integers(0, 6))
                draw.rectangle((x + k, top, x + k + 1, y + 14), fill=(ink, ink, ink))
            x += word + int(rng.integers(8, 14))
    return image


def screenshot(width: int = 1920, height: int = 1080, seed: int = 1) -> Image.Image:
    """A desktop screenshot: flat panels, a toolbar, coloured buttons and rows of small text."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), (32, 33, 36))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width, 40), fill=(60, 64, 67))
    draw.rectangle((0, 40, 300, height), fill=(45, 46, 50))
    draw.rectangle((320, 60, width - 20, height - 20), fill=(250, 250, 250))
    for i in range(12):
        color = tuple(int(c) for c in rng.integers(40, 230, 3))
        draw.rounded_rectangle((20 + i * 110, 8, 110 + i * 110, 32), radius=6, fill=color)
    for y in range(80, height - 40, 22):
        x = 340
        while x < width - 200:
            word = int(rng.integers(20, 110))
            draw.rectangle((x, y, x + word, y + 10), fill=(40, 40, 40))
            x += word + 9
    for y in range(60, height - 40, 28):
        draw.rectangle((20, y, 20 + int(rng.integers(80, 260)), y + 12), fill=(200, 200, 200))
    return image


def reference_processor(settings: QwenVisionSettings) -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": settings.min_pixels, "longest_edge": settings.max_pixels},
        patch_size=settings.patch_size,
        temporal_patch_size=settings.temporal_patch_size,
        merge_size=settings.merge_size,
        image_mean=list(settings.image_mean),
        image_std=list(settings.image_std),
        rescale_factor=settings.rescale_factor,
    )


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up: table build, allocator, lazy imports
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions per cell (median reported)")
    parser.add_argument("--cpu", type=int, default=0, help="core to pin to (also use taskset for the imports)")
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.cpu})

    images = {"scanned page 1275x1650": scanned_page(), "screenshot 1920x1080": screenshot()}
    configs = {
        "Qwen3 defaults": QwenVisionSettings(),
        "max_pixels 1310720": QwenVisionSettings(max_pixels=1310720),
    }
    print(f"affinity {sorted(os.sched_getaffinity(0))}, {args.reps} reps per cell, median")
    print()
    print("| image | settings | grid | tokens | lateserve img/s | transformers img/s | ours/transformers |")
    print("|---|---|---|---|---|---|---|")
    for image_name, image in images.items():
        for config_name, settings in configs.items():
            reference = reference_processor(settings)
            ours = preprocess(image, settings)
            expected = reference(image, return_tensors="np")
            diff = float(np.abs(ours.pixel_values - expected["pixel_values"]).max())
            if diff > 1e-6 or ours.grid_thw != tuple(int(v) for v in expected["image_grid_thw"][0]):
                raise SystemExit(f"{image_name} / {config_name}: outputs differ (max abs diff {diff})")
            t_ours = median_seconds(lambda image=image, settings=settings: preprocess(image, settings), args.reps)
            t_ref = median_seconds(
                lambda image=image, reference=reference: reference(image, return_tensors="np"), args.reps
            )
            _, gh, gw = ours.grid_thw
            print(
                f"| {image_name} | {config_name} | {gh}x{gw} | {ours.num_tokens} | {1 / t_ours:.1f} "
                f"| {1 / t_ref:.1f} | {t_ref / t_ours:.2f}x |"
            )


if __name__ == "__main__":
    main()
