"""float32 -> 8-bit floats (vLLM's `embed_dtype` "fp8_e4m3" / "fp8_e5m2"), in numpy.

vLLM encodes these with torch's `tensor.to(torch.float8_e4m3fn)` / `torch.float8_e5m2`, so the bits
here follow torch's conversion exactly (tests/gateway/test_fp8.py compares every float16 value and
random float32 bit patterns against torch):

- round to nearest, ties to even, subnormals included;
- e4m3fn (no infinities; max 448) saturates: anything that would round past 448, infinity included,
  becomes 448 (0x7E with the input's sign); NaN becomes NaN (0x7F with the sign).
- e5m2 (IEEE-like; max 57344) does not: a magnitude from 61440 up (the halfway point to the next
  step) becomes infinity (0x7C with the sign); NaN stays NaN (0x7F with the sign).
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

_U32 = np.uint32


def _f32(bits: int) -> np.float32:
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


def _convert(
    array: npt.ArrayLike,
    *,
    mantissa_bits: int,
    bias: int,
    overflow_at: int,
    subnormal_below: int,
    subnormal_shift: int,
    overflow_value: npt.NDArray[np.uint8] | int,
    largest: int = 0xFF,
) -> npt.NDArray[np.uint8]:
    """The shared bit recipe: float32 bits -> sign, magnitude; subnormal results by a float32 addition
    that rounds at the target's subnormal step; normal ones by adding the rebias and a rounding
    increment (ties to even) and keeping the top bits."""
    values = np.ascontiguousarray(array, dtype=np.float32)
    bits = values.view(_U32)
    sign = ((bits >> _U32(24)) & _U32(0x80)).astype(np.uint8)
    magnitude = bits & _U32(0x7FFFFFFF)
    drop = 23 - mantissa_bits
    # Subnormal range: adding 2^k shifts the value's bits so the float32 rounding lands on the target's step.
    denorm = _U32(subnormal_shift << 23)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN / inf lanes are replaced below
        shifted = (magnitude.view(np.float32) + _f32(subnormal_shift << 23)).view(_U32)
    small = (shifted - denorm).astype(np.uint8)
    # Normal range: rebias the exponent, round half to even on the dropped bits, keep the top byte.
    odd = (magnitude >> _U32(drop)) & _U32(1)
    wide = magnitude.astype(np.int64) + ((bias - 127) << 23) + ((1 << (drop - 1)) - 1) + odd.astype(np.int64)
    normal = np.minimum((wide >> drop) & 0xFF, largest).astype(np.uint8)
    out = np.where(magnitude < _U32(subnormal_below << 23), small, normal)
    out = np.where(magnitude >= _U32(overflow_at), overflow_value, out).astype(np.uint8)
    return (out | sign).reshape(values.shape)


def float32_to_e4m3fn(array: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """torch.float8_e4m3fn bits of float32 values (see the module docstring for rounding and overflow)."""
    values = np.ascontiguousarray(array, dtype=np.float32)
    magnitude = values.view(_U32) & _U32(0x7FFFFFFF)
    overflow = np.where(magnitude > _U32(0xFF << 23), np.uint8(0x7F), np.uint8(0x7E))
    return _convert(
        values,
        mantissa_bits=3,
        bias=7,
        overflow_at=1087 << 20,  # 480.0 and up (inf too): saturated to 448, NaN kept
        subnormal_below=121,  # 2^-6, the smallest normal e4m3 value
        subnormal_shift=141,  # 2^14: float32's ulp there is e4m3's subnormal step 2^-9
        overflow_value=overflow,
        largest=0x7E,  # 448: 464..480 would round to 0x7F, which is NaN in e4m3fn
    )


def float32_to_e5m2(array: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """torch.float8_e5m2 bits of float32 values (see the module docstring for rounding and overflow)."""
    values = np.ascontiguousarray(array, dtype=np.float32)
    magnitude = values.view(_U32) & _U32(0x7FFFFFFF)
    overflow = np.where(magnitude > _U32(0xFF << 23), np.uint8(0x7F), np.uint8(0x7C))
    return _convert(
        values,
        mantissa_bits=2,
        bias=15,
        overflow_at=143 << 23,  # 65536.0: infinity from here (61440..65536 round up to it)
        subnormal_below=113,  # 2^-14
        subnormal_shift=134,  # 2^7: float32's ulp there is e5m2's subnormal step 2^-16
        overflow_value=overflow,
    )


FP8: Final = {"fp8_e4m3": float32_to_e4m3fn, "fp8_e5m2": float32_to_e5m2}
"""vLLM's fp8 embed_dtype names -> converter."""
