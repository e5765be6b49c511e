"""A user's own small dataset, as a new user would bring it: 8×8 grey images in [0, 1] (made
here from MNIST, 3×3-pooled), and a flat vector of features. Train, export, evaluate, serve,
score and embed it through the `vae` command, with no traceback anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import servers

from vaeserve.client import VaeClient

SMALL = ["--hidden-sizes", "32", "--latent-size", "4", "--batch-size", "32", "--epochs", "3"]


def vae(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "vaeserve.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def job(verb: str, model: Path, source: Path, output: Path, *flags: str) -> str:
    """`vae embed` or `vae score` of ``source`` into ``output``."""
    paths = ("--model", str(model), "--input", str(source), "--output", str(output))
    return ok(vae(verb, *paths, "--no-progress", *flags))


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory, mnist) -> Path:
    """360 images of 8×8 floats in [0, 1]: 300 to train, 60 to test."""
    pixels = mnist.train_images[:360].reshape(-1, 28, 28)[:, 2:26, 2:26].astype(np.float32) / 255
    small = pixels.reshape(-1, 8, 3, 8, 3).mean(axis=(2, 4))
    folder = tmp_path_factory.mktemp("digits")
    np.savez(folder / "digits.npz", x_train=small[:300], x_test=small[300:])
    return folder / "digits.npz"


@pytest.fixture(scope="module")
def digits_model(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trained from the data's folder with a relative path, exported from elsewhere (the run
    recorded where its data lives), with the continuous Bernoulli likelihood."""
    work = tmp_path_factory.mktemp("digits-work")
    flags = ["--binarization", "none", "--likelihood", "continuous-bernoulli", *SMALL]
    ok(
        vae(
            "train",
            "--dataset",
            digits.name,
            "--out",
            str(work / "run"),
            "--no-progress",
            *flags,
            cwd=digits.parent,
        )
    )
    ok(
        vae(
            "export",
            "--checkpoint",
            str(work / "run"),
            "--repo",
            str(work / "models"),
            "--name",
            "digits",
            "--iw-samples",
            "20",
            cwd=work,
        )
    )
    return work / "models" / "digits" / "1"


def test_a_small_set_gets_a_validation_split_or_says_which_flag_to_change(
    digits: Path, tmp_path: Path
) -> None:
    result = vae(
        "train", "--dataset", str(digits), "--out", str(tmp_path / "r"), "--validation-rows", "300", *SMALL
    )
    assert result.returncode == 1
    assert "--validation-rows 300" in result.stderr and "--train-split all-train" in result.stderr
    out = ok(
        vae(
            "train",
            "--dataset",
            str(digits),
            "--out",
            str(tmp_path / "r"),
            "--validation-rows",
            "30",
            "--no-progress",
            *SMALL,
        )
    )
    assert "validation ELBO" in out
    state = json.loads((tmp_path / "r" / "config.json").read_text())
    assert state["validation_rows"] == 30


def test_the_export_records_the_shape_the_likelihood_and_the_data(digits_model: Path, digits: Path) -> None:
    manifest = json.loads((digits_model / "manifest.json").read_text())
    assert manifest["image_shape"] == [8, 8] and manifest["input_size"] == 64
    assert manifest["likelihood"] == "continuous-bernoulli"
    assert manifest["training"]["data_source"] == str(digits.resolve())
    assert manifest["training"]["split_sizes"] == {"train": 250, "validation": 50, "test": 60}
    assert manifest["parity"]["max_abs_diff"]["probs"] <= 1e-5  # E[x|z] of the continuous Bernoulli


def test_evaluate_serve_score_and_embed_the_small_model(
    digits_model: Path, digits: Path, tmp_path: Path
) -> None:
    out = ok(vae("evaluate", "--model", str(digits_model), "--iw-samples", "50", "--json", "--no-progress"))
    evaluation = json.loads(out)
    x_test = np.load(digits)["x_test"].reshape(-1, 64).astype(np.float32)
    test = tmp_path / "test.npy"
    np.save(test, x_test)
    repo = digits_model.parents[1]
    with servers.running(repo, tmp_path / "serve.log", "--workers", "1") as server:
        with VaeClient(server.target, chunk_rows=16) as client:
            info = client.model_info()[0]
            assert info["likelihood"] == "continuous-bernoulli" and info["image_shape"] == (8, 8)
            scores = client.score(x_test, iw_samples=50, seed=0)
            rebuilt = client.reconstruct(x_test[:4], seed=1)
        through = ("--server", server.target)
        job(
            "score",
            digits_model,
            test,
            tmp_path / "served.npy",
            *through,
            "--iw-samples",
            "5",
            "--chunk-rows",
            "25",
        )
        job("embed", digits_model, test, tmp_path / "latents.npy", *through)
    # The judged agreement: Score's mean ELBO and log p(x) against the evaluator's, within its
    # standard error (different draws, the same estimator).
    assert abs(scores["elbo"].mean() - evaluation["elbo"]) < 2 * evaluation["elbo_stderr"]
    assert abs(-scores["log_px"].mean() - evaluation["nll"]) < 2 * evaluation["nll_stderr"]
    assert np.all(scores["log_px"] >= scores["elbo"] - 1.0)  # the k-sample bound is tighter, row by row
    samples = rebuilt["samples"]
    assert samples.dtype == np.float32 and samples.min() >= 0 and samples.max() <= 1  # continuous draws
    assert len(np.unique(samples)) > 100
    job("score", digits_model, test, tmp_path / "local.npy", "--iw-samples", "5")
    served, local = np.load(tmp_path / "served.npy"), np.load(tmp_path / "local.npy")
    for name in ("elbo", "log_px", "complexity_bits", "ood_score"):
        np.testing.assert_allclose(served[name], local[name], rtol=0, atol=1e-3)
    assert np.load(tmp_path / "latents.npy")["mean"].shape == (60, 4)


def test_flat_features_with_and_without_an_image_shape(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    features = rng.beta(2, 5, size=(240, 20)).astype(np.float32)  # not images: 20 features in [0, 1]
    np.savez(tmp_path / "flat.npz", x_train=features[:200], x_test=features[200:])
    flags = ["--dataset", str(tmp_path / "flat.npz"), "--binarization", "none", "--no-progress", *SMALL]
    ok(vae("train", "--out", str(tmp_path / "flat"), "--likelihood", "continuous-bernoulli", *flags))
    ok(
        vae(
            "export",
            "--checkpoint",
            str(tmp_path / "flat"),
            "--repo",
            str(tmp_path / "models"),
            "--name",
            "flat",
            "--iw-samples",
            "5",
        )
    )
    manifest = json.loads((tmp_path / "models" / "flat" / "1" / "manifest.json").read_text())
    assert manifest["image_shape"] == [20] and manifest["training"]["preset"] == "seed"  # train's default
    np.save(tmp_path / "x.npy", features[200:])
    job("score", tmp_path / "models" / "flat", tmp_path / "x.npy", tmp_path / "s.parquet")
    result = vae("train", "--out", str(tmp_path / "shaped"), "--image-shape", "4", "4", *flags)
    assert result.returncode == 1 and "--image-shape 4 4 holds 16 values; the rows hold 20" in result.stderr
    ok(vae("train", "--out", str(tmp_path / "shaped"), "--image-shape", "4", "5", *flags))
    assert (tmp_path / "shaped" / "plots" / "posterior_predictive.png").exists()


def test_export_reads_the_runs_own_data_folder_offline(tiny_run: Path, tmp_path: Path) -> None:
    """The tiny run was trained from ../shared/data/mnist: no --data-dir, an empty download
    cache, and the export still finds its test images."""
    out = ok(
        vae(
            "export",
            "--checkpoint",
            str(tiny_run),
            "--repo",
            str(tmp_path / "models"),
            "--name",
            "t",
            "--iw-samples",
            "2",
            env={"VAESERVE_CACHE_DIR": str(tmp_path / "empty-cache")},
        )
    )
    assert "exported" in out
    assert not (tmp_path / "empty-cache").exists() or not any((tmp_path / "empty-cache").rglob("*.gz"))
