"""The chunk pipeline of an embed or score job: read ahead, encode, write behind.

The next chunk is read and checked on a thread while the current ones are encoded (up to two
in flight, so the encoder never idles at a chunk boundary), and the one before is written on
another; record buffers are recycled.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from vaeserve.embed.encoders import ChunkEncoder, Wait
from vaeserve.embed.sidecar import Sidecar
from vaeserve.embed.sinks import ChunkSink, aligned_records
from vaeserve.embed.sources import Source
from vaeserve.errors import DataError, TensorError
from vaeserve.rows import as_rows, check_finite


def embed_chunks(
    source: Source,
    engine: ChunkEncoder,
    sink: ChunkSink,
    finished: set[int],
    job: Sidecar,
    dtype: np.dtype,
    progress: bool,
    lowest: float = 0.0,
) -> int:
    chunk_rows = job.chunk_rows
    first = next((i for i in range(job.chunks) if i not in finished), job.chunks)
    todo = set(range(first, job.chunks)) - finished
    done = 0
    initial = min(first * chunk_rows, source.rows)
    bar = tqdm(
        total=source.rows,
        initial=initial,
        unit="rows",
        desc="score" if job.score else "embed",
        disable=None if progress else True,
    )
    with bar, ChunkPipeline(engine, sink, dtype, chunk_rows, bar.update) as pipeline:
        for index, rows in _prefetched(source.chunks(chunk_rows, first), source, chunk_rows, first, lowest):
            if index in todo:
                pipeline.add(index, rows)
                done += len(rows)
        pipeline.drain()
    return done


# The next chunk starts encoding before the last one is collected.
CHUNKS_IN_FLIGHT = 2


class ChunkPipeline:
    """Chunks in flight: up to two encoding (so the encoder never idles at a chunk
    boundary) while the one before is written on a worker thread. Record buffers are
    recycled once written, so memory stays at a handful of chunks and the kernel does
    not zero fresh pages for every chunk."""

    def __init__(
        self, engine: ChunkEncoder, sink: ChunkSink, dtype: np.dtype, chunk_rows: int, written: Callable
    ) -> None:
        self.engine, self.sink, self.dtype, self.chunk_rows = engine, sink, dtype, chunk_rows
        self.written = written
        self.encoding: deque[tuple[int, np.ndarray, np.ndarray, Wait]] = deque()
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="embed-write")
        self.writing: Future | None = None
        self.spare: list[np.ndarray] = []

    def add(self, index: int, rows: np.ndarray) -> None:
        buffer = self.spare.pop() if self.spare else aligned_records(self.chunk_rows, self.dtype)
        records = buffer[: len(rows)]
        records["row_id"] = np.arange(index * self.chunk_rows, index * self.chunk_rows + len(rows))
        self.encoding.append((index, buffer, records, self.engine.start(rows, records)))
        if len(self.encoding) >= CHUNKS_IN_FLIGHT:
            self._collect()

    def drain(self) -> None:
        while self.encoding:
            self._collect()
        self._wait_for_write()

    def _collect(self) -> None:
        index, buffer, records, encoded = self.encoding.popleft()
        encoded()
        self._wait_for_write()
        self.writing = self.writer.submit(self._write, index, buffer, records)

    def _write(self, index: int, buffer: np.ndarray, records: np.ndarray) -> np.ndarray:
        self.sink.write(index, records)
        self.written(len(records))
        return buffer

    def _wait_for_write(self) -> None:
        if self.writing is not None:
            self.spare.append(self.writing.result())
            self.writing = None

    def __enter__(self) -> ChunkPipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.writer.shutdown(cancel_futures=True)


def _prefetched(
    chunks: Iterator[np.ndarray], source: Source, chunk_rows: int, first: int, lowest: float
) -> Iterator[tuple[int, np.ndarray]]:
    """Read and check the next chunk on a worker thread while the current ones are encoded."""

    def following(index: int) -> np.ndarray | None:
        rows = next(chunks, None)
        return None if rows is None else check_rows(rows, source, index * chunk_rows, lowest)

    with ThreadPoolExecutor(1, thread_name_prefix="embed-read") as reader:
        index = first
        pending = reader.submit(following, index)
        while (rows := pending.result()) is not None:
            pending = reader.submit(following, index + 1)
            yield index, rows
            index += 1


def check_rows(rows: np.ndarray, source: Source, start: int, lowest: float = 0.0) -> np.ndarray:
    """The core's rules (vaeserve.rows.as_rows): uint8 and 0-255 integers are pixels, floats
    must be finite and in [0, 1] (an imported autoencoder's: [−1, 1]), else the file and the
    row are named."""
    try:
        values = as_rows(rows, str(source.path))
        check_finite(values, str(source.path), lowest, 1.0, first_row=start)
    except TensorError as exc:
        raise DataError(f"{exc}; pixels are uint8, or float values in [{lowest:g}, 1]") from None
    return values
