"""numpy ↔ wire tensors: the checks every protocol shares, and vae.v1's Tensor.

A Tensor is a shape, a dtype and raw little-endian row-major bytes; decoding
checks each of them against what the model expects (``Rows``) and says precisely
what was wrong. Decoded arrays are zero-copy, read-only views of the message
bytes. The Open Inference Protocol's tensors (vaeserve.service.oip.tensors) go
through the same ``check_shape``, ``from_bytes`` and ``check_values``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from vaeserve._proto import vae_pb2
from vaeserve.errors import TensorError

FLOAT32 = vae_pb2.DATA_TYPE_FLOAT32
UINT8 = vae_pb2.DATA_TYPE_UINT8
_WIRE = {vae_pb2.DATA_TYPE_UNSPECIFIED: np.dtype("<f4"), FLOAT32: np.dtype("<f4"), UINT8: np.dtype("u1")}
_NAMES = {FLOAT32: "float32", UINT8: "uint8", vae_pb2.DATA_TYPE_UNSPECIFIED: "float32 (unspecified)"}

# (reference, the tensor's size in bytes, field name) → the bytes it points at.
Buffer = bytes | bytearray | memoryview
SharedBytes = Callable[[vae_pb2.SharedMemoryRef, int, str], memoryview]


def to_tensor(array: np.ndarray) -> vae_pb2.Tensor:
    """float32 or uint8 array → Tensor."""
    dtype = UINT8 if array.dtype == np.uint8 else FLOAT32
    if dtype == FLOAT32 and array.dtype != _WIRE[FLOAT32]:
        array = array.astype("<f4")
    # tobytes() copies in C order whatever the layout: no separate contiguous copy first.
    return vae_pb2.Tensor(shape=array.shape, dtype=dtype, data=array.tobytes())


@dataclass(frozen=True)
class Rows:
    """What one input of a model takes: [N, columns] rows with 1 <= N <= max_rows, raw uint8
    pixels when ``uint8``, float32 values finite and within [low, high] when those are given."""

    columns: int
    max_rows: int | None = None
    uint8: bool = True
    low: float | None = None
    high: float | None = None


def from_tensor(
    tensor: vae_pb2.Tensor,
    field: str,
    expect: Rows,
    shared: SharedBytes | None = None,
    data: Buffer | None = None,
) -> np.ndarray:
    """Tensor → array [N, columns], checking shape, dtype, byte length and row count.
    Bytes in shared memory are read through ``shared``; ``data``, when given, holds the
    tensor's bytes in place of its ``data`` field (read in place by service.wire)."""
    if tensor.dtype not in _WIRE:
        raise TensorError(
            f"{field}: unknown dtype {tensor.dtype}; expected DATA_TYPE_FLOAT32 or DATA_TYPE_UINT8"
        )
    if tensor.dtype == UINT8 and not expect.uint8:
        raise TensorError(f"{field}: dtype uint8 is not accepted here; send DATA_TYPE_FLOAT32")
    shape = check_shape(tensor.shape, field, expect)
    dtype = _WIRE[tensor.dtype]
    payload = tensor.data if data is None else data
    if tensor.HasField("shared_memory"):
        if len(payload):
            raise TensorError(f"{field}: both data and shared_memory are set; send the bytes one way")
        if shared is None:
            raise TensorError(f"{field}: shared_memory is not accepted here; send the bytes in data")
        expected = shape[0] * shape[1] * dtype.itemsize
        return np.frombuffer(shared(tensor.shared_memory, expected, field), dtype=dtype).reshape(shape)
    return from_bytes(payload, dtype, shape, field, _NAMES[tensor.dtype])


def read_tensor(
    tensor: vae_pb2.Tensor,
    field: str,
    expect: Rows,
    shared: SharedBytes | None = None,
    data: Buffer | None = None,
) -> np.ndarray:
    """A request's Tensor as the model's input rows: ``from_tensor``, then the values checked."""
    rows = from_tensor(tensor, field, expect, shared, data)
    check_values(rows, field, expect)
    return rows


def check_shape(shape: Sequence[int], field: str, expect: Rows) -> tuple[int, int]:
    """[N, columns] with 1 <= N <= max_rows, or a TensorError saying which part is wrong."""
    shape = tuple(shape)
    columns = expect.columns
    if len(shape) != 2:
        raise TensorError(
            f"{field}: shape {list(shape)} has {len(shape)} dimensions; expected [N, {columns}]"
        )
    rows, cols = shape
    if cols != columns:
        raise TensorError(f"{field}: shape {list(shape)} has {cols} columns; this model expects {columns}")
    if rows < 1:
        raise TensorError(f"{field}: empty batch (shape {list(shape)}); send at least one row")
    if expect.max_rows is not None and rows > expect.max_rows:
        raise TensorError(
            f"{field}: {rows} rows exceed this server's limit of {expect.max_rows} per request; "
            "split the batch (the Python client does this for you)"
        )
    return rows, cols


def from_bytes(
    data: Buffer, dtype: np.dtype, shape: tuple[int, ...], field: str, dtype_name: str
) -> np.ndarray:
    """Raw little-endian row-major bytes of a checked shape → a zero-copy, read-only array."""
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise TensorError(
            f"{field}: {len(data)} bytes for shape {list(shape)} of {dtype_name}; expected {expected}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def check_values(rows: np.ndarray, field: str, expect: Rows) -> None:
    check_finite(rows, field, expect.low, expect.high)


# The bit patterns of float32 +0.0 to 1.0 are the integers 0 to 0x3F800000, in order; a
# negative number, a larger one, infinity or NaN reads as a larger integer. So every
# value lies in [0, 1] when the largest pattern is at most this (else the exact check
# below decides, and -0.0 passes it).
_ONE = int(np.float32(1.0).view(np.uint32))


def check_finite(array: np.ndarray, field: str, low: float | None = None, high: float | None = None) -> None:
    """float32 rows must be finite (and within [low, high] when given)."""
    if array.dtype == np.uint8:
        return
    if (low, high) == (0.0, 1.0) and array.dtype == np.float32 and array.view(np.uint32).max() <= _ONE:
        return  # one pass instead of two: see _ONE
    smallest, largest = float(array.min()), float(array.max())
    if not (np.isfinite(smallest) and np.isfinite(largest)):
        bad = np.argwhere(~np.isfinite(array))[0]
        raise TensorError(f"{field}: NaN or infinity at row {bad[0]}, column {bad[1]}; values must be finite")
    if low is not None and high is not None and (smallest < low or largest > high):
        raise TensorError(
            f"{field}: values span [{smallest:.9g}, {largest:.9g}]; expected [{low:g}, {high:g}]"
        )
