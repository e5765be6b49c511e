"""Outputs of `vae embed`: completed chunks as part files, then one .npy or Parquet file.

Each chunk lands as ``DST.parts/part-NNNNNN.npy`` (a structured array: row_id, mean and
optionally stddev), written atomically: a part file that exists is complete, which is
how a resumed job knows what to skip. The final file is assembled part by part (memory
stays bounded) into a temporary file and renamed into place.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vaeserve.atomic import atomic_path
from vaeserve.errors import MissingExtraError

FORMATS = (".npy", ".parquet")


def record_dtype(latent_size: int, stddev: bool) -> np.dtype:
    fields = [("row_id", "<i8"), ("mean", "<f4", (latent_size,))]
    if stddev:
        fields.append(("stddev", "<f4", (latent_size,)))
    return np.dtype(fields)


class Parts:
    def __init__(self, output: Path) -> None:
        self.folder = output.with_name(output.name + ".parts")

    def path(self, index: int) -> Path:
        return self.folder / f"part-{index:06d}.npy"

    def done(self, index: int) -> bool:
        return self.path(index).exists()

    def write(self, index: int, records: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path(index)) as tmp, open(tmp, "wb") as handle:
            np.save(handle, records, allow_pickle=False)

    def read(self, count: int) -> Iterator[np.ndarray]:
        for index in range(count):
            yield np.load(self.path(index), allow_pickle=False)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def assemble(parts: Parts, count: int, rows: int, dtype: np.dtype, output: Path) -> None:
    """Concatenate the parts into ``output`` (.npy or .parquet), atomically."""
    with atomic_path(output) as tmp:
        if output.suffix == ".npy":
            _write_npy(parts.read(count), dtype, rows, tmp)
        else:
            _write_parquet(parts.read(count), dtype, tmp)


def _write_npy(parts: Iterator[np.ndarray], dtype: np.dtype, rows: int, path: Path) -> None:
    """A .npy header, then the parts' bytes appended in order (sequential writes, so the
    output is never mapped into memory whole)."""
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (rows,)}
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_2_0(handle, header)
        for part in parts:
            handle.write(np.ascontiguousarray(part).tobytes())


def _write_parquet(parts: Iterator[np.ndarray], dtype: np.dtype, path: Path) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingExtraError("writing Parquet", "embed", "pyarrow") from None
    latent = dtype["mean"].shape[0]
    fields = [pa.field("row_id", pa.int64())] + [
        pa.field(n, pa.list_(pa.float32(), latent)) for n in dtype.names[1:]
    ]
    schema = pa.schema(fields)
    with pq.ParquetWriter(path, schema) as writer:
        for part in parts:
            columns = [pa.array(part["row_id"])]
            for name in dtype.names[1:]:
                flat = pa.array(np.ascontiguousarray(part[name]).reshape(-1))
                columns.append(pa.FixedSizeListArray.from_arrays(flat, latent))
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
