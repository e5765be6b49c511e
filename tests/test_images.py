"""The images `make images` built, run for real on the Docker engine: the service image (and the
CUDA image, on the CPU) serving a repository exported by another user, mounted read-only, to
vae.v1 and OIP REST calls from this host; compose from local MNIST files, train to the demo
client. Skipped in one line where no engine runs (`make test` starts one where it can)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import servers
from test_permissions import export_tiny

from vaeserve import __version__
from vaeserve.client import VaeClient
from vaeserve.datasets import model_inputs
from vaeserve.runtime import OnnxPair

ROOT = Path(__file__).resolve().parents[1]
IMAGES = {"service": "vaeserve", "train": "vaeserve-train", "cuda": "vaeserve-cuda"}


def docker(*args: str, check: bool = True, timeout: float = 300, env: dict | None = None) -> str:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )
    if check and done.returncode:
        raise AssertionError(f"docker {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return done.stdout.strip()


def engine_problem() -> str:
    if not shutil.which("docker"):
        return "no docker command (make test installs the engine where it can)"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True)
    return "" if info.returncode == 0 else "no Docker engine answers (make test starts one where it can)"


pytestmark = pytest.mark.skipif(bool(engine_problem()), reason=engine_problem() or "engine")


@pytest.fixture(scope="module", autouse=True)
def images() -> None:
    """All three, tagged latest and with the package version, as `make images` tags them."""
    for name in IMAGES.values():
        for tag in ("latest", __version__):
            if subprocess.run(
                ["docker", "image", "inspect", f"{name}:{tag}"], capture_output=True
            ).returncode:
                pytest.fail(f"image {name}:{tag} is missing: run make images")


@pytest.fixture(scope="module")
def foreign_repo(tiny_run: Path, mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository this test's user (root in CI) exported with umask 022: the images run as
    uid 10001, another user."""
    return export_tiny(tiny_run, tmp_path_factory.mktemp("exported") / "models", mnist_dir, 0o022).parents[1]


def logs(container: str) -> str:
    """What the container wrote, both streams (the service logs to stderr)."""
    done = subprocess.run(["docker", "logs", container], capture_output=True, text=True)
    return done.stdout + done.stderr


def health(container: str) -> str:
    return docker("inspect", "-f", "{{.State.Health.Status}}", container)


def published(container: str, port: int) -> str:
    """The host's 127.0.0.1:PORT that docker publishes the container's ``port`` on."""
    return docker("port", container, f"{port}/tcp").splitlines()[0].replace("0.0.0.0", "127.0.0.1")


@pytest.fixture
def serving(request: pytest.FixtureRequest, foreign_repo: Path) -> Iterator[str]:
    """A container of the image named by the test's parameter, healthy by its own HEALTHCHECK."""
    name = f"vaeserve-test-{os.getpid()}-{request.param}"
    docker("rm", "-f", name, check=False)
    docker(
        "run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp",
        "-p", "127.0.0.1::50051", "-p", "127.0.0.1::8000",
        "-v", f"{foreign_repo}:/models:ro", f"{IMAGES[request.param]}:latest",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while health(name) != "healthy":
            assert health(name) in ("starting", "healthy"), logs(name)
            assert time.monotonic() < deadline, "not healthy in 120 s:\n" + logs(name)
            time.sleep(0.5)
        yield name
    finally:
        docker("rm", "-f", name, check=False)


def test_the_service_image_has_no_torch_and_runs_as_a_user() -> None:
    assert docker("image", "inspect", "-f", "{{.Config.User}}", "vaeserve") == "vae"
    assert docker("run", "--rm", "--entrypoint", "id", "vaeserve", "-u") == "10001"
    probe = "import importlib.util as u; print(u.find_spec('torch') is None)"
    assert docker("run", "--rm", "--entrypoint", "python", "vaeserve", "-c", probe) == "True"


def test_the_cuda_image_lists_the_cuda_provider() -> None:
    probe = "import onnxruntime as o; print(o.get_available_providers())"
    providers = docker("run", "--rm", "--entrypoint", "python", "vaeserve-cuda", "-c", probe)
    assert "CUDAExecutionProvider" in providers, providers


@pytest.mark.parametrize("serving", ["service", "cuda"], indirect=True)
def test_the_image_serves_a_repository_another_user_exported(
    serving: str, foreign_repo: Path, mnist, mnist_dir: Path, tmp_path: Path
) -> None:
    target, rest = published(serving, 50051), published(serving, 8000)
    x = model_inputs(mnist.test_images[:64], "threshold")
    version = foreign_repo / "tiny" / "1"
    expected, _ = OnnxPair(version / "encoder.onnx", version / "decoder.onnx").encode(x)
    with VaeClient(target) as client:
        np.testing.assert_allclose(client.encode(x)["mean"], expected, atol=1e-5, rtol=0)
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    call = urllib.request.Request(f"http://{rest}/v2/models/tiny-encoder/infer", json.dumps(body).encode())
    outputs = {o["name"]: o for o in json.load(urllib.request.urlopen(call, timeout=30))["outputs"]}
    mean = np.array(outputs["mean"]["data"], np.float32).reshape(outputs["mean"]["shape"])
    np.testing.assert_allclose(mean, expected, atol=1e-5, rtol=0)
    for path in ("/", "/console/console.js", "/console/vendor/dygraph.min.js"):  # installed with the package
        with urllib.request.urlopen(f"http://{rest}{path}", timeout=30) as page:
            assert page.status == 200 and "script-src 'self'" in page.headers["Content-Security-Policy"]
    demo = subprocess.run(
        ["vae", "client", "--target", target, "--data-dir", str(mnist_dir), "--out", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stderr
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["model"]["name"] == "tiny"
    docker("stop", serving, timeout=60)
    assert docker("inspect", "-f", "{{.State.ExitCode}}", serving) == "0"
    log = logs(serving)
    assert "draining calls" in log and "stopped" in log and "Traceback" not in log


def test_compose_trains_from_local_files_and_serves_on_the_published_port(mnist_dir: Path) -> None:
    project = f"vaeserve-test-{os.getpid()}"
    grpc_port, http_port, metrics_port = (servers.free_port() for _ in range(3))
    env = {
        **os.environ,
        "MNIST_DIR": str(mnist_dir.resolve()),
        "EPOCHS": "1",
        "IW_SAMPLES": "5",
        "VAESERVE_PUBLISHED_PORT": str(grpc_port),
        "VAESERVE_PUBLISHED_HTTP_PORT": str(http_port),
        "VAESERVE_PUBLISHED_METRICS_PORT": str(metrics_port),
    }
    compose = ("compose", "-p", project)
    try:
        docker(*compose, "up", "--no-build", "--wait", env=env, timeout=600)
        assert docker(*compose, "ps", "--format", "{{.Health}}", "serve", env=env) == "healthy"
        with VaeClient(f"127.0.0.1:{grpc_port}") as client:
            assert client.model_info()[0]["name"] == "mnist"
            assert client.sample_prior(4, seed=0)["samples"].shape == (4, 784)
        client_container = docker(*compose, "ps", "-a", "-q", "client", env=env)
        assert docker("wait", client_container, timeout=300) == "0", logs(client_container)
        trained = docker(*compose, "logs", "train", env=env)
        assert "--data-dir /data/mnist" in trained and "trained 1 epochs" in trained, trained
        pictures = docker(*compose, "run", "--rm", "--no-deps", "--entrypoint", "ls", "client",
                          "/work/out/demo", env=env)  # fmt: skip
        assert {"reconstruct.png", "sample_prior.png"} <= set(pictures.split())
    finally:
        docker(*compose, "down", "-v", "--remove-orphans", env=env, check=False)
