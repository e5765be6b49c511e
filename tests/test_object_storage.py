"""Data and models on object storage, against a real S3-compatible server (SeaweedFS) on
127.0.0.1: embed and score read and write s3:// as they do local files, a partitioned input
reads as one table, a resumed job writes only what is missing, `vae export` uploads a version
a polling `vae serve --repo s3://` loads (and refuses while it is broken), and a failed job
leaves nothing that looks complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import servers
from stores import store_for_tests

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

import grpc  # noqa: E402

from vaeserve._proto import vae_pb2, vae_pb2_grpc  # noqa: E402
from vaeserve.codec import from_response, to_tensor  # noqa: E402
from vaeserve.embed.job import EmbedRequest, run  # noqa: E402
from vaeserve.errors import DataError  # noqa: E402
from vaeserve.remote_repository import remove_version  # noqa: E402
from vaeserve.repository import load_version  # noqa: E402
from vaeserve.runtime import OnnxPair  # noqa: E402
from vaeserve.storage import location  # noqa: E402

ROWS = 3000


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    with store_for_tests(tmp_path_factory.mktemp("seaweedfs"), tmp_path_factory.mktemp("cache")) as store:
        yield store


@pytest.fixture(scope="module")
def bucket(s3) -> str:
    return s3.create_bucket("vae")


@pytest.fixture(scope="module")
def pixels(mnist) -> np.ndarray:
    return mnist.test_images[:ROWS]


def vae(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vaeserve.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def put_parquet(uri: str, rows: np.ndarray) -> None:
    column = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), rows.shape[1])
    target = location(uri)
    pq.write_table(pa.table({"pixels": column}), target.key, filesystem=target.fs)


def read_dataset(uri: str) -> dict[str, np.ndarray]:
    target = location(uri)
    table = pq.read_table(target.key, filesystem=target.fs)
    return {
        name: np.stack(table.column(name).to_numpy(zero_copy_only=False))
        if name in ("mean", "stddev")
        else table.column(name).to_numpy()
        for name in table.column_names
    }


@pytest.fixture(scope="module")
def store_repo(bucket: str, tiny_run: Path, mnist_dir: Path) -> str:
    """tiny/1 uploaded by `vae export --repo s3://...` itself."""
    models = f"{bucket}/models"
    result = vae(
        "export", "--checkpoint", str(tiny_run), "--repo", models, "--name", "tiny",
        "--iw-samples", "10", "--data-dir", str(mnist_dir), "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"exported {models}/tiny/1" in result.stdout
    names = {info.path.name for info in location(f"{models}/tiny/1").files()}
    assert {"encoder.onnx", "decoder.onnx", "manifest.json"} <= names
    return models


@pytest.fixture(scope="module")
def local_embedding(repo: Path, pixels: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    folder = tmp_path_factory.mktemp("local")
    np.save(folder / "x.npy", pixels)
    run(EmbedRequest(repo / "tiny", folder / "x.npy", folder / "e.npy", stddev=True), progress=False)
    return np.load(folder / "e.npy")


def assert_same(remote: dict[str, np.ndarray], local: np.ndarray) -> None:
    np.testing.assert_array_equal(remote["row_id"], np.arange(len(local)))
    np.testing.assert_array_equal(remote["mean"], local["mean"])
    np.testing.assert_array_equal(remote["stddev"], local["stddev"])


def test_embed_from_and_to_s3_equals_the_local_embed(bucket, store_repo, pixels, local_embedding) -> None:
    put_parquet(f"{bucket}/in/x.parquet", pixels)
    output = f"{bucket}/out/e.parquet"
    result = vae(
        "embed", "--model", f"{store_repo}/tiny", "--input", f"{bucket}/in/x.parquet",
        "--output", output, "--stddev", "--chunk-rows", "1000", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert_same(read_dataset(output), local_embedding)
    names = sorted(info.path.name for info in location(output).files())
    assert names == ["_SUCCESS", "part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    sidecar = json.loads(location(output + ".manifest.json").read_text())
    assert sidecar["completed"] and sidecar["input"]["path"] == f"{bucket}/in/x.parquet"


def test_score_on_s3_equals_the_local_score(bucket, store_repo, repo, pixels, tmp_path) -> None:
    put_parquet(f"{bucket}/in/score.parquet", pixels[:1500])
    np.save(tmp_path / "x.npy", pixels[:1500])
    local = tmp_path / "s.npy"
    run(EmbedRequest(repo / "tiny", tmp_path / "x.npy", local, score=True, iw_samples=3), progress=False)
    output = f"{bucket}/out/s.parquet"
    result = vae(
        "score", "--model", f"{store_repo}/tiny/1", "--input", f"{bucket}/in/score.parquet",
        "--output", output, "--iw-samples", "3", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    remote, expected = read_dataset(output), np.load(local)
    for name in expected.dtype.names:
        np.testing.assert_array_equal(remote[name], expected[name], err_msg=name)


def test_a_prefix_of_parts_reads_as_one_table(bucket, store_repo, pixels, local_embedding) -> None:
    """Parts of uneven sizes, Parquet and .npy mixed, in name order; chunks cross part borders."""
    put_parquet(f"{bucket}/parts/part-0.parquet", pixels[:700])
    buffer = __import__("io").BytesIO()
    np.save(buffer, pixels[700:1800])
    location(f"{bucket}/parts/part-1.npy").put(buffer.getvalue())
    put_parquet(f"{bucket}/parts/part-2.parquet", pixels[1800:])
    location(f"{bucket}/parts/_SUCCESS").put(b"")  # a marker is not a part
    output = f"{bucket}/out/parts.parquet"
    request = EmbedRequest(
        location(f"{store_repo}/tiny"),
        location(f"{bucket}/parts"),
        location(output),
        stddev=True,
        chunk_rows=1000,
    )
    summary = run(request, progress=False)
    assert summary["rows"] == ROWS
    assert_same(read_dataset(output), local_embedding)


def test_resume_writes_only_the_missing_parts(bucket, store_repo, pixels, local_embedding) -> None:
    put_parquet(f"{bucket}/in/r.parquet", pixels)
    output = location(f"{bucket}/out/r.parquet")
    request = EmbedRequest(
        location(f"{store_repo}/tiny"),
        location(f"{bucket}/in/r.parquet"),
        output,
        stddev=True,
        chunk_rows=1000,
    )
    run(request, progress=False)
    # What a job killed after its first part leaves: no marker, two parts gone, the sidecar open.
    for name in ("_SUCCESS", "part-000001.parquet", "part-000002.parquet"):
        (output / name).unlink()
    sidecar = output.with_name(output.name + ".manifest.json")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "completed": False}))
    with pytest.raises(Exception, match="exists from an unfinished job"):
        run(request, progress=False)
    from dataclasses import replace

    summary = run(replace(request, resume=True), progress=False)
    assert summary["embedded_now"] == 2000
    assert_same(read_dataset(str(output)), local_embedding)
    assert (output / "_SUCCESS").exists()


def test_a_failed_job_leaves_nothing_that_looks_complete(bucket, store_repo, pixels) -> None:
    values = pixels.astype(np.float32) / 255
    values[2500, 3] = np.nan
    put_parquet(f"{bucket}/in/nan.parquet", values)
    output = location(f"{bucket}/out/nan.parquet")
    request = EmbedRequest(
        location(f"{store_repo}/tiny"), location(f"{bucket}/in/nan.parquet"), output, chunk_rows=1000
    )
    with pytest.raises(DataError, match="row 2500"):
        run(request, progress=False)
    assert output.files() == []
    assert not output.with_name(output.name + ".manifest.json").exists()


def test_a_store_refusing_is_one_line(bucket, store_repo, tmp_path) -> None:
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": "wrong"}
    result = subprocess.run(
        [sys.executable, "-m", "vaeserve.cli", "embed", "--model", f"{store_repo}/tiny",
         "--input", f"{bucket}/in/x.parquet", "--output", str(tmp_path / "e.npy")],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "AWS_ENDPOINT_URL" in result.stderr and "Traceback" not in result.stderr
    result = vae("embed", "--model", f"{bucket}/nothing/tiny", "--input", f"{bucket}/in/x.parquet",
                 "--output", str(tmp_path / "e.npy"))  # fmt: skip
    assert result.returncode == 1 and "no versions of model 'tiny'" in result.stderr


def encode_locally(version_dir: Path, rows: np.ndarray) -> np.ndarray:
    from vaeserve.datasets import encoder_inputs

    version = load_version(version_dir)
    return OnnxPair.load(version, threads=1).encode(encoder_inputs(rows, version.manifest.binarization))[0]


def served(target: str, rows: np.ndarray, version: str = "") -> tuple[int, np.ndarray] | None:
    """The version answering an Encode naming ``version``, and its means; None if refused."""
    request = vae_pb2.EncodeRequest(inputs=to_tensor(rows), version=version)
    with grpc.insecure_channel(target) as channel:
        try:
            reply = vae_pb2_grpc.VaeServiceStub(channel).Encode(request, timeout=10)
        except grpc.RpcError:
            return None
    return reply.model.version, from_response(reply.mean, "mean")


def all_serve(target: str, rows: np.ndarray, version: str, expected: int, calls: int = 16) -> bool:
    """Whether ``calls`` fresh connections (spread over the workers) all get ``expected``."""
    return all((served(target, rows, version) or (0,))[0] == expected for _ in range(calls))


def test_serve_follows_a_repository_on_s3(store_repo, repo, pixels, tmp_path) -> None:
    rows = pixels[:16]
    expected = encode_locally(repo / "tiny" / "1", rows)
    with servers.running(store_repo, tmp_path / "serve.log", "--poll-s", "0.3") as server:
        version, mean = served(server.target, rows)
        assert version == 1
        np.testing.assert_array_equal(mean, expected)
        # Version 2 (the same graphs, its own manifest), first uploaded broken: a truncated encoder.
        target = location(f"{store_repo}/tiny/2")
        one = repo / "tiny" / "1"
        manifest = json.loads((one / "manifest.json").read_text())
        for file in sorted(one.iterdir()):
            data = file.read_bytes()
            if file.name == "encoder.onnx":
                data = data[:100]
            if file.name != "manifest.json":
                (target / file.name).put(data)
        (target / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))
        servers.until(lambda: "refusing" in server.output(), what="the broken upload refused")
        assert served(server.target, rows)[0] == 1
        (target / "encoder.onnx").put((one / "encoder.onnx").read_bytes())  # the upload mended
        # Each of the two workers follows the local copy on its own: wait until both serve it.
        servers.until(lambda: all_serve(server.target, rows, "", 2), what="version 2 loaded")
        np.testing.assert_array_equal(served(server.target, rows, "2")[1], expected)
        labelled = vae("label", "--repo", store_repo, "--name", "tiny", "stable=1")
        assert labelled.returncode == 0 and "tiny stable = 1" in labelled.stdout, labelled.stderr
        assert json.loads(location(f"{store_repo}/tiny/labels.json").read_text()) == {"stable": 1}
        servers.until(lambda: all_serve(server.target, rows, "stable", 1), what="label followed")
        # A traffic split is stored and followed as labels are: all of it to stable (1), then none.
        routed = vae("traffic", "--repo", store_repo, "--name", "tiny", "stable=100")
        assert routed.returncode == 0, routed.stderr
        split = json.loads(location(f"{store_repo}/tiny/traffic.json").read_text())
        assert split == {"weights": {"stable": 100}, "shadow": ""}
        servers.until(lambda: all_serve(server.target, rows, "", 1), what="traffic split followed")
        assert vae("traffic", "--repo", store_repo, "--name", "tiny", "--clear").returncode == 0
        assert not location(f"{store_repo}/tiny/traffic.json").exists()
        servers.until(lambda: all_serve(server.target, rows, "", 2), what="traffic split removed")
        remove_version(target)  # the manifest first: the version goes in one step, never refused
        servers.until(lambda: all_serve(server.target, rows, "", 1), what="version 2 retired")
        assert served(server.target, rows, "2") is None
    assert server.process.returncode == 0
    assert server.output().count("refusing") == 1, server.output()
    # A restart finds its verified local copy: nothing downloaded again.
    with servers.running(store_repo, tmp_path / "again.log") as again:
        assert served(again.target, rows)[0] == 1
    assert "fetched" not in again.output()


def test_a_local_copy_is_replaced_and_removed_whole(tmp_path: Path) -> None:
    """A version synced again replaces the local copy in one rename (the old one moved aside and
    deleted), a removed one leaves no folder; neither leaves a hidden folder behind."""
    from vaeserve.remote_repository import _remove_whole, _swap_into_place

    target, staging = tmp_path / "m" / "1", tmp_path / "staging"
    for folder, text in ((target, "old"), (staging, "new")):
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(text)
    _swap_into_place(staging, target)
    assert (target / "manifest.json").read_text() == "new" and not staging.exists()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    _swap_into_place(fresh, tmp_path / "m" / "2")  # nothing there before
    assert (tmp_path / "m" / "2").is_dir()
    _remove_whole(target)
    _remove_whole(target)  # already gone: nothing to do
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["2"]
