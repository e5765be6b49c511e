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

GZIP_MAGIC = b"\x1f\x8b"
TYPES: dict[int, np.dtype] = {
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
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt or truncated gzip data ({exc})") from None


def parse_header(
    head: bytes, source: str, expected_ndim: int | None = None
) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, element type and data offset from the first bytes (at least 4 + 4·rank) of a file."""
    if len(head) < 4:
        raise DataError(f"{source}: {len(head)} bytes is too short for an IDX header")
    zero, type_code, ndim = struct.unpack(">HBB", head[:4])
    if zero != 0 or type_code not in TYPES:
        raise DataError(
            f"{source}: bad IDX magic number 0x{head[:4].hex()} "
            "(expected 0x0000 then a type code 08/09/0B/0C/0D/0E and the rank)"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        raise DataError(f"{source}: IDX rank is {ndim}, expected {expected_ndim}")
    header_size = 4 + 4 * ndim
    if len(head) < header_size:
        raise DataError(f"{source}: truncated IDX header")
    return struct.unpack(f">{ndim}I", head[4:header_size]), TYPES[type_code], header_size


def parse_idx(content: bytes, source: str, expected_ndim: int | None = None) -> np.ndarray:
    """Parse IDX bytes into an array in native byte order."""
    shape, dtype, header_size = parse_header(content, source, expected_ndim)
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
