"""Open Inference Protocol tensors ↔ numpy: datatypes, raw bytes, typed values.

The one place OIP's tensors are converted, inputs and outputs, for both front ends: raw bytes
(gRPC's ``raw_input_contents``/``raw_output_contents``, HTTP's binary tensor data extension)
and typed values (gRPC's ``contents``, HTTP's JSON ``data``). Shapes, byte lengths and values
are checked by vaeserve.rows, so a bad tensor gets the same message over every protocol.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from vaeserve import rows as checks
from vaeserve.errors import RequestError, TensorError
from vaeserve.service.oip.endpoints import Endpoint, Input

# The specification's datatypes the models here take or give, as numpy dtypes, and the field of
# gRPC's InferTensorContents that carries each (the specification puts UINT8 in uint_contents).
DTYPES = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1"), "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2")}
DATATYPE = {dtype.newbyteorder("="): name for name, dtype in DTYPES.items()}
CONTENTS = {"FP32": "fp32_contents", "UINT8": "uint_contents", "INT64": "int64_contents"}
BYTES = (bytes, bytearray, memoryview)  # raw tensor data; anything else holds typed values


def read_inputs(
    endpoint: Endpoint, given: Iterable[tuple[str, str, Sequence[int], object]]
) -> dict[str, np.ndarray]:
    """(name, datatype, shape, data) of each input in a request → the model's arrays by name."""
    inputs: dict[str, np.ndarray] = {}
    for name, datatype, shape, data in given:
        if name in inputs:
            raise RequestError(f"input {name!r} is given twice; send each input once")
        inputs[name] = read(endpoint.input(name), datatype, shape, data)
    return inputs


def read(expected: Input, datatype: str, shape: Sequence[int], data: checks.Buffer | Sequence) -> np.ndarray:
    """One input tensor → the model's array: raw bytes (``data`` bytes-like) or values."""
    spec = expected.spec
    if datatype not in spec.datatypes:
        raise TensorError(f"{spec.name}: datatype {datatype!r}; expected {' or '.join(spec.datatypes)}")
    dtype = DTYPES[datatype]
    shape = _checked_shape(expected, shape)
    if isinstance(data, BYTES):
        array = checks.from_bytes(data, dtype, shape, spec.name, datatype)
    else:
        array = from_values(data, dtype, shape, spec.name, datatype)
    if expected.rows is not None:
        checks.check_values(array, spec.name, expected.rows)
    return array


def _checked_shape(expected: Input, shape: Sequence[int]) -> tuple[int, ...]:
    spec = expected.spec
    if expected.rows is not None:
        return checks.check_shape(shape, spec.name, expected.rows)
    if tuple(shape) != spec.shape:
        raise TensorError(f"{spec.name}: shape {list(shape)}; expected {list(spec.shape)}")
    return tuple(shape)


def from_values(
    values: Sequence, dtype: np.dtype, shape: tuple[int, ...], field: str, datatype: str
) -> np.ndarray:
    """Typed values (flat or nested, row-major) → an array of ``dtype`` and ``shape``; integers
    must be whole and fit the datatype."""
    count = math.prod(shape)
    try:
        array = np.asarray(values)
    except (ValueError, TypeError):
        raise TensorError(
            f"{field}: data is not a regular array of numbers; expected {count} values"
        ) from None
    if array.size != count:
        raise TensorError(f"{field}: {array.size} values for shape {list(shape)}; expected {count}")
    if array.dtype.kind not in "biuf":
        raise TensorError(f"{field}: data holds {array.dtype} values; expected {datatype} numbers")
    if dtype.kind in "iu" and array.size:
        if array.dtype.kind == "f" and not np.array_equal(array, np.trunc(array)):
            raise TensorError(f"{field}: data holds fractions; {datatype} takes whole numbers")
        low, high = np.iinfo(dtype).min, np.iinfo(dtype).max
        if array.min() < low or array.max() > high:
            raise TensorError(
                f"{field}: values span [{array.min()}, {array.max()}]; {datatype} holds {low} to {high}"
            )
    return array.astype(dtype, copy=False).reshape(shape)


# -- outputs -------------------------------------------------------------------------------------
def describe(name: str, array: np.ndarray) -> dict:
    """An output tensor's name, datatype and shape, as both front ends answer them."""
    return {"name": name, "datatype": DATATYPE[array.dtype], "shape": list(array.shape)}


def contents_field(array: np.ndarray) -> str:
    """The field of gRPC's InferTensorContents that carries an output's typed values."""
    return CONTENTS[DATATYPE[array.dtype]]


def raw(array: np.ndarray) -> bytes:
    """An output's raw bytes: little-endian, row-major."""
    return np.ascontiguousarray(array).tobytes()
