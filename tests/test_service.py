"""The real server on 127.0.0.1, a really exported model, real clients."""

from __future__ import annotations

import concurrent.futures
import json
import queue
import shutil
import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import servers
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from vaeserve._proto import vae_pb2, vae_pb2_grpc
from vaeserve.client import ServiceError, VaeClient
from vaeserve.codec import to_tensor
from vaeserve.datasets import model_inputs
from vaeserve.repository import copy_version, resolve
from vaeserve.runtime import OnnxPair

D, M = 784, 8


@pytest.fixture(scope="module")
def server(serve):
    # Batching on (off by default): every RPC's check below also covers merged batches.
    return serve("--batching", "--max-message-mb", "8", "--max-request-rows", "4096")


@pytest.fixture(scope="module")
def client(server):
    with VaeClient(server.target, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def stub(server):
    options = [("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(server.target, options) as channel:
        yield vae_pb2_grpc.VaeServiceStub(channel)


@pytest.fixture(scope="module")
def pair(repo: Path) -> OnnxPair:
    return OnnxPair.load(resolve(repo, "tiny"))


@pytest.fixture(scope="module")
def x(mnist) -> np.ndarray:
    return model_inputs(mnist.test_images[:1500], "threshold")


def test_every_rpc_matches_in_process_onnxruntime(client: VaeClient, pair: OnnxPair, x: np.ndarray) -> None:
    mean, stddev = pair.encode(x)
    encoded = client.encode(x)
    np.testing.assert_allclose(encoded["mean"], mean, atol=1e-6, rtol=0)
    np.testing.assert_allclose(encoded["stddev"], stddev, atol=1e-6, rtol=0)
    z = np.random.default_rng(0).standard_normal((300, M), dtype=np.float32)
    np.testing.assert_allclose(client.decode(z)["probs"], pair.decode(z)[1], atol=1e-6, rtol=0)
    rebuilt = client.reconstruct(x[:300], use_mean=True, seed=1)
    np.testing.assert_allclose(rebuilt["latents"], mean[:300], atol=1e-6, rtol=0)
    np.testing.assert_allclose(rebuilt["probs"], pair.decode(mean[:300])[1], atol=1e-6, rtol=0)
    assert set(np.unique(rebuilt["samples"])) <= {0, 1} and rebuilt["samples"].dtype == np.uint8
    prior = client.sample_prior(200, seed=4)
    np.testing.assert_allclose(prior["probs"], pair.decode(prior["latents"])[1], atol=1e-6, rtol=0)
    sampled = client.encode(x[:100], sample=True, seed=2)
    assert not np.allclose(sampled["z"], sampled["mean"])
    assert np.all(np.abs(sampled["z"] - sampled["mean"]) < 6 * sampled["stddev"])


def test_encode_fills_given_arrays_in_place(client: VaeClient, x: np.ndarray) -> None:
    """As `vae embed` uses it: the fields of a record array, filled without a copy between."""
    records = np.zeros(1200, [("row_id", "<i8"), ("mean", "<f4", (8,)), ("stddev", "<f4", (8,))])
    returned = client.encode(x[:1200], out={"mean": records["mean"], "stddev": records["stddev"]})
    expected = client.encode(x[:1200])
    np.testing.assert_array_equal(records["mean"], expected["mean"])
    np.testing.assert_array_equal(records["stddev"], expected["stddev"])
    assert np.shares_memory(returned["mean"], records)
    with pytest.raises(ValueError, match=r"out\['mean'\]: expected float32 \[10, ...\]"):
        client.encode(x[:10], out={"mean": np.zeros((9, 8), np.float32)})


def test_uint8_pixels_are_prepared_as_in_training(client: VaeClient, mnist) -> None:
    pixels = mnist.test_images[:64]
    np.testing.assert_array_equal(
        client.encode(pixels)["mean"], client.encode(model_inputs(pixels, "threshold"))["mean"]
    )


def test_seeded_calls_are_bit_identical_under_load(client: VaeClient, server, x: np.ndarray) -> None:
    stop = threading.Event()

    def background() -> None:
        with VaeClient(server.target) as other:
            while not stop.is_set():
                other.encode(x[:37], sample=True)
                other.sample_prior(5)

    workers = [threading.Thread(target=background) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        calls = [
            lambda s: client.encode(x[:50], sample=True, seed=s)["z"],
            lambda s: client.decode(x[:20, :M] * 3, sample=True, seed=s)["samples"],
            lambda s: client.reconstruct(x[:30], seed=s)["samples"],
            lambda s: client.sample_prior(40, seed=s)["latents"],
        ]
        for call in calls:
            first, again, other = call(7), call(7), call(8)
            assert first.tobytes() == again.tobytes()
            assert first.tobytes() != other.tobytes()
        unseeded = [client.sample_prior(10)["latents"] for _ in range(2)]
        assert not np.array_equal(*unseeded)
    finally:
        stop.set()
        for worker in workers:
            worker.join()


def test_sample_prior_draws_standard_normal_latents(client: VaeClient) -> None:
    latents = client.sample_prior(4096, seed=11)["latents"]
    assert latents.shape == (4096, M)
    assert abs(latents.mean()) < 0.02 and abs(latents.std() - 1) < 0.02
    assert np.all(np.abs(np.corrcoef(latents.T) - np.eye(M)) < 0.06)


def test_client_chunks_in_order(server, client: VaeClient, x: np.ndarray) -> None:
    with VaeClient(server.target, chunk_rows=100, max_in_flight=3) as chunky:
        np.testing.assert_array_equal(chunky.encode(x[:1050])["mean"], client.encode(x[:1050])["mean"])
        assert chunky.sample_prior(250, seed=3)["latents"].shape == (250, M)


def test_encode_stream_answers_in_order(stub, client: VaeClient, x: np.ndarray) -> None:
    parts = [x[i : i + 70] for i in range(0, 700, 70)]
    requests = (vae_pb2.EncodeRequest(inputs=to_tensor(p)) for p in parts)
    means = [np.frombuffer(r.mean.data, "<f4").reshape(-1, M) for r in stub.EncodeStream(requests)]
    np.testing.assert_array_equal(np.concatenate(means), client.encode(x[:700])["mean"])


raw_status = servers.raw_status

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("method", "request_", "code", "fragment"),
    [
        (
            "Encode",
            vae_pb2.EncodeRequest(inputs=to_tensor(np.zeros((2, 700), np.float32))),
            INVALID,
            "700 columns; this model expects 784",
        ),
        (
            "Encode",
            vae_pb2.EncodeRequest(inputs=vae_pb2.Tensor(shape=[2, D], data=b"\0" * 100)),
            INVALID,
            "100 bytes for shape [2, 784]",
        ),
        (
            "Encode",
            vae_pb2.EncodeRequest(inputs=vae_pb2.Tensor(shape=[2, D], dtype=7, data=b"")),
            INVALID,
            "unknown dtype 7",
        ),
        (
            "Encode",
            vae_pb2.EncodeRequest(inputs=to_tensor(np.zeros((2, 2, D), np.float32))),
            INVALID,
            "has 3 dimensions",
        ),
        (
            "Encode",
            vae_pb2.EncodeRequest(inputs=to_tensor(np.zeros((0, D), np.float32))),
            INVALID,
            "empty batch",
        ),
        (
            "Encode",
            vae_pb2.EncodeRequest(inputs=to_tensor(np.full((2, D), np.nan, np.float32))),
            INVALID,
            "NaN or infinity at row 0",
        ),
        (
            "Encode",
            vae_pb2.EncodeRequest(inputs=to_tensor(np.full((2, D), 3.0, np.float32))),
            INVALID,
            "expected [0, 1]",
        ),
        (
            "Encode",
            vae_pb2.EncodeRequest(inputs=to_tensor(np.zeros((4097, D), np.uint8))),
            INVALID,
            "4097 rows exceed this server's limit of 4096",
        ),
        (
            "Decode",
            vae_pb2.DecodeRequest(latents=to_tensor(np.zeros((2, M), np.uint8))),
            INVALID,
            "uint8 is not accepted",
        ),
        (
            "Decode",
            vae_pb2.DecodeRequest(latents=to_tensor(np.full((1, M), np.inf, np.float32))),
            INVALID,
            "NaN or infinity",
        ),
        ("SamplePrior", vae_pb2.SamplePriorRequest(count=0), INVALID, "count: 0; expected 1 to 4096"),
        ("SamplePrior", vae_pb2.SamplePriorRequest(count=5000), INVALID, "count: 5000"),
        (
            "SamplePrior",
            vae_pb2.SamplePriorRequest(count=1, model="nope"),
            grpc.StatusCode.NOT_FOUND,
            "model 'nope' is not loaded; loaded: ['tiny']",
        ),
        (
            "SamplePrior",
            vae_pb2.SamplePriorRequest(count=1, version="9"),
            grpc.StatusCode.NOT_FOUND,
            "no loaded version '9'",
        ),
        ("GetModelInfo", vae_pb2.GetModelInfoRequest(model="nope"), grpc.StatusCode.NOT_FOUND, "'nope'"),
        (
            "Encode",
            vae_pb2.EncodeRequest(inputs=to_tensor(np.zeros((3000, D), np.float32))),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "larger than max",
        ),
    ],
)
def test_bad_input_gets_a_precise_status(stub, method: str, request_, code, fragment: str) -> None:
    got, details = raw_status(getattr(stub, method), request_)
    assert got == code and fragment in details, (got, details)


def test_health_reflection_metrics_and_info(server, client: VaeClient, stub) -> None:
    assert client.health() == "SERVING" and client.health("vae.v1.VaeService") == "SERVING"
    with grpc.insecure_channel(server.target) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {"vae.v1.VaeService", "grpc.health.v1.Health"} <= set(services)
    (info,) = client.model_info()
    assert (info["name"], info["version"], info["input_size"], info["latent_size"]) == ("tiny", 1, D, M)
    assert info["image_shape"] == (28, 28) and info["execution_provider"] == "CPUExecutionProvider"
    assert info["metrics"]["nll"] > 0 and info["is_default"] and info["binarization"] == "threshold"
    raw_status(stub.Encode, vae_pb2.EncodeRequest(inputs=to_tensor(np.zeros((1, 5), np.float32))))
    client.encode(np.zeros((1, D), np.float32))  # one OK call, whichever tests ran before
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    )
    for code in ("INVALID_ARGUMENT", "OK"):
        assert f'vaeserve_requests_total{{code="{code}",method="Encode",model="tiny",protocol="v1"}}' in text
    for name in (
        "vaeserve_request_seconds_bucket",
        "vaeserve_batch_rows_bucket",
        "vaeserve_queue_seconds",
        "vaeserve_rows_total",
    ):
        assert name in text


def test_deadline_exceeded_is_reported(stub, x: np.ndarray) -> None:
    pixels = (np.tile(x, (2, 1))[:3000] * 255).astype(np.uint8)  # 0/255: binary uint8 is refused
    request = vae_pb2.EncodeRequest(inputs=to_tensor(pixels))
    with pytest.raises(grpc.RpcError) as info:
        stub.Encode(request, timeout=0.0005)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_overload_is_refused_not_queued(repo: Path, tmp_path: Path, x: np.ndarray) -> None:
    with servers.running(repo, tmp_path / "serve.log", "--max-concurrent-rpcs", "1") as busy:
        request = vae_pb2.EncodeRequest(inputs=to_tensor(np.tile(x, (3, 1))[:4096]))

        def call(_: int) -> grpc.StatusCode:
            # A connection each: one connection's calls past its stream limit (a quarter of
            # --max-concurrent-rpcs, at least 1) wait in the client, not in the server.
            options = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(busy.target, options=options) as channel:
                return raw_status(vae_pb2_grpc.VaeServiceStub(channel).Encode, request)[0]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(call, range(16)))
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
    assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OK}


def test_token_authentication(repo: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    with servers.running(repo, tmp_path / "serve.log", "--token-file", str(token)) as secured:
        for credentials in ({}, {"token": "wrong"}):
            with VaeClient(secured.target, **credentials) as anonymous:
                assert anonymous.health() == "SERVING"  # probes need no token
                with pytest.raises(ServiceError) as info:
                    anonymous.sample_prior(1)
                assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        with VaeClient(secured.target, token="s3cret-token") as trusted:
            assert trusted.sample_prior(3)["samples"].shape == (3, D)
        metrics = f"http://127.0.0.1:{secured.metrics_port}/metrics"
        text = urllib.request.urlopen(metrics, timeout=10).read().decode()
        assert 'code="UNAUTHENTICATED",method="SamplePrior"' in text
        assert 'code="OK",method="SamplePrior"' in text
    assert "s3cret" not in (tmp_path / "serve.log").read_text()


def test_tls_and_mutual_tls(repo: Path, tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    tls = ["--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")]
    trusted = {"root_certificates": tmp_path / "ca.pem"}
    with servers.running(repo, tmp_path / "tls.log", *tls, client=trusted) as secured:
        with VaeClient(secured.target, **trusted) as client:
            assert client.sample_prior(2)["latents"].shape == (2, M)
        started = time.monotonic()
        with VaeClient(secured.target, timeout=3) as plaintext, pytest.raises(ServiceError) as refused:
            plaintext.sample_prior(1)
        # Its resends share the 3 s (each had its own before: 22 s), and the error is the cause.
        assert time.monotonic() - started < 10 and refused.value.code == grpc.StatusCode.UNAVAILABLE
    client_cert = ca.issue_cert("client")
    client_cert.private_key_pem.write_to_path(str(tmp_path / "client-key.pem"))
    client_cert.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    mutual = {
        **trusted,
        "client_certificate": tmp_path / "client.pem",
        "client_key": tmp_path / "client-key.pem",
    }
    with servers.running(
        repo, tmp_path / "mtls.log", *tls, "--tls-client-ca", str(tmp_path / "ca.pem"), client=mutual
    ) as secured:
        with VaeClient(secured.target, **mutual) as client:
            assert client.sample_prior(2)["latents"].shape == (2, M)
        with VaeClient(secured.target, timeout=3, **trusted) as no_cert, pytest.raises(ServiceError):
            no_cert.sample_prior(1)


def test_bad_version_refused_at_load_env_configured(repo: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(repo, models)
    for number in (2, 3):  # copies of version 1, each with its own manifest
        copy_version(models / "tiny" / "1", models, "tiny", number)
    (models / "tiny" / "3" / "decoder.onnx").write_bytes(b"tampered")
    with (
        servers.running(models, tmp_path / "serve.log", use_flags=False) as multi,
        VaeClient(multi.target) as client,
        VaeClient(multi.target, version="1") as pinned,
    ):
        assert [i["version"] for i in client.model_info()] == [1, 2]
        assert pinned.sample_prior(1)["latents"].shape == (1, M)
    log = (tmp_path / "serve.log").read_text()
    assert "refusing" in log and "tiny/3/decoder.onnx" in log and "loaded" in log


def test_sigterm_drains_calls_in_flight(repo: Path, tmp_path: Path, x: np.ndarray) -> None:
    """A stream open when SIGTERM arrives keeps being answered; new calls are refused; exit 0."""
    server = servers.start(repo, tmp_path / "serve.log")
    outbox: queue.Queue = queue.Queue()
    requests = iter(outbox.get, None)
    with grpc.insecure_channel(server.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        responses = stub.EncodeStream(requests, timeout=60)
        outbox.put(vae_pb2.EncodeRequest(inputs=to_tensor(x[:10])))
        assert next(responses).mean.shape == [10, M]  # the call is in flight
        server.process.send_signal(signal.SIGTERM)
        refused = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        new_call = vae_pb2.SamplePriorRequest(count=1)
        servers.until(lambda: raw_status(stub.SamplePrior, new_call)[0] in refused, 30, "new calls refused")
        outbox.put(vae_pb2.EncodeRequest(inputs=to_tensor(x[:20])))
        assert next(responses).mean.shape == [20, M]
        outbox.put(None)
        assert list(responses) == []
    assert server.process.wait(60) == 0
    assert "draining" in server.output() and "stopped" in server.output()


def test_cuda_request_without_cuda_is_a_clear_error(repo: Path, tmp_path: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA; see test_serves_on_cuda")
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vaeserve.cli",
            "serve",
            "--repo",
            str(repo),
            "--device",
            "cuda",
            "--port",
            str(servers.free_port()),
            "--metrics-port",
            "0",
            "--http-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "--device cuda, but onnxruntime offers only" in result.stderr


@pytest.mark.gpu
def test_serves_on_cuda(repo: Path, tmp_path: Path, x: np.ndarray, pair: OnnxPair) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("no CUDA execution provider on this machine")
    with (
        servers.running(repo, tmp_path / "serve.log", "--device", "cuda") as gpu,
        VaeClient(gpu.target) as client,
    ):
        assert client.model_info()[0]["execution_provider"] == "CUDAExecutionProvider"
        np.testing.assert_allclose(client.encode(x)["mean"], pair.encode(x)[0], atol=1e-4)
        # The Open Inference Protocol runs on the same CUDA data plane (REST, plain JSON).
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [4, D], "data": x[:4].tolist()}]}
        url = f"http://{gpu.http}/v2/models/tiny-encoder/infer"
        answer = json.load(
            urllib.request.urlopen(urllib.request.Request(url, json.dumps(body).encode()), timeout=30)
        )
        mean = np.asarray(answer["outputs"][0]["data"], np.float32).reshape(4, M)
        np.testing.assert_allclose(mean, pair.encode(x[:4])[0], atol=1e-4)


def test_client_retries_unavailable_with_backoff() -> None:
    """A real gRPC server that is UNAVAILABLE twice, then answers: the client's retry policy copes."""
    attempts = []

    class Flaky(vae_pb2_grpc.VaeServiceServicer):
        def SamplePrior(self, request, context):  # noqa: N802
            attempts.append(1)
            if len(attempts) < 3:
                context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
            latents = np.zeros((request.count, M), np.float32)
            probs = np.zeros((request.count, D), np.float32)
            return vae_pb2.SamplePriorResponse(
                latents=to_tensor(latents), probs=to_tensor(probs), samples=to_tensor(probs.astype(np.uint8))
            )

    flaky = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
    vae_pb2_grpc.add_VaeServiceServicer_to_server(Flaky(), flaky)
    port = flaky.add_insecure_port("127.0.0.1:0")
    flaky.start()
    try:
        with VaeClient(f"127.0.0.1:{port}", timeout=10) as client:
            assert client.sample_prior(4)["latents"].shape == (4, M)
        assert len(attempts) == 3
    finally:
        flaky.stop(None)
