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
from vaeserve.layout import to_rows

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Rows:
    """What one input of a model takes: [N, columns] rows with 1 <= N <= max_rows, raw uint8
    pixels when ``uint8``, float32 values finite and within [low, high] when those are given.
    A model whose graphs take images also takes them as [N, *image] (``image``: [C, H, W],
    channels first, vaeserve.layout), read as the same rows."""

    columns: int
    max_rows: int | None = None
    uint8: bool = True
    low: float | None = None
    high: float | None = None
    image: tuple[int, ...] = ()
    # Images of any size (an imported autoencoder's): ``image`` is (C, 0, 0), the sides positive
    # multiples of ``multiple``, the batch at most ``max_values`` values; taken as [N, C, H, W].
    multiple: int = 1
    max_values: int | None = None

    @property
    def any_size(self) -> bool:
        return len(self.image) == 3 and self.image[1:] == (0, 0)


def check_image_shape(shape: tuple[int, ...], field: str, expect: Rows) -> tuple[int, ...]:
    """[N, C, H, W] of an image of any size: C the model's, H and W positive multiples of
    ``multiple``, 1 <= N <= max_rows, N·C·H·W <= max_values; or a TensorError saying which."""
    channels, step = expect.image[0], expect.multiple
    if len(shape) != 4 or shape[1] != channels:
        hint = ""
        if len(shape) == 4 and shape[3] == channels:
            hint = "; channels last? array.transpose(0, 3, 1, 2)"
        elif len(shape) == 3 and shape[0] == channels:
            hint = f"; one image is [1, {channels}, H, W]: array[None]"
        raise TensorError(
            f"{field}: shape {list(shape)}; this model takes [N, {channels}, H, W] (channels first){hint}"
        )
    rows, _, height, width = shape
    if height < 1 or width < 1 or height % step or width % step:
        raise TensorError(
            f"{field}: shape {list(shape)}; height and width must be positive multiples of {step} "
            f"(the model's {'downscale factor' if step > 1 else 'step'}): resize or pad the image"
        )
    if rows < 1:
        raise TensorError(f"{field}: empty batch (shape {list(shape)}); send at least one image")
    if expect.max_rows is not None and rows > expect.max_rows:
        raise TensorError(
            f"{field}: {rows} images exceed this server's limit of {expect.max_rows} per request; "
            "split the batch"
        )
    values = math.prod(shape)
    if expect.max_values is not None and values > expect.max_values:
        raise TensorError(
            f"{field}: shape {list(shape)} holds {values:,} values, more than this server's limit of "
            f"{expect.max_values:,} per request (--max-request-pixels); send fewer or smaller images"
        )
    return shape


def check_shape(shape: Sequence[int], field: str, expect: Rows) -> tuple[int, ...]:
    """[N, columns] (or [N, *image]) with 1 <= N <= max_rows, as rows [N, columns]; or a
    TensorError saying which part is wrong."""
    shape = tuple(shape)
    if expect.any_size:
        return check_image_shape(shape, field, expect)
    columns = expect.columns
    if expect.image and len(shape) == len(expect.image) + 1:
        if shape[1:] != expect.image:
            c, h, w = expect.image
            hint = "; channels last? array.transpose(0, 3, 1, 2)" if shape[1:] == (h, w, c) else ""
            raise TensorError(
                f"{field}: shape {list(shape)}; this model takes images [N, {c}, {h}, {w}] (channels "
                f"first) or rows [N, {columns}]{hint}"
            )
        shape = (shape[0], columns)
    if len(shape) != 2:
        hint = ""
        if len(shape) > 2 and math.prod(shape[1:]) == columns:
            hint = f"; flatten each row: array.reshape({shape[0]}, {columns})"
        elif len(shape) == 1 and shape[0] == columns:
            hint = f"; one row is [1, {columns}]: array.reshape(1, {columns})"
        raise TensorError(
            f"{field}: shape {list(shape)} has {len(shape)} dimensions; expected [N, {columns}]{hint}"
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
    if rows.dtype == np.uint8:
        refuse_binary_uint8(rows, field)
    check_finite(rows, field, expect.low, expect.high)


def refuse_binary_uint8(pixels: np.ndarray, field: str) -> None:
    """uint8 pixels are 0-255. Rows that hold only 0 and 1 are binarized images stored as uint8
    (as binarized MNIST often is), which read as 0-255 are all but black: every row would embed
    alike. Refused, saying how to send them; an all-black batch (only 0) passes."""
    if pixels.size and int(pixels.max()) == 1:
        raise TensorError(
            f"{field}: uint8 pixels holding only 0 and 1; uint8 pixels are read as 0-255, so these "
            "are all but black. Binarized images go as 0/255 (array * 255) or as float32 0.0/1.0 "
            "(array.astype('float32'))"
        )


def as_rows(array: np.ndarray, field: str, image_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Input rows as every entry point reads them (the Python client, `vae embed`, the console's
    server): one set of rules.

    Shape: [N, D] as it is; images [N, H, W], [N, H, W, C] (channels last) or [N, C, H, W]
    (channels first) become rows channels first as the model of ``image_shape`` reads them
    (vaeserve.layout; unknown ``image_shape``: flattened per row); a single row [D] (one image or
    feature vector) is [1, D].
    dtype: uint8 is pixels 0-255; other integer types are pixels too, when within 0-255 (made
    uint8); bool is 0/1 values (float32); floating point is model inputs in [0, 1] (float32).
    uint8 or integer rows holding only 0 and 1 are refused (see refuse_binary_uint8)."""
    array = np.asarray(array)
    if array.ndim == 0 or array.size == 0:
        raise TensorError(
            f"{field}: shape {list(array.shape)} holds no rows; expected rows [N, D] "
            "(or images [N, H, W], or one row [D])"
        )
    if array.ndim == 1:
        array = array.reshape(1, -1)
    elif array.ndim > 2:
        array = to_rows(array, image_shape, field)
    if array.dtype == np.uint8:
        refuse_binary_uint8(array, field)
        return array
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise TensorError(
                f"{field}: {array.dtype} values span [{low}, {high}]; integer pixels must be 0-255 "
                "(or send float32 model inputs in [0, 1])"
            )
        pixels = array.astype(np.uint8)
        refuse_binary_uint8(pixels, field)
        return pixels
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32, copy=False)
    raise TensorError(
        f"{field}: dtype {array.dtype} is not pixels; expected uint8 (0-255) or float32 in [0, 1]"
    )


def as_images(array: np.ndarray, field: str, channels: int = 3) -> np.ndarray:
    """Images for an imported autoencoder, [N, C, H, W] of any size: [N, H, W, C] (channels last,
    as PIL and numpy hold them) is transposed, one image [C, H, W] or [H, W, C] is a batch of one;
    uint8 (or integers within 0-255) are pixels, floats are model inputs in [−1, 1] (float32)."""
    array = np.asarray(array)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or channels not in (array.shape[1], array.shape[3]):
        raise TensorError(
            f"{field}: shape {list(array.shape)}; expected images [N, {channels}, H, W] "
            f"or [N, H, W, {channels}]"
        )
    if array.shape[1] != channels:
        array = array.transpose(0, 3, 1, 2)
    if np.issubdtype(array.dtype, np.integer) and array.dtype != np.uint8:
        if array.size and (int(array.min()) < 0 or int(array.max()) > 255):
            raise TensorError(f"{field}: {array.dtype} values outside 0-255; integer pixels must be 0-255")
        array = array.astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32, copy=False)
    elif array.dtype != np.uint8:
        raise TensorError(f"{field}: dtype {array.dtype}; expected uint8 pixels or float32 in [-1, 1]")
    return np.ascontiguousarray(array)


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
        row, column, _ = _first(~np.isfinite(array))
        raise TensorError(
            f"{field}: NaN or infinity at row {first_row + row}, {column}; values must be finite"
        )
    if low is not None and high is not None and (smallest < low or largest > high):
        row, column, index = _first((array < low) | (array > high))
        raise TensorError(
            f"{field}: values span [{smallest:.9g}, {largest:.9g}]; expected [{low:g}, {high:g}] "
            f"(row {first_row + row}, {column} is {array[index]:.9g})"
        )


def _first(bad: np.ndarray) -> tuple[int, str, tuple[int, ...]]:
    """The first bad value: its row, where in the row ("column C" of a row, "position [c, y, x]"
    of an image) and its index."""
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    where = f"column {index[1]}" if len(index) == 2 else f"position {list(index[1:])}"
    return index[0], where, index
