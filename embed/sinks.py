"""Outputs of `vae embed`: chunks written as they finish, then one .npy or Parquet file.

Both sinks record which chunks are finished, durably, so a resumed job skips them, and
neither lets an unfinished output appear under its final name:

- ``.npy`` (`NpyChunks`): rows have a fixed size, so every chunk goes straight to its
  final offset in ``DST.partial``, a file the size of the finished output; after its
  bytes are on disk, the chunk's number is appended to ``DST.journal``. When every
  chunk is there the partial file is renamed to ``DST``. One write per byte: no
  assembly pass. The header is padded to a whole disk block, so with block-aligned
  chunks (the default 8,192 rows) the records go to the disk by direct I/O, straight
  from the buffer `aligned_records` gave, without a copy through the page cache: on a
  small machine that copy costs as much CPU as preparing the pixels.
- Parquet (`ParquetParts`): a chunk lands as ``DST.parts/part-NNNNNN.npy``, written
  atomically (a part that exists is complete); the parts are then streamed in order
  into a Parquet file that is renamed into place.
- A partitioned Parquet dataset (`DatasetParts`), what an output on object storage and
  the Ray engine write: ``DST/part-NNNNNN.parquet``, one object (or atomically renamed
  file) per chunk, written by whichever process encoded it, and ``DST/_SUCCESS`` last.
  A part that exists is complete; the dataset is complete once the marker is there.
"""

from __future__ import annotations

import io
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from vaeserve.atomic import atomic_path
from vaeserve.errors import ConfigError, DataError, MissingExtraError
from vaeserve.ood import SCORE_FIELDS
from vaeserve.storage import Location, ObjectPath, names_in, remove, write_whole

FORMATS = (".npy", ".parquet")

# Direct I/O wants the file offset, the length and the memory address in whole logical
# blocks; 4 KiB covers 512-byte and 4K-native disks.
BLOCK = 4096


def record_dtype(latent_shape: int | tuple[int, ...], stddev: bool) -> np.dtype:
    """row_id and the latents of a row: [M] (a VAE's), or [C, h, w] (an imported autoencoder's;
    Parquet stores them flat, the sidecar's latent_shape says how to view them)."""
    shape = (latent_shape,) if isinstance(latent_shape, int) else tuple(latent_shape)
    fields = [("row_id", "<i8"), ("mean", "<f4", shape)]
    if stddev:
        fields.append(("stddev", "<f4", shape))
    return np.dtype(fields)


def score_dtype(flagged: bool = False) -> np.dtype:
    """`vae score`'s records: row_id and one float32 per score (vaeserve.ood), and with
    ``flagged`` the ood_flag int8: -1 below the test set's 0.5th ood_score percentile (more
    typical than nearly every test row: blank or constant inputs), +1 above its 99.5th
    (unusual), 0 typical."""
    flag = [("ood_flag", "i1")] if flagged else []
    return np.dtype([("row_id", "<i8"), *((name, "<f4") for name in SCORE_FIELDS), *flag])


class ChunkSink(Protocol):
    def leftovers(self) -> list[Path]:
        """Files an unfinished job left behind."""

    def remove(self) -> None:
        """Delete what an unfinished job left behind."""

    def finished(self) -> set[int]:
        """The chunks on disk that a --resume would keep."""

    def start(self, resume: bool) -> set[int]:
        """Prepare to write; the chunks already finished (none unless resuming)."""

    def write(self, index: int, records: np.ndarray) -> None:
        """Store one chunk's records durably; from then on it counts as finished."""

    def finish(self) -> None:
        """Every chunk is written: put the output under its final name."""

    def close(self) -> None:
        """Release open files (after finish, or when the job fails)."""


def aligned_records(rows: int, dtype: np.dtype) -> np.ndarray:
    """An uninitialised records array whose data starts on a block boundary."""
    raw = np.empty(rows * dtype.itemsize + BLOCK, np.uint8)
    start = -raw.ctypes.data % BLOCK
    return raw[start : start + rows * dtype.itemsize].view(dtype)


def open_sink(
    output: Location, rows: int, chunk_rows: int, dtype: np.dtype, dataset: bool = False
) -> ChunkSink:
    """The sink of ``output``: a partitioned dataset on object storage or when asked for (the
    Ray engine's), else one local .npy or Parquet file."""
    count = -(-rows // chunk_rows)
    if isinstance(output, ObjectPath) or dataset:
        if output.suffix != ".parquet":
            raise ConfigError(
                f"--output {output}: on object storage and with --engine ray the output is a "
                "partitioned Parquet dataset; name it DST.parquet"
            )
        return DatasetParts(output, count, dtype)
    if output.suffix == ".npy":
        return NpyChunks(output, rows, chunk_rows, dtype)
    return ParquetParts(output, count, dtype)


class NpyChunks:
    """Chunks written in place into a preallocated .npy, with a journal of finished chunks."""

    def __init__(self, output: Path, rows: int, chunk_rows: int, dtype: np.dtype) -> None:
        self.output, self.rows, self.chunk_rows, self.dtype = output, rows, chunk_rows, dtype
        self.partial = output.with_name(output.name + ".partial")
        self.journal = output.with_name(output.name + ".journal")
        self.header = _npy_header(dtype, rows)
        self.size = len(self.header) + rows * dtype.itemsize
        self.fd: int | None = None
        self.direct_fd: int | None = None
        self.journal_fd: int | None = None

    def leftovers(self) -> list[Path]:
        return [p for p in (self.partial, self.journal) if p.exists()]

    def remove(self) -> None:
        self.close()
        for path in (self.partial, self.journal):
            path.unlink(missing_ok=True)

    def finished(self) -> set[int]:
        """The chunks on disk that a --resume would keep."""
        return self._journalled()

    def start(self, resume: bool) -> set[int]:
        finished = self._journalled() if resume else set()
        if not finished:
            self.remove()
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o644)
        if not finished:
            self._allocate()
        self.direct_fd = _open_direct(self.partial)
        self.journal_fd = os.open(self.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        return finished

    def write(self, index: int, records: np.ndarray) -> None:
        offset = len(self.header) + index * self.chunk_rows * self.dtype.itemsize
        view = memoryview(np.ascontiguousarray(records)).cast("B")
        view, offset = self._write_direct(view, offset)
        _pwrite_all(self.fd, view, offset)
        # The bytes reach the disk before the journal says they did; a journal line lost
        # in a crash only means the chunk is computed again.
        os.fdatasync(self.fd)
        os.write(self.journal_fd, f"{index}\n".encode())

    def finish(self) -> None:
        os.fsync(self.fd)
        self.close()
        os.replace(self.partial, self.output)
        self.journal.unlink(missing_ok=True)

    def _write_direct(self, view: memoryview, offset: int) -> tuple[memoryview, int]:
        """Write the block-aligned head of ``view`` by direct I/O; return what is left."""
        whole = len(view) - len(view) % BLOCK
        address = np.frombuffer(view, np.uint8).ctypes.data
        if self.direct_fd is None or not whole or offset % BLOCK or address % BLOCK:
            return view, offset
        try:
            _pwrite_all(self.direct_fd, view[:whole], offset)
        except OSError:  # a file system that opens O_DIRECT but will not do it
            os.close(self.direct_fd)
            self.direct_fd = None
            return view, offset
        return view[whole:], offset + whole

    def _allocate(self) -> None:
        """Reserve the whole file now, so a full disk fails the job at its start."""
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(self.fd, 0, self.size)
            else:
                os.ftruncate(self.fd, self.size)
        except OSError as exc:
            self.remove()
            raise DataError(f"{self.output}: cannot reserve {self.size:,} bytes ({exc.strerror})") from None
        os.pwrite(self.fd, self.header, 0)

    def _journalled(self) -> set[int]:
        """Chunks the journal lists as finished, if the partial file is the right one."""
        if not self.journal.exists() or not self.partial.exists():
            return set()
        if self.partial.stat().st_size != self.size:
            return set()
        with open(self.partial, "rb") as handle:
            if handle.read(len(self.header)) != self.header:
                return set()
        lines = self.journal.read_text().split("\n")[:-1]  # a torn last line is not a finished chunk
        count = -(-self.rows // self.chunk_rows)
        return {int(line) for line in lines if line.isdecimal() and int(line) < count}

    def close(self) -> None:
        for name in ("fd", "direct_fd", "journal_fd"):
            if getattr(self, name) is not None:
                os.close(getattr(self, name))
                setattr(self, name, None)


def _npy_header(dtype: np.dtype, rows: int) -> bytes:
    """A version 2 .npy header, padded with spaces (as the format allows) to one block."""
    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (rows,)}
    np.lib.format.write_array_header_2_0(buffer, header)
    short = buffer.getvalue()
    padding = -len(short) % BLOCK
    length = int.from_bytes(short[8:12], "little") + padding
    return short[:8] + length.to_bytes(4, "little") + short[12:-1] + b" " * padding + b"\n"


def _open_direct(path: Path) -> int | None:
    """A second descriptor for direct I/O, where the platform and file system offer it."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return None


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class ParquetParts:
    """Chunks as atomically written part files, streamed into one Parquet file at the end."""

    def __init__(self, output: Path, count: int, dtype: np.dtype) -> None:
        self.output, self.count, self.dtype = output, count, dtype
        self.folder = output.with_name(output.name + ".parts")

    def path(self, index: int) -> Path:
        return self.folder / f"part-{index:06d}.npy"

    def leftovers(self) -> list[Path]:
        return [self.folder] if self.folder.exists() else []

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def finished(self) -> set[int]:
        """The chunks on disk that a --resume would keep."""
        return {i for i in range(self.count) if self.path(i).exists()}

    def start(self, resume: bool) -> set[int]:
        if not resume:
            self.remove()
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.finished()

    def write(self, index: int, records: np.ndarray) -> None:
        # Serialized in memory first: numpy's own file write reports a full disk as an OSError
        # without its errno ("500 requested and 406 written").
        buffer = io.BytesIO()
        np.save(buffer, records, allow_pickle=False)
        with atomic_path(self.path(index)) as tmp:
            tmp.write_bytes(buffer.getbuffer())

    def finish(self) -> None:
        with atomic_path(self.output) as tmp:
            _write_parquet(self._read(), self.dtype, tmp)
        self.remove()

    def close(self) -> None:
        pass

    def _read(self) -> Iterator[np.ndarray]:
        for index in range(self.count):
            yield np.load(self.path(index), allow_pickle=False)


def _write_parquet(parts: Iterator[np.ndarray], dtype: np.dtype, path: Path | io.BytesIO) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingExtraError("writing Parquet", "embed", "pyarrow") from None
    # A vector field (mean, stddev) is a fixed-size list column, a scalar one (scores) a float; an
    # autoencoder's [C, h, w] latents are stored flat (the sidecar's latent_shape views them).
    widths = {name: math.prod(dtype[name].shape) if dtype[name].shape else 0 for name in dtype.names[1:]}
    fields = [pa.field("row_id", pa.int64())] + [
        pa.field(n, pa.list_(pa.float32(), w) if w else pa.float32()) for n, w in widths.items()
    ]
    schema = pa.schema(fields)
    with pq.ParquetWriter(path, schema) as writer:
        for part in parts:
            columns = [pa.array(part["row_id"])]
            for name, width in widths.items():
                flat = pa.array(np.ascontiguousarray(part[name]).reshape(-1))
                columns.append(pa.FixedSizeListArray.from_arrays(flat, width) if width else flat)
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))


# The dataset's completion marker (Hadoop's and Spark's name; readers skip files starting "_").
SUCCESS = "_SUCCESS"


class DatasetParts:
    """A partitioned Parquet dataset, local or on object storage: one part per chunk, written
    whole by whichever process encoded it (so Ray tasks write their own), the marker last."""

    def __init__(self, output: Location, count: int, dtype: np.dtype) -> None:
        self.output, self.count, self.dtype = output, count, dtype

    def path(self, index: int) -> Location:
        return self.output / f"part-{index:06d}.parquet"

    def leftovers(self) -> list[Location]:
        return [self.output] if self._names() else []

    def remove(self) -> None:
        remove(self.output)

    def finished(self) -> set[int]:
        names = self._names()
        return {i for i in range(self.count) if self.path(i).name in names}

    def start(self, resume: bool) -> set[int]:
        if not resume:
            self.remove()
        if isinstance(self.output, Path):
            self.output.mkdir(parents=True, exist_ok=True)
        return self.finished()

    def write(self, index: int, records: np.ndarray) -> None:
        """Serialized in memory, then one upload (or an atomic rename): a part is whole or absent."""
        buffer = io.BytesIO()
        _write_parquet(iter([records]), self.dtype, buffer)
        write_whole(self.path(index), buffer.getbuffer())

    def finish(self) -> None:
        missing = sorted(set(range(self.count)) - self.finished())
        if missing:
            raise DataError(f"{self.output}: parts {missing[:5]} missing; not marked complete")
        if isinstance(self.output, ObjectPath):  # temporary keys of uploads a killed task left
            for info in self.output.files():
                if info.path.name.startswith("."):
                    info.path.unlink()
        write_whole(self.output / SUCCESS, b"")

    def close(self) -> None:
        pass

    def _names(self) -> set[str]:
        return {path.name for path in names_in(self.output)}
