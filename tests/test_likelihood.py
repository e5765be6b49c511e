"""The continuous Bernoulli (Loaiza-Ganem & Cunningham 2019) as the code computes it, against
its definition by numerical integration; numpy and torch forms agree; dequantization, per-row
seeded scores and the AUROC of the OOD benchmark."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vaeserve.datasets import binarize, model_inputs
from vaeserve.elbo import likelihood_mean, likelihood_sample, log_cb_normaliser, log_likelihood
from vaeserve.evaluation import score_rows
from vaeserve.ood import auroc
from vaeserve.training import likelihoods

LOGITS = np.array([-40.0, -6.0, -0.7, -0.1, -0.02, 0.0, 1e-4, 0.09, 0.5, 3.0, 25.0], np.float32)


def test_the_density_integrates_to_one_and_its_mean_is_the_mean() -> None:
    x = np.linspace(0.0, 1.0, 400_001, dtype=np.float64)
    for logit in LOGITS:
        logits = np.full((len(x), 1), logit, np.float32)
        density = np.exp(log_likelihood(x[:, None].astype(np.float32), logits, "continuous-bernoulli"))
        assert np.trapezoid(density, x) == pytest.approx(1.0, abs=2e-4), logit
        mean = np.trapezoid(density * x, x)
        assert likelihood_mean(np.float32(logit), "continuous-bernoulli") == pytest.approx(mean, abs=2e-4)


def test_the_normaliser_matches_its_closed_form_in_float64() -> None:
    far = LOGITS[np.abs(LOGITS) > 0.2].astype(np.float64)
    exact = np.log(far / np.tanh(far / 2))
    np.testing.assert_allclose(log_cb_normaliser(far.astype(np.float32)), exact, rtol=0, atol=2e-6)
    assert log_cb_normaliser(np.float32(0.0)) == pytest.approx(np.log(2.0))


def test_torch_and_numpy_agree_and_gradients_stay_finite_at_zero() -> None:
    logits = torch.tensor(LOGITS, requires_grad=True)
    normaliser = likelihoods.log_cb_normaliser(logits)
    mean = likelihoods.likelihood_mean(logits, "continuous-bernoulli")
    np.testing.assert_allclose(normaliser.detach().numpy(), log_cb_normaliser(LOGITS), atol=1e-6)
    np.testing.assert_allclose(
        mean.detach().numpy(), likelihood_mean(LOGITS, "continuous-bernoulli"), atol=1e-6
    )
    (normaliser.sum() + mean.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    x = torch.rand(5, len(LOGITS))
    ours = likelihoods.log_likelihood(x, logits.detach().expand(5, -1), "continuous-bernoulli")
    theirs = log_likelihood(x.numpy(), np.broadcast_to(LOGITS, (5, len(LOGITS))), "continuous-bernoulli")
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-5)


def test_draws_follow_the_distribution() -> None:
    rng = np.random.default_rng(0)
    logits = np.repeat(LOGITS[None], 100_000, axis=0)
    draws = likelihood_sample(logits, "continuous-bernoulli", rng)
    assert draws.dtype == np.float32 and draws.min() >= 0 and draws.max() <= 1
    error = 4 * draws.std(axis=0) / np.sqrt(len(draws))
    assert np.all(np.abs(draws.mean(axis=0) - likelihood_mean(LOGITS, "continuous-bernoulli")) < error + 1e-4)


def test_dequantization_keeps_each_pixel_in_its_bin() -> None:
    pixels = np.arange(256, dtype=np.uint8)[None].repeat(50, axis=0)
    noisy = binarize(pixels, "dequantize", np.random.default_rng(1))
    assert np.all((noisy * 256 >= pixels) & (noisy * 256 < pixels.astype(np.float32) + 1))
    np.testing.assert_allclose(model_inputs(pixels, "dequantize") * 256, pixels + 0.5, atol=1e-4)


def test_a_rows_scores_do_not_depend_on_the_pieces_it_is_scored_in(tiny_run, mnist) -> None:
    from vaeserve.training import checkpoint
    from vaeserve.training.backend import numpy_callables

    encode, decode = numpy_callables(checkpoint.model_from(checkpoint.load(tiny_run)))
    x = model_inputs(mnist.test_images[:40], "threshold")
    whole = score_rows(encode, decode, x, iw_samples=7, seed=3)
    pieces = [score_rows(encode, decode, x[a:b], 7, seed=3, first_row=a) for a, b in ((0, 13), (13, 40))]
    np.testing.assert_array_equal(np.concatenate([p.log_px for p in pieces]), whole.log_px)
    other = score_rows(encode, decode, x, iw_samples=7, seed=4)
    assert not np.array_equal(other.log_px, whole.log_px)


def test_auroc_counts_pairs_and_ties() -> None:
    rng = np.random.default_rng(2)
    inliers, outliers = rng.integers(0, 20, 300), rng.integers(5, 25, 200)
    pairs = (outliers[:, None] > inliers[None]).mean() + 0.5 * (outliers[:, None] == inliers[None]).mean()
    assert auroc(inliers, outliers) == pytest.approx(pairs)
    assert auroc(np.zeros(3), np.ones(3)) == 1.0 and auroc(np.ones(3), np.zeros(3)) == 0.0
