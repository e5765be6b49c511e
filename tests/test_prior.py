"""A learned prior is a part of the model: the VampPrior trains, exports as the Gaussian mixture
it is (parity-checked, checksummed), and SamplePrior, Score and the evaluator use it; a version
with the standard normal serves exactly as before."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import servers
import torch
from conftest import TINY

from vaeserve.datasets import model_inputs
from vaeserve.elbo import LOG_2PI
from vaeserve.errors import ConfigError, RepositoryError
from vaeserve.evaluation import evaluate
from vaeserve.ood import scores
from vaeserve.prior import STANDARD, Prior
from vaeserve.repository import load_version, open_path
from vaeserve.runtime import OnnxPair

COMPONENTS = 16
VAMP = {**TINY, "prior": "vamp", "prior_components": COMPONENTS, "objective": "iwae", "train_samples": 2}


def direct_log_mixture(z: np.ndarray, means: np.ndarray, stddevs: np.ndarray) -> np.ndarray:
    """log (1/K) Σ_k N(z; μ_k, σ_k²), broadcast over [N, K, M] in float64: the definition."""
    z, means, stddevs = (a.astype(np.float64) for a in (z, means, stddevs))
    eps = (z[:, None, :] - means[None]) / stddevs[None]
    per = np.sum(-0.5 * eps**2 - np.log(stddevs[None]) - 0.5 * LOG_2PI, axis=-1)
    top = per.max(axis=1)
    return top + np.log(np.mean(np.exp(per - top[:, None]), axis=1))


@pytest.fixture(scope="module")
def vamp_repo(tmp_path_factory: pytest.TempPathFactory, mnist, mnist_dir: Path, tiny_run: Path) -> Path:
    """A repository of a tiny VampPrior model (vamp/1), really trained and exported, beside the
    tiny standard-prior model (tiny/1)."""
    from vaeserve.export.exporter import ExportRequest, export_model
    from vaeserve.training.config import resolve_config
    from vaeserve.training.trainer import start_or_resume

    run = tmp_path_factory.mktemp("vamp_run")
    start_or_resume(resolve_config("seed", None, VAMP), mnist, run, resume=False, progress=False).run()
    repo = tmp_path_factory.mktemp("vamp_models")
    export_model(ExportRequest(run, repo, "vamp", iw_samples=10, data_dir=mnist_dir))
    export_model(ExportRequest(tiny_run, repo, "tiny", iw_samples=10, data_dir=mnist_dir))
    return repo


def test_the_mixture_density_is_its_definition_and_samples_come_from_its_components() -> None:
    rng = np.random.default_rng(3)
    means = rng.normal(size=(7, 5)).astype(np.float32) * 3
    stddevs = rng.uniform(0.05, 1.5, size=(7, 5)).astype(np.float32)
    prior = Prior(means, stddevs)
    z = rng.normal(size=(300, 5)).astype(np.float32) * 2
    np.testing.assert_allclose(prior.log_prob(z), direct_log_mixture(z, means, stddevs), rtol=0, atol=1e-6)
    narrow = Prior(means, np.full_like(stddevs, 1e-4))
    drawn = narrow.sample(2000, 5, np.random.default_rng(0))
    nearest = np.abs(drawn[:, None, :] - means[None]).max(axis=-1).min(axis=1)
    assert drawn.dtype == np.float32 and nearest.max() < 1e-2  # every draw sits on a component
    assert len(np.unique(np.abs(drawn[:, None, :] - means[None]).max(axis=-1).argmin(axis=1))) == 7


def test_the_standard_prior_keeps_the_draws_and_bounds_every_version_had() -> None:
    rng = np.random.default_rng(5)
    assert np.array_equal(
        STANDARD.sample(9, 4, np.random.default_rng(11)),
        np.random.default_rng(11).standard_normal((9, 4), dtype=np.float32),
    )
    mean, stddev = rng.normal(size=(3, 4)).astype(np.float32), rng.uniform(0.1, 1, (3, 4)).astype(np.float32)
    eps = rng.standard_normal((3, 6, 4), dtype=np.float32)
    z = mean[:, None, :] + stddev[:, None, :] * eps
    old = np.sum(-0.5 * z**2 + 0.5 * eps**2 + np.log(stddev)[:, None, :], axis=-1)
    assert np.array_equal(STANDARD.log_ratio(z, eps, stddev), old)
    # The mixture's log p(z) − log q(z|x) with one standard component is the same quantity.
    one = Prior(np.zeros((1, 4), np.float32), np.ones((1, 4), np.float32))
    np.testing.assert_allclose(one.log_ratio(z, eps, stddev), old, rtol=1e-5, atol=1e-5)


def test_the_torch_vamp_prior_is_the_numpy_mixture(mnist) -> None:
    from vaeserve.training.backend import numpy_prior
    from vaeserve.training.config import resolve_config
    from vaeserve.training.model import VAE
    from vaeserve.training.priors import log_mixture

    torch.manual_seed(0)
    model = VAE.from_config(resolve_config("seed", None, VAMP), (28, 28)).eval()
    model.prior.initialise_from(torch.rand(100, 784), torch.Generator().manual_seed(0))
    prior = numpy_prior(model)
    assert prior.means.shape == (COMPONENTS, TINY["latent_size"])
    z = prior.sample(500, TINY["latent_size"], np.random.default_rng(1))
    with torch.no_grad():
        torch_log_p = model.prior.log_prob(torch.from_numpy(z), model.encode).numpy()
        matmul = log_mixture(
            torch.from_numpy(z).double(),
            *(torch.from_numpy(a).double() for a in (prior.means, prior.stddevs)),
        )
    np.testing.assert_allclose(torch_log_p, prior.log_prob(z), atol=1e-3)
    np.testing.assert_allclose(matmul.numpy(), direct_log_mixture(z, prior.means, prior.stddevs), atol=1e-8)


def test_a_vamp_prior_needs_as_many_training_rows_as_pseudo_inputs(mnist, tmp_path: Path) -> None:
    from vaeserve.training.config import resolve_config
    from vaeserve.training.trainer import start_or_resume

    config = resolve_config("seed", None, {**VAMP, "limit": 100, "prior_components": 500})
    with pytest.raises(
        ConfigError, match=r"prior_components = 500 .* there are 100; pass --prior-components 100"
    ):
        start_or_resume(config, mnist, tmp_path / "run", resume=False, progress=False)
    with pytest.raises(ConfigError, match="prior = 'flow'; expected one of standard-normal, vamp"):
        resolve_config("seed", None, {"prior": "flow"})


def test_the_export_holds_the_prior_checked_and_describes_the_model(vamp_repo: Path, tmp_path: Path) -> None:
    version = open_path(vamp_repo / "vamp")
    manifest = version.manifest
    assert manifest.prior is not None and manifest.prior.file == "prior.npz"
    assert (
        manifest.architecture["prior"] == "vamp" and manifest.architecture["prior_components"] == COMPONENTS
    )
    assert (
        "posterior" in manifest.architecture and manifest.architecture["hidden_sizes"] == TINY["hidden_sizes"]
    )
    parity = manifest.parity["prior"]
    assert parity["components"] == COMPONENTS and max(parity["mean"], parity["stddev"]) <= 1e-5
    assert parity["log_prob"] <= 1e-2
    prior = version.load_prior()
    assert prior.means.shape == (COMPONENTS, TINY["latent_size"]) and (prior.stddevs > 0).all()
    standard = open_path(vamp_repo / "tiny")
    assert standard.manifest.prior is None and standard.load_prior() is STANDARD
    assert standard.manifest.architecture["prior"] == "standard-normal"
    # A changed prior file is refused like a changed graph.
    copy = tmp_path / "vamp" / "1"
    shutil.copytree(version.path, copy)
    data = dict(np.load(copy / "prior.npz"))
    data["means"][0, 0] += 1.0
    np.savez(copy / "prior.npz", **data)
    with pytest.raises(RepositoryError, match=r"prior\.npz: .*(bytes|SHA-256)"):
        load_version(copy)


def test_a_served_vamp_model_samples_its_prior_and_scores_as_the_evaluator(
    vamp_repo: Path, mnist, tmp_path: Path
) -> None:
    from vaeserve.client import VaeClient

    version = open_path(vamp_repo / "vamp")
    prior, pair = version.load_prior(), OnnxPair.load(version)
    standard = open_path(vamp_repo / "tiny")
    pixels = mnist.test_images[:400]
    x = model_inputs(pixels, version.manifest.binarization)
    with servers.running(vamp_repo, tmp_path / "serve.log", "--workers", "1") as server:
        with VaeClient(server.target, model="vamp") as client:
            sampled = client.sample_prior(64, seed=7)
            served = client.score(pixels, iw_samples=10, seed=3)
            encoded = client.encode(pixels[:5])
            decoded = client.decode(encoded["mean"])
            rebuilt = client.reconstruct(pixels[:5], use_mean=True)
        with VaeClient(server.target, model="tiny") as client:
            old = client.sample_prior(64, seed=7)
    expected = prior.sample(64, version.latent_size, np.random.default_rng(7))
    np.testing.assert_array_equal(sampled["latents"], expected)
    assert not np.allclose(
        sampled["latents"], np.random.default_rng(7).standard_normal((64, version.latent_size))
    )
    np.testing.assert_array_equal(
        old["latents"], np.random.default_rng(7).standard_normal((64, standard.latent_size), dtype=np.float32)
    )
    mean, _ = pair.encode(x[:5])
    np.testing.assert_allclose(encoded["mean"], mean, atol=1e-6)
    assert decoded["probs"].shape == (5, 784) and rebuilt["probs"].shape == (5, 784)
    # Score is the evaluator's estimator with the model's prior, row for row...
    local = scores(
        pair.encode, pair.decode_logits, x, 10, 3, version.likelihood, version.image_shape, prior=prior
    )
    for name, values in local.items():
        np.testing.assert_allclose(served[name], values, rtol=1e-5, atol=1e-3)
    standard_prior_scores = scores(
        pair.encode, pair.decode_logits, x, 10, 3, version.likelihood, version.image_shape
    )
    assert abs(standard_prior_scores["log_px"].mean() - served["log_px"].mean()) > 0.5  # the prior matters
    # ...and its mean ELBO is the evaluator's (k = 200) within the standard error.
    result = evaluate(
        pair.encode, pair.decode_logits, x, 200, seed=0, likelihood=version.likelihood, prior=prior
    )
    assert abs(float(served["elbo"].mean()) - result.elbo) < 2 * result.elbo_stderr
    assert result.nll <= -result.elbo + 1e-6
