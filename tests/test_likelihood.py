"""The continuous Bernoulli (Loaiza-Ganem & Cunningham 2019) and the discretized logistic
mixture (Salimans et al. 2017) as the code computes them, against their definitions (numerical
integration; the 256 bins' masses); numpy and torch forms agree; dequantization, per-row seeded
scores and the AUROC of the OOD benchmark."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vaeserve.datasets import binarize, model_inputs
from vaeserve.evaluation import score_rows
from vaeserve.likelihoods import ContinuousBernoulli, DiscretizedLogistic, log_cb_normaliser
from vaeserve.ood import auroc
from vaeserve.training import likelihoods

CB = ContinuousBernoulli()
LOGITS = np.array([-40.0, -6.0, -0.7, -0.1, -0.02, 0.0, 1e-4, 0.09, 0.5, 3.0, 25.0], np.float32)


def test_the_density_integrates_to_one_and_its_mean_is_the_mean() -> None:
    x = np.linspace(0.0, 1.0, 400_001, dtype=np.float64)
    for logit in LOGITS:
        logits = np.full((len(x), 1), logit, np.float32)
        density = np.exp(CB.log_prob(x[:, None].astype(np.float32), logits))
        assert np.trapezoid(density, x) == pytest.approx(1.0, abs=2e-4), logit
        mean = np.trapezoid(density * x, x)
        assert CB.mean(np.float32(logit)) == pytest.approx(mean, abs=2e-4)


def test_the_normaliser_matches_its_closed_form_in_float64() -> None:
    far = LOGITS[np.abs(LOGITS) > 0.2].astype(np.float64)
    exact = np.log(far / np.tanh(far / 2))
    np.testing.assert_allclose(log_cb_normaliser(far.astype(np.float32)), exact, rtol=0, atol=2e-6)
    assert log_cb_normaliser(np.float32(0.0)) == pytest.approx(np.log(2.0))


def test_torch_and_numpy_agree_and_gradients_stay_finite_at_zero() -> None:
    logits = torch.tensor(LOGITS, requires_grad=True)
    normaliser = likelihoods.log_cb_normaliser(logits)
    mean = likelihoods.likelihood_mean(logits, CB)
    np.testing.assert_allclose(normaliser.detach().numpy(), log_cb_normaliser(LOGITS), atol=1e-6)
    np.testing.assert_allclose(mean.detach().numpy(), CB.mean(LOGITS), atol=1e-6)
    (normaliser.sum() + mean.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    x = torch.rand(5, len(LOGITS))
    ours = likelihoods.log_likelihood(x, logits.detach().expand(5, -1), CB)
    theirs = CB.log_prob(x.numpy(), np.broadcast_to(LOGITS, (5, len(LOGITS))))
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-5)


def test_draws_follow_the_distribution() -> None:
    rng = np.random.default_rng(0)
    logits = np.repeat(LOGITS[None], 100_000, axis=0)
    draws = CB.sample(logits, rng)
    assert draws.dtype == np.float32 and draws.min() >= 0 and draws.max() <= 1
    error = 4 * draws.std(axis=0) / np.sqrt(len(draws))
    assert np.all(np.abs(draws.mean(axis=0) - CB.mean(LOGITS)) < error + 1e-4)


def logistic_params(part: DiscretizedLogistic, values: int, seed: int = 0) -> np.ndarray:
    """[1, 3K·D] parameters: mixture logits, means across [−1.2, 1.2] (past the edges too) and
    log scales from a tenth of a bin to the whole range."""
    rng = np.random.default_rng(seed)
    k = part.components
    weights = rng.normal(0, 2, (k, values))
    means = rng.uniform(-1.2, 1.2, (k, values))
    log_scales = rng.uniform(-8.0, 0.5, (k, values))
    return np.concatenate([weights, means, log_scales]).reshape(1, -1).astype(np.float32)


@pytest.mark.parametrize("components", [1, 5])
def test_the_discretized_logistic_is_a_distribution_over_the_256_levels(components) -> None:
    part = DiscretizedLogistic(components)
    params = logistic_params(part, 40)
    levels = (np.arange(256, dtype=np.float32) / 255)[:, None]  # each level, every one of the 40 values
    # Value d alone: its 3K parameters, against each of the 256 levels.
    alone = params.reshape(3 * components, 40).T
    per_value = np.stack(
        [part.log_prob(levels, np.repeat(alone[[d]], 256, axis=0)) for d in range(40)], axis=1
    )
    mass = np.exp(per_value.astype(np.float64)).sum(axis=0)
    np.testing.assert_allclose(mass, 1.0, atol=2e-3)
    expected_mean = (np.exp(per_value) * levels).sum(axis=0)
    np.testing.assert_allclose(part.mean(params)[0], expected_mean, atol=2e-3)
    draws = part.sample(np.repeat(params, 20_000, axis=0), np.random.default_rng(1))
    assert draws.dtype == np.float32 and draws.min() >= 0 and draws.max() <= 1
    np.testing.assert_array_equal(np.round(draws * 255), draws * 255)  # on the levels
    np.testing.assert_allclose(draws.mean(axis=0), expected_mean, atol=0.01)


def test_the_discretized_logistics_numpy_and_torch_forms_agree_and_train() -> None:
    part = DiscretizedLogistic(3)
    x = np.random.default_rng(3).integers(0, 256, (4, 30)).astype(np.float32) / 255
    x[0, :3] = [0.0, 1.0, 0.5]  # both edge bins
    assert_forms_agree_and_train(part, np.repeat(logistic_params(part, 30, seed=2), 4, axis=0), x)


def assert_forms_agree_and_train(part: DiscretizedLogistic, params: np.ndarray, x: np.ndarray) -> None:
    """The torch form (training, the decoder graph) equals the numpy one (Score, the evaluator)
    in log p and E[x|z] at ``params`` and ``x``, and its gradients are finite and not all zero."""
    weights = torch.tensor(params, requires_grad=True)
    ours = likelihoods.log_likelihood(torch.from_numpy(x), weights, part)
    np.testing.assert_allclose(ours.detach().numpy(), part.log_prob(x, params), rtol=1e-5)
    np.testing.assert_allclose(
        likelihoods.likelihood_mean(weights, part).detach().numpy(), part.mean(params), atol=1e-6
    )
    ours.sum().backward()
    assert torch.isfinite(weights.grad).all() and weights.grad.abs().sum() > 0


def coupled_params(part: DiscretizedLogistic, pixels: int, seed: int = 0) -> np.ndarray:
    """[1, 4K·D] parameters of a coupled mixture over ``pixels`` pixels of C channels: as
    `logistic_params`, and coupling coefficients before their tanh, strong ones included."""
    rng = np.random.default_rng(seed)
    k, values = part.components, part.channels * pixels
    weights = rng.normal(0, 2, (k, values))
    means = rng.uniform(-1.2, 1.2, (k, values))
    log_scales = rng.uniform(-6.0, 0.0, (k, values))
    coefficients = rng.normal(0, 1.5, (k, values))
    return np.concatenate([weights, means, log_scales, coefficients]).reshape(1, -1).astype(np.float32)


def test_the_coupled_mixture_is_a_distribution_over_a_pixels_256_by_256_levels() -> None:
    """PixelCNN++'s coupling on two channels: over all 65,536 values of one pixel the masses sum
    to 1, they equal the definition written out (one mixture per pixel, the second channel's
    logistic centred at μ₁ + tanh(a)·x₀), the means are those masses' first channel's exactly and
    close to its second's, and the draws follow the masses."""
    part = DiscretizedLogistic(3, channels=2)
    params = coupled_params(part, pixels=1)
    levels = np.arange(256, dtype=np.float32) / 255
    first, second = np.meshgrid(levels, levels, indexing="ij")
    x = np.stack([first.ravel(), second.ravel()], axis=1)  # [65,536, 2]: channel 0, channel 1
    log_p = part.log_prob(x, np.repeat(params, len(x), axis=0)).astype(np.float64)
    mass = np.exp(log_p)
    assert mass.sum() == pytest.approx(1.0, abs=2e-3)

    flat = params.reshape(4, 3, 2)  # [parameter, component, channel]
    weights = np.exp(flat[0, :, 0]) / np.exp(flat[0, :, 0]).sum()  # the first channel's logits
    alone = DiscretizedLogistic(1)

    def channel(x_c: np.ndarray, mean, log_scale) -> np.ndarray:
        """A single logistic's bin masses at the values x_c (its own definition, K = 1)."""
        columns = [np.zeros_like(x_c), np.broadcast_to(mean, x_c.shape), np.full_like(x_c, log_scale)]
        return np.exp(alone.log_prob(x_c[:, None], np.stack(columns, axis=1).astype(np.float32)))

    expected = sum(
        weights[k]
        * channel(x[:, 0], flat[1, k, 0], flat[2, k, 0])
        * channel(x[:, 1], flat[1, k, 1] + np.tanh(flat[3, k, 0]) * (2 * x[:, 0] - 1), flat[2, k, 1])
        for k in range(3)
    )
    np.testing.assert_allclose(mass, expected, rtol=2e-3, atol=1e-9)

    exact = (mass[:, None] * x).sum(axis=0)
    mean = part.mean(params)[0]
    assert mean[0] == pytest.approx(exact[0], abs=2e-3)
    assert mean[1] == pytest.approx(exact[1], abs=0.05)  # the later channel's mean-field value
    draws = part.sample(np.repeat(params, 50_000, axis=0), np.random.default_rng(1))
    np.testing.assert_array_equal(np.round(draws * 255), draws * 255)
    np.testing.assert_allclose(draws.mean(axis=0), exact, atol=0.01)
    covariance = (mass * (x[:, 0] - exact[0]) * (x[:, 1] - exact[1])).sum()
    drawn = np.mean((draws[:, 0] - exact[0]) * (draws[:, 1] - exact[1]))
    assert drawn == pytest.approx(covariance, abs=0.01)


def test_coupling_ties_a_pixels_colours_and_both_forms_agree() -> None:
    """Three channels, strong positive coefficients and narrow logistics: a draw's green and blue
    follow its red; the torch form equals numpy's (log p, E[x|z]) on a 4 × 4 RGB image, and
    trains; coupling grey images or other likelihoods is refused in words."""
    from vaeserve.errors import ConfigError
    from vaeserve.likelihoods import likelihood

    part = DiscretizedLogistic(2, channels=3)
    pixels = 16
    params = coupled_params(part, pixels, seed=4).reshape(4, 2, 3, pixels)
    params[1] = 0.0  # green's and blue's own means mid-range...
    params[1, :, 0] = np.linspace(-0.8, 0.8, pixels)  # ...red's across the range
    params[2] = -5.0  # scales of e^-5, about a level
    params[3] = 0.0
    params[3, :, 0] = params[3, :, 1] = 4.0  # pairs (1, 0) and (2, 0): tanh(4) ≈ 1, following red
    draws = part.sample(np.repeat(params.reshape(1, -1), 200, axis=0), np.random.default_rng(2))
    red, green, blue = draws.reshape(200, 3, pixels).transpose(1, 0, 2)
    assert red.std(axis=1).mean() > 0.2  # red varies from pixel to pixel...
    followed = 0.5 + np.tanh(4.0) * (red - 0.5)  # ...and green and blue are centred on it
    assert np.median(np.abs(green - followed)) < 0.01 and np.median(np.abs(blue - followed)) < 0.01
    uncoupled = part.sample(
        np.repeat(np.concatenate([params[:3], 0 * params[3:]]).reshape(1, -1), 200, 0),
        np.random.default_rng(2),
    )
    assert np.median(np.abs(uncoupled.reshape(200, 3, pixels)[:, 1] - 0.5)) < 0.01  # without, mid-range

    x = np.random.default_rng(6).integers(0, 256, (3, 3 * pixels)).astype(np.float32) / 255
    x[0, :2] = [0.0, 1.0]
    assert_forms_agree_and_train(part, coupled_params(part, pixels, seed=5).repeat(3, axis=0), x)
    assert part.options() == {"components": 2, "channels": 3} and part.params_per_value == 8
    with pytest.raises(ConfigError, match="2 or 3 channels"):
        likelihood("discretized-logistic", 2, channels=4)
    with pytest.raises(ConfigError, match="not bernoulli"):
        likelihood("bernoulli", channels=3)


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
