"""Shared, session-cached fixtures: the real MNIST files and a really trained tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = Path(os.environ.get("VAESERVE_TEST_MNIST", ROOT.parent / "shared" / "data" / "mnist"))

# A model small enough to train in seconds, with every part of the real pipeline.
TINY = {"hidden_sizes": [64], "latent_size": 8, "epochs": 2, "limit": 5000, "batch_size": 64}


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"MNIST IDX files not found in {MNIST_DIR} (set VAESERVE_TEST_MNIST)")
    return MNIST_DIR


@pytest.fixture(scope="session")
def mnist(mnist_dir: Path):
    from vaeserve.datasets import load_dataset

    return load_dataset("mnist", data_dir=mnist_dir)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, mnist) -> Path:
    """A run directory holding a tiny VAE really trained on MNIST for two epochs."""
    from vaeserve.training.config import resolve_config
    from vaeserve.training.trainer import start_or_resume

    run_dir = tmp_path_factory.mktemp("tiny_run")
    config = resolve_config("seed", None, TINY)
    start_or_resume(config, mnist, run_dir, resume=False, progress=False).run()
    return run_dir


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory, tiny_run: Path, mnist_dir: Path) -> Path:
    """A model repository holding the tiny run, really exported (fp32, int8 and fp16) as tiny/1."""
    from vaeserve.export.exporter import ExportRequest, export_model

    repo = tmp_path_factory.mktemp("models")
    request = ExportRequest(
        tiny_run, repo, "tiny", variants=("int8", "fp16"), iw_samples=10, data_dir=mnist_dir
    )
    export_model(request)
    return repo


@pytest.fixture(scope="session")
def serve(repo: Path, tmp_path_factory: pytest.TempPathFactory):
    """The one factory of shared test servers: ``serve(*flags, token=..., admin_token=...)``
    starts a real `vae serve` (tests/servers.py) on 127.0.0.1 over the tiny repository, once per
    set of arguments for the whole session; at its end each drains and must exit 0."""
    import servers

    started: dict[tuple, servers.Server] = {}

    def start(*flags: str, token: str | None = None, admin_token: str | None = None) -> servers.Server:
        key = (flags, token, admin_token)
        if key not in started:
            folder = tmp_path_factory.mktemp("serve")
            extra: list[str] = []
            for flag, value in (("--token-file", token), ("--admin-token-file", admin_token)):
                if value:
                    (folder / flag.strip("-")).write_text(value)
                    extra += [flag, str(folder / flag.strip("-"))]
            client = {"token": token} if token else None
            started[key] = servers.start(repo, folder / "serve.log", *flags, *extra, client=client)
        return started[key]

    yield start
    for server in started.values():
        assert server.stop() == 0 and "stopped" in server.output(), server.output()
