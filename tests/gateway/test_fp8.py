"""The gateway's numpy fp8 encoders equal torch's float8 conversions bit for bit (vLLM encodes
embed_dtype fp8_e4m3 / fp8_e5m2 with torch)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from lateserve.gateway.common.fp8 import float32_to_e4m3fn, float32_to_e5m2

torch = pytest.importorskip("torch")


def _samples() -> np.ndarray:
    every_half = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    rng = np.random.default_rng(0)
    random_bits = rng.integers(0, 1 << 32, size=400_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    edges = np.array(
        [0.0, -0.0, 448.0, 464.0, 464.0001, 479.9, 480.0, 57344.0, 61440.0, 61439.99, 65536.0, 2.0**-9, 2.0**-10,
         2.0**-16, 2.0**-17, 1.5 * 2.0**-17, np.inf, -np.inf, np.nan, 1e-45, -3.0e38],
        dtype=np.float32,
    )  # fmt: skip
    scaled = rng.standard_normal(100_000).astype(np.float32) * np.float32(0.05)
    return np.concatenate([every_half, random_bits, edges, scaled, -edges])


@pytest.mark.parametrize(
    ("convert", "torch_dtype"),
    [(float32_to_e4m3fn, "float8_e4m3fn"), (float32_to_e5m2, "float8_e5m2")],
)
def test_bits_equal_torch(convert: Any, torch_dtype: str) -> None:
    values = _samples()
    expected = torch.from_numpy(values).to(getattr(torch, torch_dtype)).view(torch.uint8).numpy()
    got = convert(values)
    mismatch = np.flatnonzero(got != expected)
    assert mismatch.size == 0, [(float(values[i]), int(got[i]), int(expected[i])) for i in mismatch[:10]]


def test_shape_is_kept() -> None:
    values = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)
    assert float32_to_e4m3fn(values).shape == (3, 4)
    assert float32_to_e5m2(values).dtype == np.uint8
