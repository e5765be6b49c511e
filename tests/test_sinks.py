"""The embedding sinks: what a resumed job trusts, and what it recomputes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vaeserve.embed.sinks import BLOCK, NpyChunks, ParquetParts, aligned_records, record_dtype

DTYPE = record_dtype(3, stddev=True)


def records(index: int, rows: int, chunk_rows: int = 4) -> np.ndarray:
    out = np.zeros(rows, DTYPE)
    out["row_id"] = np.arange(index * chunk_rows, index * chunk_rows + rows)
    out["mean"] = out["row_id"][:, None] * np.array([1.0, 2.0, 3.0])
    out["stddev"] = 1.0 / (1 + out["row_id"][:, None])
    return out


def expected_array() -> np.ndarray:
    return np.concatenate([records(0, 4), records(1, 4), records(2, 2)])


def test_npy_chunks_land_at_their_offsets_in_any_order(tmp_path: Path) -> None:
    output = tmp_path / "out.npy"
    sink = NpyChunks(output, 10, 4, DTYPE)
    assert sink.start(resume=False) == set()
    for index, rows in ((2, 2), (0, 4), (1, 4)):
        sink.write(index, records(index, rows))
    assert not output.exists(), "an unfinished output must not appear under its name"
    sink.finish()
    assert np.array_equal(np.load(output), expected_array())
    assert sink.leftovers() == []


def test_npy_block_aligned_chunks_go_by_direct_io_and_read_back_exactly(tmp_path: Path) -> None:
    """Chunks of 128 rows are one 4 KiB block; the last (200 rows) has a tail that is not."""
    chunk_rows, rows = 128, 456
    assert chunk_rows * DTYPE.itemsize == BLOCK
    output = tmp_path / "out.npy"
    sink = NpyChunks(output, rows, chunk_rows, DTYPE)
    sink.start(resume=False)
    for index, count in ((2, 200), (0, 128), (1, 128)):
        buffer = aligned_records(count, DTYPE)
        assert buffer.ctypes.data % BLOCK == 0
        buffer[:] = records(index, count, chunk_rows)
        sink.write(index, buffer)
    sink.finish()
    expected = np.concatenate([records(0, 128, 128), records(1, 128, 128), records(2, 200, 128)])
    mapped = np.load(output, mmap_mode="r")
    assert mapped.offset == BLOCK, "the header fills one block, so the rows start block-aligned"
    assert np.array_equal(mapped, expected)


def test_npy_resume_trusts_complete_journal_lines_only(tmp_path: Path) -> None:
    output = tmp_path / "out.npy"
    sink = NpyChunks(output, 10, 4, DTYPE)
    sink.start(resume=False)
    sink.write(0, records(0, 4))
    sink.write(2, records(2, 2))
    sink.close()
    with open(sink.journal, "a") as journal:
        journal.write("1")  # torn: the process died while appending
    resumed = NpyChunks(output, 10, 4, DTYPE)
    assert resumed.start(resume=True) == {0, 2}
    resumed.write(1, records(1, 4))
    resumed.finish()
    assert np.array_equal(np.load(output), expected_array())


@pytest.mark.parametrize("damage", ["truncated", "other header", "no journal"])
def test_npy_resume_starts_over_when_the_partial_file_is_not_ours(tmp_path: Path, damage: str) -> None:
    output = tmp_path / "out.npy"
    sink = NpyChunks(output, 10, 4, DTYPE)
    sink.start(resume=False)
    sink.write(0, records(0, 4))
    sink.close()
    if damage == "truncated":
        with open(sink.partial, "r+b") as handle:
            handle.truncate(100)
    elif damage == "other header":
        NpyChunks(output, 11, 4, DTYPE).start(resume=False)
    else:
        sink.journal.unlink()
    resumed = NpyChunks(output, 10, 4, DTYPE)
    assert resumed.start(resume=True) == set()
    assert resumed.partial.stat().st_size == resumed.size
    resumed.close()


def test_parquet_parts_resume_from_the_parts_that_exist(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    output = tmp_path / "out.parquet"
    sink = ParquetParts(output, 3, DTYPE)
    sink.start(resume=False)
    sink.write(1, records(1, 4))
    resumed = ParquetParts(output, 3, DTYPE)
    assert resumed.start(resume=True) == {1}
    resumed.write(0, records(0, 4))
    resumed.write(2, records(2, 2))
    resumed.finish()
    table = pq.read_table(output)
    assert table.column("row_id").to_pylist() == list(range(10))
    means = np.stack(table.column("mean").to_numpy(zero_copy_only=False))
    assert np.allclose(means, expected_array()["mean"])
    assert resumed.leftovers() == []
