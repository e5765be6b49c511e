"""vae embed on real data and a really exported model: formats, engines, resume, bounds, errors."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import servers

from vaeserve.datasets import model_inputs
from vaeserve.embed.job import EmbedRequest, run
from vaeserve.embed.sidecar import Sidecar
from vaeserve.errors import ConfigError, DataError
from vaeserve.repository import resolve
from vaeserve.runtime import OnnxPair


@pytest.fixture(scope="module")
def pixels(mnist) -> np.ndarray:
    return mnist.test_images[:3000]


@pytest.fixture(scope="module")
def expected(repo: Path, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return OnnxPair.load(resolve(repo, "tiny")).encode(model_inputs(pixels, "threshold"))


def embed(repo: Path, source: Path, output: Path, **options) -> np.ndarray:
    run(
        EmbedRequest(repo / "tiny", source, output, chunk_rows=options.pop("chunk_rows", 700), **options),
        progress=False,
    )
    if output.suffix == ".npy":
        return np.load(output)
    import pyarrow.parquet as pq

    table = pq.read_table(output)
    records = np.empty(table.num_rows, [("row_id", "<i8"), ("mean", "<f4", (8,)), ("stddev", "<f4", (8,))])
    records["row_id"] = table.column("row_id").to_numpy()
    for name in ("mean", "stddev"):
        records[name] = np.stack(table.column(name).to_numpy(zero_copy_only=False))
    return records


def test_every_input_format_gives_the_same_embedding(
    repo: Path, tmp_path: Path, pixels, expected, mnist_dir: Path
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    sources = {
        "npy": tmp_path / "x.npy",
        "npz": tmp_path / "x.npz",
        "idx": tmp_path / "x-idx3-ubyte",
        "idx.gz": tmp_path / "x-idx3-ubyte.gz",
        "parquet": tmp_path / "x.parquet",
        "wide.parquet": tmp_path / "wide.parquet",
        "images": tmp_path / "images",
    }
    np.save(sources["npy"], pixels)
    np.savez(sources["npz"], x=pixels.reshape(-1, 28, 28))
    header = b"\0\0\x08\x03" + np.array([len(pixels), 28, 28], ">u4").tobytes()
    sources["idx"].write_bytes(header + pixels.tobytes())
    sources["idx.gz"].write_bytes(gzip.compress(header + pixels.tobytes()))
    pq.write_table(
        pa.table({"pixels": pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), 784)}),
        sources["parquet"],
    )
    pq.write_table(pa.table({f"p{i}": pixels[:, i] for i in range(784)}), sources["wide.parquet"])
    sources["images"].mkdir()
    for i, row in enumerate(pixels[:300]):
        Image.fromarray(row.reshape(28, 28)).save(sources["images"] / f"{i:05d}.png")
    for name, source in sources.items():
        out = embed(
            repo, source, tmp_path / f"{name}.{'parquet' if 'parquet' in name else 'npy'}", stddev=True
        )
        rows = len(out)
        np.testing.assert_array_equal(out["row_id"], np.arange(rows))
        np.testing.assert_array_equal(out["mean"], expected[0][:rows], err_msg=name)
        np.testing.assert_array_equal(out["stddev"], expected[1][:rows], err_msg=name)
        assert rows == (300 if name == "images" else 3000)


def test_service_engine_equals_local(repo: Path, tmp_path: Path, pixels) -> None:
    np.save(tmp_path / "x.npy", pixels)
    local = embed(repo, tmp_path / "x.npy", tmp_path / "local.npy", stddev=True)
    with servers.running(repo, tmp_path / "serve.log", "--shared-memory") as server:
        source, target = tmp_path / "x.npy", server.target
        remote = embed(repo, source, tmp_path / "remote.npy", stddev=True, server=target)
        shared = embed(repo, source, tmp_path / "shm.npy", stddev=True, server=target, shared_memory=True)
    np.testing.assert_array_equal(remote, local)
    np.testing.assert_array_equal(shared, local)


def journalled(journal: Path) -> int:
    """Chunks a job's journal lists as finished."""
    return journal.read_text().count("\n") if journal.exists() else 0


def test_killed_job_resumes_to_the_same_bytes(repo: Path, tmp_path: Path, mnist_dir: Path) -> None:
    source = mnist_dir / "train-images-idx3-ubyte.gz"
    whole = tmp_path / "whole.npy"
    embed(repo, source, whole, chunk_rows=2000)
    output = tmp_path / "resumed.npy"
    command = [
        sys.executable,
        "-m",
        "vaeserve.cli",
        "embed",
        "--model",
        str(repo / "tiny"),
        "--input",
        str(source),
        "--output",
        str(output),
        "--chunk-rows",
        "2000",
        "--threads",
        "1",
        "--no-progress",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal, partial = tmp_path / "resumed.npy.journal", tmp_path / "resumed.npy.partial"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and journalled(journal) < 3:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = journalled(journal)
    assert 3 <= written < 30, "the job was not caught midway"
    assert partial.stat().st_size == whole.stat().st_size
    assert not output.exists() and '"completed": false' in Sidecar.path(output).read_text()
    with pytest.raises(ConfigError, match="pass --resume"):
        embed(repo, source, output, chunk_rows=2000)
    with pytest.raises(ConfigError, match="chunk_rows differ"):
        embed(repo, source, output, chunk_rows=1000, resume=True)
    summary = run(EmbedRequest(repo / "tiny", source, output, chunk_rows=2000, resume=True), progress=False)
    assert summary["embedded_now"] <= 60000 - 2000 * (written - 1)
    assert output.read_bytes() == whole.read_bytes()
    assert '"completed": true' in Sidecar.path(output).read_text()
    assert not journal.exists() and not partial.exists()
    with pytest.raises(ConfigError, match="is complete; pass --force"):
        embed(repo, source, output, chunk_rows=2000)


def test_memory_stays_bounded_on_an_input_larger_than_the_budget(repo: Path, tmp_path: Path) -> None:
    """A 449 MB input embedded in under 250 MB of peak resident memory."""
    rows = 600_000
    big = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.uint8, shape=(rows, 784))
    for start in range(0, rows, 50_000):
        big[start : start + 50_000] = (
            (np.arange(50_000 * 784, dtype=np.uint32) * 2654435761 % 251)
            .astype(np.uint8)
            .reshape(50_000, 784)
        )
    big.flush()
    del big
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from vaeserve.embed.job import EmbedRequest, run\n"
        f"run(EmbedRequest(Path({str(repo / 'tiny')!r}), Path({str(tmp_path / 'big.npy')!r}),"
        f" Path({str(tmp_path / 'out.npy')!r}), chunk_rows=8192), progress=False)\n"
        # VmHWM: this process's peak resident memory (ru_maxrss would include the forking parent's)
        "print(next(int(l.split()[1]) // 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    peak_mb = int(result.stdout.split()[-1])
    input_mb = rows * 784 / 2**20
    assert peak_mb < 250 < input_mb, (peak_mb, input_mb)
    assert len(np.load(tmp_path / "out.npy", mmap_mode="r")) == rows


def test_bad_inputs_name_the_file_and_row(repo: Path, tmp_path: Path, pixels) -> None:
    floats = model_inputs(pixels[:100], "none")
    floats[57, 3] = np.nan
    np.save(tmp_path / "nan.npy", floats)
    with pytest.raises(DataError, match=r"nan\.npy: NaN or infinity at row 57, column 3"):
        embed(repo, tmp_path / "nan.npy", tmp_path / "o1.npy")
    assert not (tmp_path / "o1.npy").exists()
    np.save(tmp_path / "wide.npy", np.zeros((4, 785), np.uint8))
    with pytest.raises(DataError, match="rows of 785 values; model tiny/1 expects 784"):
        embed(repo, tmp_path / "wide.npy", tmp_path / "o2.npy")
    np.save(tmp_path / "text.npy", np.array([["a"] * 784]))
    with pytest.raises(DataError, match="dtype <U1 is not pixels"):
        embed(repo, tmp_path / "text.npy", tmp_path / "o3.npy")
    with pytest.raises(DataError, match="no such file"):
        embed(repo, tmp_path / "missing.npy", tmp_path / "o4.npy")
    with pytest.raises(ConfigError, match="--threads must be 0"):
        run(EmbedRequest(repo / "tiny", tmp_path / "nan.npy", tmp_path / "o6.npy", threads=-1))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vaeserve.cli",
            "embed",
            "--model",
            str(tmp_path / "none"),
            "--input",
            str(tmp_path / "wide.npy"),
            "--output",
            str(tmp_path / "o5.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "no versions of model 'none'" in result.stderr


def test_ray_engine_equals_local(repo: Path, tmp_path: Path, pixels) -> None:
    pytest.importorskip("ray")
    import pyarrow.parquet as pq

    np.save(tmp_path / "x.npy", pixels)
    local = embed(repo, tmp_path / "x.npy", tmp_path / "local.npy", stddev=True)
    output = tmp_path / "ray.parquet"
    run(
        EmbedRequest(
            repo / "tiny", tmp_path / "x.npy", output, stddev=True, chunk_rows=700, engine="ray", workers=2
        ),
        progress=False,
    )
    assert output.is_dir() and '"completed": true' in Sidecar.path(output).read_text()
    assert (output / "_SUCCESS").exists() and len(list(output.glob("part-*.parquet"))) == -(
        -len(pixels) // 700
    )
    table = pq.read_table(output)  # the parts in name order: row order
    np.testing.assert_array_equal(table.column("row_id").to_numpy(), local["row_id"])
    for name in ("mean", "stddev"):
        np.testing.assert_array_equal(
            np.stack(table.column(name).to_numpy(zero_copy_only=False)), local[name]
        )
    with pytest.raises(ConfigError, match="partitioned Parquet dataset"):
        run(EmbedRequest(repo / "tiny", tmp_path / "x.npy", tmp_path / "r.npy", engine="ray"), progress=False)
