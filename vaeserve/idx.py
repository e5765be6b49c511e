"""Reader for the IDX format of MNIST and Fashion-MNIST (LeCun et al.).

An IDX file is: two zero bytes, a type code, the number of dimensions, one
big-endian uint32 per dimension, then the values in row-major, big-endian
order. Files may be gzip-compressed. Every check failure names the file.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from vaeserve.errors import DataError

_GZIP_MAGIC = b"\x1f\x8b"
_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_bytes(path: Path) -> bytes:
    """The file's content, decompressed if it is gzip."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt or truncated gzip data ({exc})") from None


def parse_idx(content: bytes, source: str, expected_ndim: int | None = None) -> np.ndarray:
    """Parse IDX bytes into an array in native byte order."""
    if len(content) < 4:
        raise DataError(f"{source}: {len(content)} bytes is too short for an IDX header")
    zero, type_code, ndim = struct.unpack(">HBB", content[:4])
    if zero != 0 or type_code not in _TYPES:
        raise DataError(
            f"{source}: bad IDX magic number 0x{content[:4].hex()} "
            "(expected 0x0000 then a type code 08/09/0B/0C/0D/0E and the rank)"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        raise DataError(f"{source}: IDX rank is {ndim}, expected {expected_ndim}")
    header_size = 4 + 4 * ndim
    if len(content) < header_size:
        raise DataError(f"{source}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", content[4:header_size])
    dtype = _TYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(content) - header_size
    if actual != expected:
        problem = "truncated" if actual < expected else "has trailing bytes"
        raise DataError(
            f"{source}: IDX data {problem}: {actual} bytes for shape {shape}, expected {expected}"
        )
    data = np.frombuffer(content, dtype=dtype, offset=header_size).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: Path, expected_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (raw or gzip) with magic-number, rank and length checks."""
    return parse_idx(read_bytes(path), str(path), expected_ndim)
