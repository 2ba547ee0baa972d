"""Tensor <-> numpy conversion: the one place that knows the dtype table and byte order.

Must not import torch: the gateway and the client use it too.

>>> import numpy as np
>>> t = to_tensor(np.arange(6, dtype=np.float32).reshape(2, 3))
>>> list(t.shape), from_tensor(t).tolist()
([2, 3], [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
>>> from_tensor(to_tensor(np.array([1.5, -2.0], dtype=np.float32), Dtype.DTYPE_BFLOAT16)).tolist()
[1.5, -2.0]
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from lateserve.v1.common_pb2 import Dtype, Tensor

ITEM_SIZE: dict[int, int] = {
    Dtype.DTYPE_FLOAT32: 4,
    Dtype.DTYPE_FLOAT16: 2,
    Dtype.DTYPE_BFLOAT16: 2,
}


class TensorFormatError(ValueError):
    """A Tensor message whose bytes do not match its dtype and shape."""


def encode_array(array: npt.NDArray[np.float32], dtype: int = Dtype.DTYPE_FLOAT32) -> bytes:
    """Little-endian bytes of a float32 array in the requested wire dtype.

    bfloat16 is the upper 16 bits of float32 with round-to-nearest-even, done in numpy
    because numpy has no bfloat16 type.
    """
    a = np.ascontiguousarray(array, dtype=np.float32)
    if dtype in (Dtype.DTYPE_FLOAT32, Dtype.DTYPE_UNSPECIFIED):
        return a.astype("<f4", copy=False).tobytes()
    if dtype == Dtype.DTYPE_FLOAT16:
        return a.astype("<f2").tobytes()
    if dtype == Dtype.DTYPE_BFLOAT16:
        bits = a.view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # NaN must stay NaN: rounding could carry a NaN payload into infinity.
        rounded = np.where(np.isnan(a), 0x7FC0, rounded)
        return rounded.astype("<u2").tobytes()
    raise TensorFormatError(f"unsupported dtype {dtype}")


def decode_array(data: bytes, dtype: int, shape: tuple[int, ...]) -> npt.NDArray[np.float32]:
    """float32 array from little-endian wire bytes (a copy, safe to keep)."""
    size = ITEM_SIZE.get(dtype or Dtype.DTYPE_FLOAT32)
    if size is None:
        raise TensorFormatError(f"unsupported dtype {dtype}")
    count = int(np.prod(shape)) if shape else 1
    if count * size != len(data):
        raise TensorFormatError(f"{len(data)} bytes do not fit shape {list(shape)} of {size}-byte elements")
    if dtype in (Dtype.DTYPE_FLOAT32, Dtype.DTYPE_UNSPECIFIED):
        out = np.frombuffer(data, dtype="<f4").astype(np.float32)
    elif dtype == Dtype.DTYPE_FLOAT16:
        out = np.frombuffer(data, dtype="<f2").astype(np.float32)
    else:
        out = (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    return out.reshape(shape)


def to_tensor(array: npt.NDArray[np.float32], dtype: int = Dtype.DTYPE_FLOAT32) -> Tensor:
    """A Tensor message holding `array` in `dtype` (unspecified means float32)."""
    wire = Dtype.ValueType(dtype or Dtype.DTYPE_FLOAT32)
    return Tensor(dtype=wire, shape=list(array.shape), data=encode_array(array, wire))


def from_tensor(tensor: Tensor) -> npt.NDArray[np.float32]:
    """float32 numpy array of a Tensor message."""
    return decode_array(tensor.data, tensor.dtype, tuple(int(d) for d in tensor.shape))
