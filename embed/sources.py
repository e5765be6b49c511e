"""Streaming readers of the inputs `vae embed` accepts; none loads a dataset whole.

Each source knows its row count and row width up front and yields chunks of rows
(uint8 pixels or floats in [0, 1]) starting at any chunk, so a resumed job reads
only what is left. Every error names the file and, where it applies, the row.

Inputs may be local or on object storage (vaeserve.storage): a file, or a folder or prefix of
Parquet/.npy parts (a partitioned dataset), read in name order as one table, row ids counted
across the parts.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vaeserve.errors import DataError, MissingExtraError
from vaeserve.idx import GZIP_MAGIC, parse_header
from vaeserve.layout import ImageLayout, to_rows
from vaeserve.storage import Location, ObjectPath, names_in, open_for_reading, size_of

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# The files of a partitioned dataset (a folder or prefix of parts).
PART_SUFFIXES = (".parquet", ".npy")


class Source:
    path: Location
    rows: int
    columns: int
    # Rows a reader decodes at once wherever it starts (a Parquet row group); 0: reads are exact.
    read_rows: int = 0

    def chunks(self, chunk_rows: int, first_chunk: int = 0) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """Size, modification time and a hash of the head and tail: cheap, and changes when
        the input does, so a resumed job refuses an input that was replaced. On object
        storage: each object's size and modification time (a ranged read per object would
        cost a round trip each)."""
        if isinstance(self.path, ObjectPath):
            files = self.path.files() if self.path.is_dir() else [self.path.stat()]
            digest = hashlib.sha256("".join(f"{i.path.name}:{i.stamp()}" for i in files).encode())
            return {"path": str(self.path), "files": len(files), "sha256_stamps": digest.hexdigest()}
        files = sorted(self.path.iterdir()) if self.path.is_dir() else [self.path]
        digest = hashlib.sha256()
        for file in files:
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
            with open(file, "rb") as handle:
                digest.update(handle.read(1 << 20))
                if stat.st_size > 2 << 20:
                    handle.seek(-(1 << 20), 2)
                    digest.update(handle.read())
        return {"path": str(self.path), "files": len(files), "sha256_head_tail": digest.hexdigest()}


class FileArraySource(Source):
    """Rows stored contiguously in a file at a known offset: .npy, an uncompressed .npz member,
    or a raw IDX file. Chunks are read with plain reads, not a memory map, so pages already
    embedded do not stay resident and memory stays bounded whatever the file's size."""

    def __init__(
        self,
        path: Location,
        offset: int,
        dtype: np.dtype,
        shape: tuple[int, ...],
        image_shape: tuple[int, ...] | None = None,
    ) -> None:
        if len(shape) == 0:
            raise DataError(f"{path}: a single number; expected rows [N, D], images [N, H, W] or one row [D]")
        if len(shape) == 1:
            shape = (1, shape[0])  # one row (vaeserve.rows.as_rows)
        self.path, self.offset, self.dtype = path, offset, np.dtype(dtype)
        self.rows, self.columns = int(shape[0]), int(np.prod(shape[1:]))
        # Colour images [N, H, W, C] become rows channels first (vaeserve.layout), chunk by chunk.
        self.item_shape, self.image_shape = tuple(int(d) for d in shape[1:]), image_shape
        expected = offset + self.rows * self.columns * self.dtype.itemsize
        size = size_of(path)
        if size < expected:
            raise DataError(f"{path}: {size} bytes; its header promises {expected}")

    def chunks(self, chunk_rows: int, first_chunk: int = 0) -> Iterator[np.ndarray]:
        row_bytes = self.columns * self.dtype.itemsize
        local = isinstance(self.path, Path)
        with open_for_reading(self.path) as handle:
            for start in range(first_chunk * chunk_rows, self.rows, chunk_rows):
                count = min(chunk_rows, self.rows - start)
                handle.seek(self.offset + start * row_bytes)
                if local:
                    rows = np.fromfile(handle, dtype=self.dtype, count=count * self.columns)
                else:  # one ranged read per chunk
                    rows = np.frombuffer(handle.read(count * row_bytes), self.dtype)
                yield to_rows(rows.reshape(count, *self.item_shape), self.image_shape, str(self.path))


class GzipIdxSource(Source):
    """A gzip IDX file, decompressed as it is read (gzip cannot seek, so a resume re-reads)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with gzip.open(path, "rb") as handle:
            shape, self.dtype, self.offset = _idx_header(handle.read(4 + 4 * 8), str(path))
        self.rows, self.columns = shape[0], int(np.prod(shape[1:]))

    def chunks(self, chunk_rows: int, first_chunk: int = 0) -> Iterator[np.ndarray]:
        row_bytes = self.columns * self.dtype.itemsize
        with gzip.open(self.path, "rb") as handle:
            handle.read(self.offset)
            for index, start in enumerate(range(0, self.rows, chunk_rows)):
                count = min(chunk_rows, self.rows - start)
                try:
                    data = handle.read(count * row_bytes)
                except (OSError, EOFError) as exc:
                    raise DataError(f"{self.path}: corrupt gzip data near row {start} ({exc})") from None
                if len(data) != count * row_bytes:
                    raise DataError(
                        f"{self.path}: truncated at row {start + len(data) // row_bytes}; "
                        f"the header promises {self.rows} rows"
                    )
                if index >= first_chunk:
                    yield np.frombuffer(data, self.dtype).reshape(count, self.columns)


class ParquetSource(Source):
    """A Parquet column of lists (or fixed-size lists), or D numeric columns."""

    def __init__(self, path: Location, column: str | None) -> None:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise MissingExtraError("reading Parquet", "embed", "pyarrow") from None
        try:
            self.path, self.file = path, pq.ParquetFile(open_for_reading(path))
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
        groups = range(self.file.metadata.num_row_groups)
        self.read_rows = max((self.file.metadata.row_group(g).num_rows for g in groups), default=0)
        schema = self.file.schema_arrow
        self.rows = self.file.metadata.num_rows
        if column is None and len(schema.names) == 1:
            column = schema.names[0]
        self.column = column
        if column is not None:
            if column not in schema.names:
                raise DataError(f"{path}: no column {column!r}; columns: {schema.names}")
            first = next(self.file.iter_batches(batch_size=1, columns=[column]))
            self.columns = len(first.column(0)[0].as_py())
        else:
            self.columns = len(schema.names)

    def chunks(self, chunk_rows: int, first_chunk: int = 0) -> Iterator[np.ndarray]:
        """Reading starts at the row group holding the first chunk: a chunk in the middle of a
        large file (a resume, a Ray task) does not read what comes before it."""
        columns = [self.column] if self.column else None
        first_row = first_chunk * chunk_rows
        group, start = 0, 0
        metadata = self.file.metadata
        while group < metadata.num_row_groups and start + metadata.row_group(group).num_rows <= first_row:
            start += metadata.row_group(group).num_rows
            group += 1
        if group == metadata.num_row_groups:
            return
        batches = self.file.iter_batches(
            batch_size=chunk_rows, columns=columns, row_groups=range(group, metadata.num_row_groups)
        )

        def rows() -> Iterator[np.ndarray]:
            at = start
            for batch in batches:
                yield self._rows(batch, at)
                at += batch.num_rows

        yield from rechunk(rows(), chunk_rows, skip=first_row - start)

    def _rows(self, batch, start: int) -> np.ndarray:
        if self.column is None:
            return np.stack([c.to_numpy(zero_copy_only=False) for c in batch.columns], axis=1)
        values = batch.column(0)
        flat = values.flatten().to_numpy(zero_copy_only=False)
        if len(flat) != len(values) * self.columns:
            raise DataError(
                f"{self.path}: a row of column {self.column!r} between rows {start} and "
                f"{start + len(values)} does not have {self.columns} values"
            )
        return flat.reshape(len(values), self.columns)


# PIL's mode for images of each channel count.
PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


class ImageFolderSource(Source):
    """PNG/JPEG files, sorted by name, converted to the model's image shape (grey, RGB or RGBA,
    as its channel count says, at its height and width); or one such file, one row. Without
    ``resize`` a file of another size is refused (an imported autoencoder takes any size, so a
    resize would be a choice the user did not make)."""

    def __init__(self, path: Path, image_shape: tuple[int, ...], resize: bool = True) -> None:
        layout = ImageLayout.of(image_shape)
        if layout is None:
            raise DataError(
                f"{path}: the model's rows are {image_shape[0]} features, not images; "
                "give a .npy, .npz or Parquet file"
            )
        if layout.channels not in PIL_MODES:
            raise DataError(
                f"{path}: the model's images have {layout.channels} channels; image files give 1 "
                "(grey), 3 (RGB) or 4 (RGBA): give a .npy, .npz or Parquet file"
            )
        self.path, self.layout, self.resize = path, layout, resize
        found = path.iterdir() if path.is_dir() else [path]
        self.files = sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise DataError(f"{path}: no PNG or JPEG files")
        self.rows, self.columns = len(self.files), int(np.prod(image_shape))

    def chunks(self, chunk_rows: int, first_chunk: int = 0) -> Iterator[np.ndarray]:
        for start in range(first_chunk * chunk_rows, self.rows, chunk_rows):
            images = np.stack([self._pixels(f) for f in self.files[start : start + chunk_rows]])
            yield self.layout.rows(images, str(self.path))

    def _pixels(self, file: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(file) as image:
                size = (self.layout.width, self.layout.height)
                if not self.resize and image.size != size:
                    raise DataError(
                        f"{file}: {image.size[1]}×{image.size[0]} pixels, where the job's images are "
                        f"{size[1]}×{size[0]} (its first image's); pass --image-size H W to resize them all"
                    )
                pixels = image.convert(PIL_MODES[self.layout.channels]).resize(
                    size, Image.Resampling.BILINEAR
                )
                return np.asarray(pixels, dtype=np.uint8).reshape(self.layout.height, self.layout.width, -1)
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"{file}: not a readable image ({exc})") from None


class PartsSource(Source):
    """A partitioned dataset: the Parquet or .npy parts of a folder or prefix, in name order,
    read as one table whose row ids run on across the parts."""

    def __init__(self, path: Location, parts: list[Source]) -> None:
        widths = {part.columns for part in parts}
        if len(widths) > 1:
            raise DataError(f"{path}: its parts have rows of {sorted(widths)} values; expected one width")
        self.path, self.parts = path, parts
        self.rows, self.columns = sum(part.rows for part in parts), widths.pop()
        self.read_rows = max(part.read_rows for part in parts)

    def chunks(self, chunk_rows: int, first_chunk: int = 0) -> Iterator[np.ndarray]:
        first_row = first_chunk * chunk_rows
        yield from rechunk(self._rows_from(first_row, chunk_rows), chunk_rows)

    def _rows_from(self, first_row: int, chunk_rows: int) -> Iterator[np.ndarray]:
        start = 0
        for part in self.parts:
            if start + part.rows <= first_row:
                start += part.rows
                continue
            offset = max(first_row - start, 0)
            # The part's own chunk holding ``offset``, less the rows before it.
            skip = offset % chunk_rows
            for rows in part.chunks(chunk_rows, offset // chunk_rows):
                yield rows[skip:]
                skip = 0
            start += part.rows


def rechunk(batches: Iterator[np.ndarray], chunk_rows: int, skip: int = 0) -> Iterator[np.ndarray]:
    """Batches of any sizes as chunks of exactly ``chunk_rows`` rows (the last may be short),
    dropping the first ``skip`` rows."""
    pending: list[np.ndarray] = []
    held = 0
    for batch in batches:
        if skip:
            dropped = min(skip, len(batch))
            batch, skip = batch[dropped:], skip - dropped
        pending.append(batch)
        held += len(batch)
        while held >= chunk_rows:
            joined = pending[0] if len(pending) == 1 else np.concatenate(pending)
            yield joined[:chunk_rows]
            pending, held = [joined[chunk_rows:]], held - chunk_rows
    if held:
        yield pending[0] if len(pending) == 1 else np.concatenate(pending)


def open_source(
    path: Location,
    image_shape: tuple[int, ...],
    column: str | None = None,
    key: str | None = None,
    resize: bool = True,
) -> Source:
    """``resize``: image files of another size than ``image_shape`` are resized (else refused)."""
    if not path.exists():
        raise DataError(f"{path}: no such file, folder or prefix")
    if path.is_dir():
        parts = _part_files(path)
        if parts:
            return PartsSource(path, [_open_file(part, image_shape, column, key) for part in parts])
        if isinstance(path, ObjectPath):
            raise DataError(f"{path}: no .parquet or .npy parts under this prefix")
        return ImageFolderSource(path, image_shape, resize)
    return _open_file(path, image_shape, column, key, resize)


def image_size_of(path: Location, key: str | None = None) -> tuple[int, int]:
    """[height, width] of an input's images, for a model that takes any size: its first image
    file's, or its .npy/.npz array's ([N, H, W, C] or [N, C, H, W])."""
    if not path.exists():
        raise DataError(f"{path}: no such file, folder or prefix")
    if isinstance(path, Path) and (path.is_dir() or path.suffix.lower() in IMAGE_SUFFIXES):
        files = sorted(
            p for p in (path.iterdir() if path.is_dir() else [path]) if p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise DataError(f"{path}: no PNG or JPEG files (an imported autoencoder's input: images)")
        from PIL import Image

        with Image.open(files[0]) as image:
            return image.size[1], image.size[0]
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz") and isinstance(path, Path):
        shape = (_npy_layout(path) if suffix == ".npy" else _npz_member(path, key))[2]
        if len(shape) == 4:
            return (shape[1], shape[2]) if shape[3] in (1, 3, 4) else (shape[2], shape[3])
    raise DataError(f"{path}: the images' size is not in the input (rows of values); pass --image-size H W")


def _part_files(path: Location) -> list[Location]:
    """The parts of a partitioned dataset, in name order; hidden and ``_`` files (markers such
    as ``_SUCCESS``) are not parts."""
    return [
        p for p in names_in(path) if p.suffix.lower() in PART_SUFFIXES and not p.name.startswith(("_", "."))
    ]


def _open_file(
    path: Location, image_shape: tuple[int, ...], column: str | None, key: str | None, resize: bool = True
) -> Source:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return FileArraySource(path, *_npy_layout(path), image_shape)
    if suffix == ".parquet":
        return ParquetSource(path, column)
    if isinstance(path, ObjectPath):
        raise DataError(f"{path}: on object storage, inputs are .parquet or .npy files or prefixes of them")
    if suffix == ".npz":
        return FileArraySource(path, *_npz_member(path, key), image_shape)
    if suffix in IMAGE_SUFFIXES:
        return ImageFolderSource(path, image_shape, resize)
    with open(path, "rb") as handle:
        head = handle.read(4 + 4 * 8)
    if head.startswith(GZIP_MAGIC):
        return GzipIdxSource(path)
    try:
        shape, dtype, offset = _idx_header(head, str(path))
    except DataError as exc:
        raise DataError(f"{exc}; inputs are .npy, .npz, .parquet, IDX files or folders of images") from None
    return FileArraySource(path, offset, dtype, shape)


def _idx_header(head: bytes, source: str) -> tuple[tuple[int, ...], np.dtype, int]:
    shape, dtype, offset = parse_header(head, source)
    if len(shape) < 2:
        raise DataError(f"{source}: IDX rank {len(shape)}; expected rows of values (rank 2 or more)")
    return shape, dtype, offset


def _npy_layout(path: Location) -> tuple[int, np.dtype, tuple[int, ...]]:
    """Offset, dtype and shape of a .npy file's data."""
    try:
        with open_for_reading(path) as handle:
            return _array_layout(handle, str(path))
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: not a readable .npy file ({exc})") from None


def _array_layout(handle, source: str) -> tuple[int, np.dtype, tuple[int, ...]]:
    version = np.lib.format.read_magic(handle)
    read_header = (
        np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = read_header(handle)
    if fortran:
        raise DataError(f"{source}: Fortran-ordered arrays are not supported")
    if dtype.hasobject:
        raise DataError(f"{source}: object arrays are not supported")
    return handle.tell(), dtype, shape


def _npz_member(path: Path, key: str | None) -> np.ndarray:
    """An uncompressed .npz member is memory-mapped in place; a compressed one is refused
    (it cannot be streamed without loading it whole)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path}: not a readable .npz archive ({exc})") from None
    names = [n.removesuffix(".npy") for n in archive.namelist()]
    key = key or ("x" if "x" in names else names[0])
    if key not in names:
        raise DataError(f"{path}: no array {key!r}; arrays: {names}")
    info = archive.getinfo(key + ".npy")
    if info.compress_type != zipfile.ZIP_STORED:
        raise DataError(f"{path}[{key}]: compressed .npz members cannot be streamed; save with np.savez")
    with open(path, "rb") as handle:
        handle.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
        handle.seek(info.header_offset + 30 + name_length + extra_length)
        return _array_layout(handle, f"{path}[{key}]")
