"""What a model's rows must be, checked the same way whatever carried them.

Every protocol's codec (vae.v1's in vaeserve.codec, OIP's in vaeserve.service.oip.tensors),
the Python client and the embedding tool check tensors here, so a bad tensor gets the same
message wherever it came from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vaeserve.errors import TensorError

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Rows:
    """What one input of a model takes: [N, columns] rows with 1 <= N <= max_rows, raw uint8
    pixels when ``uint8``, float32 values finite and within [low, high] when those are given."""

    columns: int
    max_rows: int | None = None
    uint8: bool = True
    low: float | None = None
    high: float | None = None


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


def check_finite(
    array: np.ndarray, field: str, low: float | None = None, high: float | None = None, first_row: int = 0
) -> None:
    """float32 rows must be finite (and within [low, high] when given); the first bad value is
    named by its row (counted from ``first_row``) and column."""
    if array.dtype == np.uint8:
        return
    if (low, high) == (0.0, 1.0) and array.dtype == np.float32 and array.view(np.uint32).max() <= _ONE:
        return  # one pass instead of two: see _ONE
    smallest, largest = float(array.min()), float(array.max())
    if not (np.isfinite(smallest) and np.isfinite(largest)):
        row, column = np.argwhere(~np.isfinite(array))[0]
        raise TensorError(
            f"{field}: NaN or infinity at row {first_row + row}, column {column}; values must be finite"
        )
    if low is not None and high is not None and (smallest < low or largest > high):
        row, column = np.argwhere((array < low) | (array > high))[0]
        raise TensorError(
            f"{field}: values span [{smallest:.9g}, {largest:.9g}]; expected [{low:g}, {high:g}] "
            f"(row {first_row + row}, column {column} is {array[row, column]:.9g})"
        )
