"""`vae embed/score --engine ray` on a real Ray cluster: a head and two worker nodes started with
`ray start`, reached by address, with the input, the output and the model on a real S3-compatible
store (SeaweedFS) and no folder shared with the driver. The result equals the local engine's; a
worker node killed mid-job costs nothing but time; a driver killed mid-job is finished by
--resume without redoing the parts written."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import servers
from stores import store_for_tests

pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from vaeserve.embed.job import EmbedRequest, run  # noqa: E402
from vaeserve.remote_repository import upload_version  # noqa: E402
from vaeserve.repository import load_version  # noqa: E402
from vaeserve.sandbox import start_cluster  # noqa: E402
from vaeserve.storage import location  # noqa: E402

ROWS = 6000
CHUNK = "300"  # 20 tasks: enough for a node to die mid-job


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    with store_for_tests(tmp_path_factory.mktemp("seaweedfs"), tmp_path_factory.mktemp("cache")) as store:
        yield store


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory: pytest.TempPathFactory):
    cluster = start_cluster(tmp_path_factory.mktemp("ray"), s3.env, workers=2)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def data(s3, repo: Path, mnist, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The model and the input on the store; the local engine's result from local files."""
    bucket = s3.create_bucket("ray")
    upload_version(load_version(repo / "tiny" / "1"), location(f"{bucket}/models"))
    pixels = mnist.test_images[:ROWS]
    column = pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), 784)
    target = location(f"{bucket}/in/x.parquet")
    pq.write_table(pa.table({"pixels": column}), target.key, filesystem=target.fs, row_group_size=1000)
    folder = tmp_path_factory.mktemp("local")
    np.save(folder / "x.npy", pixels)
    run(EmbedRequest(repo / "tiny", folder / "x.npy", folder / "e.npy", stddev=True), progress=False)
    return {"bucket": bucket, "expected": np.load(folder / "e.npy")}


def embed_command(cluster, data: dict, output: str, *extra: str) -> list[str]:
    bucket = data["bucket"]
    return [
        sys.executable, "-m", "vaeserve.cli", "embed", "--engine", "ray", "--ray-address", cluster.address,
        "--workers", "2", "--model", f"{bucket}/models/tiny", "--input", f"{bucket}/in/x.parquet",
        "--output", output, "--stddev", "--chunk-rows", CHUNK, "--no-progress", *extra,
    ]  # fmt: skip


def assert_equals_local(output: str, expected: np.ndarray) -> None:
    target = location(output)
    assert (target / "_SUCCESS").exists()
    table = pq.read_table(target.key, filesystem=target.fs)
    np.testing.assert_array_equal(table.column("row_id").to_numpy(), np.arange(ROWS))
    for name in ("mean", "stddev"):
        np.testing.assert_array_equal(
            np.stack(table.column(name).to_numpy(zero_copy_only=False)), expected[name]
        )


def parts(output: str) -> int:
    return sum(info.path.name.startswith("part-") for info in location(output).files())


def test_embed_on_a_cluster_equals_the_local_engine(cluster, data) -> None:
    output = f"{data['bucket']}/out/cluster.parquet"
    result = subprocess.run(
        embed_command(cluster, data, output), capture_output=True, text=True, env=cluster.env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert_equals_local(output, data["expected"])
    # Each worker node fetched the model into its own cache: nothing shared with the driver.
    assert any((cluster.folder / f"cache-{i}" / "objects").exists() for i in (1, 2))


def test_score_on_a_cluster_equals_the_local_engine(cluster, data, repo: Path, tmp_path: Path, mnist) -> None:
    np.save(tmp_path / "x.npy", mnist.test_images[:ROWS])
    run(EmbedRequest(repo / "tiny", tmp_path / "x.npy", tmp_path / "s.npy", score=True), progress=False)
    output = f"{data['bucket']}/out/score.parquet"
    command = embed_command(cluster, data, output)
    command[command.index("embed")] = "score"
    command.remove("--stddev")
    result = subprocess.run(command, capture_output=True, text=True, env=cluster.env, timeout=300)
    assert result.returncode == 0, result.stderr
    target = location(output)
    table = pq.read_table(target.key, filesystem=target.fs)
    expected = np.load(tmp_path / "s.npy")
    for name in expected.dtype.names:
        np.testing.assert_array_equal(table.column(name).to_numpy(), expected[name], err_msg=name)


def test_a_killed_driver_is_finished_by_resume(cluster, data) -> None:
    output = f"{data['bucket']}/out/driver.parquet"
    driver = subprocess.Popen(
        embed_command(cluster, data, output), env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    servers.until(lambda: parts(output) >= 4 or driver.poll() is not None, timeout=120, what="parts written")
    driver.send_signal(signal.SIGKILL)
    driver.wait(30)
    written = parts(output)
    assert not (location(output) / "_SUCCESS").exists()
    result = subprocess.run(
        embed_command(cluster, data, output, "--resume"),
        capture_output=True,
        text=True,
        env=cluster.env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    now = int(re.search(r"\(([\d,]+) now", result.stdout).group(1).replace(",", ""))
    assert now <= ROWS - (written * int(CHUNK)) + 2 * int(CHUNK), result.stdout  # the written parts kept
    assert now < ROWS
    assert_equals_local(output, data["expected"])


def test_a_worker_node_killed_mid_job_costs_only_time(cluster, data) -> None:
    output = f"{data['bucket']}/out/lost-node.parquet"
    driver = subprocess.Popen(
        embed_command(cluster, data, output),
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    servers.until(lambda: parts(output) >= 3 or driver.poll() is not None, timeout=120, what="parts written")
    cluster.kill(cluster.nodes[2])  # one of the two worker nodes, mid-job
    _, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 0, stderr
    assert_equals_local(output, data["expected"])
