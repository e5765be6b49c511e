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
