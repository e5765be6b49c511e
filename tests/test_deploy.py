"""Dockerfile and compose agree with each other and with the code (read, without an engine), and
the commands they run work outside Docker; tests/test_images.py builds and runs the images."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import servers
import yaml

from vaeserve.service.settings import ENV_PREFIX, ServeSettings

ROOT = Path(__file__).resolve().parents[1]
SERVE_VARIABLES = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(ServeSettings)}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def stage(dockerfile: str, name: str) -> str:
    match = re.search(rf"^FROM \S+ AS {name}\n(.*?)(?=^FROM |\Z)", dockerfile, re.S | re.M)
    assert match, f"no stage {name}"
    return match.group(1)


def test_dockerfile_stages(dockerfile: str) -> None:
    for name in ("service", "service-cuda"):
        body = stage(dockerfile, name)
        assert "torch" not in body and "gcc" not in body and "build-essential" not in body
        assert "USER vae" in body and 'ENTRYPOINT ["vae", "serve"]' in body
        assert "HEALTHCHECK" in body and 'CMD ["vae", "health"]' in body
        assert "EXPOSE 50051 8000 9464" in body and 'VOLUME ["/models"]' in body
        assert f"requirements-{'service' if name == 'service' else 'cuda'}.txt" in body
        for variable in re.findall(r"(VAESERVE_[A-Z_]+)=", body):
            assert variable in SERVE_VARIABLES, variable
    assert "nvidia/cuda" not in dockerfile  # CUDA and cuDNN come as PyPI wheels
    train = stage(dockerfile, "train")
    assert "requirements-train.txt" in train and "USER vae" in train
    # torch's CPU wheel where the lock's path names it (docker/requirements-train.txt)
    assert "COPY docker/local/wheels/ /opt/wheels/" in train and "scripts/train_and_export.sh" in train
    assert re.search(r"^ARG BASE_IMAGE=python:\d+\.\d+\.\d+-slim", dockerfile, re.M)  # pinned
    # Every stage copies what the package's setup.py installs.
    packages = re.findall(r'"vaeserve\.\w+" = "(\w+)"', (ROOT / "pyproject.toml").read_text())
    for folder in packages:
        assert f"COPY {folder} {folder}" in stage(dockerfile, "wheel"), folder


def pins(image: str) -> dict[str, str]:
    """docker/requirements-IMAGE.txt (exported from uv.lock): name -> version, each with hashes."""
    text = (ROOT / "docker" / f"requirements-{image}.txt").read_text()
    found = re.findall(r"^([a-z0-9-]+)==([^ ;]+) ;[^\n]*\\\n\s+--hash=sha256:", text, re.M)
    requirements = [line for line in text.splitlines() if line[:1].isalnum()]
    assert len(found) == len(requirements), requirements  # every pin exact, and hashed
    return dict(found)


def test_cuda_requirements_pin_onnxruntime_gpu_with_its_libraries() -> None:
    cuda = pins("cuda")
    assert "onnxruntime-gpu" in cuda and "onnxruntime" not in cuda
    assert {"nvidia-cublas", "nvidia-cudnn-cu13", "nvidia-cuda-runtime"} <= set(cuda)


def test_pinned_requirements_match_the_project() -> None:
    names = set(pins("service"))
    assert {
        "numpy",
        "onnxruntime",
        "grpcio",
        "protobuf",
        "grpcio-health-checking",
        "uvloop",
        "aiohttp",
        "orjson",
    } <= names
    assert "torch" not in names


def test_compose_services_agree_with_dockerfile_and_code(compose: dict, dockerfile: str) -> None:
    services = compose["services"]
    assert {"train", "serve", "serve-gpu", "client"} <= set(services)
    targets = set(re.findall(r"^FROM \S+ AS (\S+)", dockerfile, re.M))
    for name in ("train", "serve", "serve-gpu"):
        assert services[name]["build"]["target"] in targets
    serve = services["serve"]
    assert serve["depends_on"]["train"]["condition"] == "service_completed_successfully"
    assert serve["healthcheck"]["test"] == ["CMD", "vae", "health"]
    assert any(str(p).endswith(":50051") for p in serve["ports"])
    assert serve["environment"]["VAESERVE_PORT"] == "50051"
    assert "models:/models:ro" in serve["volumes"] and "models:/models" in services["train"]["volumes"]
    assert set(compose["volumes"]) >= {"models", "work"}
    for name in ("serve", "serve-gpu"):
        assert set(services[name]["environment"]) <= SERVE_VARIABLES
    gpu = services["serve-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["environment"]["VAESERVE_DEVICE"] == "cuda"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    client = services["client"]
    assert client["depends_on"]["serve"]["condition"] == "service_healthy"
    assert "vae client --target serve:50051" in client["command"][0]
    for name in ("train", "client"):  # MNIST_DIR mounted read-only, where the job reads it
        assert "${MNIST_DIR:-no-mnist}:/data/mnist:ro" in services[name]["volumes"]
        assert services[name]["environment"]["DATA_DIR"] == "${MNIST_DIR:+/data/mnist}"


def test_env_example_and_docs_document_the_variables(compose: dict) -> None:
    example = (ROOT / ".env.example").read_text()
    # ${NAME} is compose's; $${NAME} is the container shell's own variable
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_]+)", (ROOT / "docker-compose.yml").read_text()))
    defined = set(re.findall(r"^([A-Z_]+)=", example, re.M))
    assert used - {"VAESERVE_TAG"} <= defined | {"VAESERVE_TAG"}, used - defined
    service_page = (ROOT / "docs" / "service.md").read_text()
    for variable in SERVE_VARIABLES:
        assert f"`{variable}`" in service_page, variable


def test_health_command_exit_codes(repo: Path, tmp_path: Path) -> None:
    port = servers.free_port()
    down = subprocess.run(
        ["vae", "health", "--target", f"127.0.0.1:{port}", "--timeout", "1"], capture_output=True, text=True
    )
    assert down.returncode == 1 and re.search("UNAVAILABLE|DEADLINE_EXCEEDED", down.stdout)
    with servers.running(repo, tmp_path / "serve.log") as server:
        port = server.target.rsplit(":", 1)[1]
        up = subprocess.run(
            ["vae", "health"], capture_output=True, text=True, env={**os.environ, "VAESERVE_PORT": port}
        )
    assert up.returncode == 0 and "SERVING" in up.stdout


def test_health_wait_sees_a_server_that_starts_later(repo: Path, tmp_path: Path) -> None:
    """`vae health --wait` as an init script uses it: asked before the server is up."""
    port = servers.free_port()
    target = f"127.0.0.1:{port}"
    waiting = subprocess.Popen(
        ["vae", "health", "--target", target, "--wait", "90"], stdout=subprocess.PIPE, text=True
    )
    time.sleep(0.5)
    assert waiting.poll() is None, "it gave up before the server started"
    command = [sys.executable, "-c", servers.WITHOUT_TORCH, "serve", "--repo", str(repo)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", "--http-port", "0"]
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            out, _ = waiting.communicate(timeout=120)
        finally:
            server.terminate()
            server.wait(60)
    assert waiting.returncode == 0 and f"{target}: SERVING" in out
    gone = subprocess.run(
        ["vae", "health", "--target", target, "--wait", "0.3", "--timeout", "1"],
        capture_output=True,
        text=True,
    )
    assert gone.returncode == 1


def test_main_job_end_to_end(tmp_path: Path, mnist_dir: Path) -> None:
    """The quickstart's main job (scripts/main_job.sh) with a tiny model: what compose's train,
    serve and client services run, outside Docker."""
    port = servers.free_port()
    env = {
        **os.environ,
        "DATA_DIR": str(mnist_dir),
        "RUN_DIR": str(tmp_path / "run"),
        "REPO": str(tmp_path / "models"),
        "OUT": str(tmp_path / "demo"),
        "LOG": str(tmp_path / "serve.log"),
        "PORT": str(port),
        "EPOCHS": "1",
        "LIMIT": "3000",
        "HIDDEN_SIZES": "64",
        "LATENT_SIZE": "4",
        "IW_SAMPLES": "5",
        "VARIANTS": "",
    }
    result = subprocess.run(
        [str(ROOT / "scripts" / "main_job.sh")], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "service stopped cleanly" in result.stdout
    assert re.search(r"test ELBO -\d+\.\d+, NLL_5 \d+\.\d+; service Encode [\d,]+ rows/s", result.stdout)
    pictures = {p.name for p in (tmp_path / "demo").glob("*.png")}
    assert pictures == {"reconstruct.png", "sample_prior.png", "latent_manifold.png", "interpolation.png"}
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["encoded_rows"] == 10000 and summary["model"]["latent_size"] == 4
    assert "stopped" in (tmp_path / "serve.log").read_text()
    with socket.socket() as probe:  # nothing is left listening
        assert probe.connect_ex(("127.0.0.1", port)) != 0
