"""vae.v1's Tensor ↔ numpy, for the server's vae.v1 front end and the Python client.

A Tensor is a shape, a dtype and raw little-endian row-major bytes; decoding checks each of
them against what the model expects (vaeserve.rows) and says precisely what was wrong. Decoded
arrays are zero-copy, read-only views of the message bytes. The Open Inference Protocol's
tensors have their own codec (vaeserve.service.oip.tensors) over the same checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from vaeserve._proto import vae_pb2
from vaeserve.errors import TensorError
from vaeserve.rows import Buffer, Rows, check_shape, check_values, from_bytes

FLOAT32 = vae_pb2.DATA_TYPE_FLOAT32
UINT8 = vae_pb2.DATA_TYPE_UINT8
_WIRE = {vae_pb2.DATA_TYPE_UNSPECIFIED: np.dtype("<f4"), FLOAT32: np.dtype("<f4"), UINT8: np.dtype("u1")}
_NAMES = {FLOAT32: "float32", UINT8: "uint8", vae_pb2.DATA_TYPE_UNSPECIFIED: "float32 (unspecified)"}

# (reference, the tensor's size in bytes, field name) → the bytes it points at.
SharedBytes = Callable[[vae_pb2.SharedMemoryRef, int, str], memoryview]


def to_tensor(array: np.ndarray) -> vae_pb2.Tensor:
    """float32 or uint8 array → Tensor."""
    dtype = UINT8 if array.dtype == np.uint8 else FLOAT32
    if dtype == FLOAT32 and array.dtype != _WIRE[FLOAT32]:
        array = array.astype("<f4")
    # tobytes() copies in C order whatever the layout: no separate contiguous copy first.
    return vae_pb2.Tensor(shape=array.shape, dtype=dtype, data=array.tobytes())


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


def from_response(tensor: vae_pb2.Tensor, field: str, shared: SharedBytes | None = None) -> np.ndarray:
    """A response's Tensor, of whatever shape the server gave (the client's side): dtype and
    byte length checked, bytes read in place or from the client's shared memory."""
    if tensor.dtype not in _WIRE:
        raise TensorError(f"{field}: unknown dtype {tensor.dtype} in the server's answer")
    shape, dtype = tuple(tensor.shape), _WIRE[tensor.dtype]
    if tensor.HasField("shared_memory") and shared is not None:
        size = math.prod(shape) * dtype.itemsize
        return np.frombuffer(shared(tensor.shared_memory, size, field), dtype=dtype).reshape(shape)
    return from_bytes(tensor.data, dtype, shape, field, _NAMES[tensor.dtype])
