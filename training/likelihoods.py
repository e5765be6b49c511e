"""p(x|z) in torch, for training and the exported decoder: each registered likelihood of
vaeserve.likelihoods (whose numpy forms Score and the evaluator use) written with torch ops, so
that they train (gradients stay finite near l = 0) and export to ONNX. Export checks that the two
forms agree (export.checks)."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from vaeserve.likelihoods import (
    BIN_MASS_FLOOR,
    CB_TAYLOR_BELOW,
    LOG_SCALE_FLOOR,
    PIXEL_LEVELS,
    Bernoulli,
    ContinuousBernoulli,
    DiscretizedLogistic,
    Likelihood,
    coupled_mean,
)


def log_bernoulli(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)


def log_cb_normaliser(logits: torch.Tensor) -> torch.Tensor:
    """log C(λ) per pixel, C = l / tanh(l/2); the series near 0 (see vaeserve.likelihoods)."""
    a = logits.abs()
    near = a < CB_TAYLOR_BELOW
    safe = torch.where(near, torch.ones_like(a), a)  # keeps the unused branch's gradient finite
    exact = torch.log(safe / torch.tanh(safe / 2.0))
    series = math.log(2.0) + a**2 / 12.0 - a**4 / 360.0
    return torch.where(near, series, exact)


def cb_mean(logits: torch.Tensor) -> torch.Tensor:
    near = logits.abs() < CB_TAYLOR_BELOW
    safe = torch.where(near, torch.ones_like(logits), logits)
    exact = 0.5 + 0.5 / torch.tanh(safe / 2.0) - 1.0 / safe
    series = 0.5 + logits / 12.0 - logits**3 / 720.0
    return torch.where(near, series, exact)


def _split(part: DiscretizedLogistic, params: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """As ``DiscretizedLogistic.split``: logits, means, log scales (and coupled, coefficients)."""
    k, parts = part.components, 4 if part.channels else 3
    shaped = params.reshape(*params.shape[:-1], parts, k, params.shape[-1] // (parts * k))
    if part.channels:
        shaped = shaped.reshape(*shaped.shape[:-1], part.channels, -1)
        log_scales = shaped[..., 2, :, :, :].clamp(min=LOG_SCALE_FLOOR)
        return (
            shaped[..., 0, :, 0, :],
            shaped[..., 1, :, :, :],
            log_scales,
            torch.tanh(shaped[..., 3, :, :, :]),
        )
    return shaped[..., 0, :, :], shaped[..., 1, :, :], shaped[..., 2, :, :].clamp(min=LOG_SCALE_FLOOR)


def _log_bin(edge: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    centred = edge - means
    inverse = torch.exp(-log_scales)
    plus, minus = inverse * (centred + 1.0 / PIXEL_LEVELS), inverse * (centred - 1.0 / PIXEL_LEVELS)
    log_cdf_plus = plus - F.softplus(plus)
    log_survival_minus = -F.softplus(minus)
    mass = torch.sigmoid(plus) - torch.sigmoid(minus)
    middle = inverse * centred
    log_density = middle - log_scales - 2.0 * F.softplus(middle) + math.log(2 / PIXEL_LEVELS)
    inner = torch.where(mass > BIN_MASS_FLOOR, torch.log(mass.clamp(min=BIN_MASS_FLOOR)), log_density)
    top = 1.0 - 1e-3
    return torch.where(edge < -top, log_cdf_plus, torch.where(edge > top, log_survival_minus, inner))


def _clipped_mean(means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    scales = torch.exp(log_scales)
    return scales * (F.softplus((1.0 + means) / scales) - F.softplus((means - 1.0) / scales)) - 1.0


def log_discretized_logistic(
    part: DiscretizedLogistic, x: torch.Tensor, params: torch.Tensor
) -> torch.Tensor:
    edge = (2.0 * x - 1.0).unsqueeze(-2)
    if not part.channels:
        weights, means, log_scales = _split(part, params)
        log_bin = _log_bin(edge, means, log_scales)
        return torch.logsumexp(log_bin + torch.log_softmax(weights, dim=-2), dim=-2).sum(-1)
    weights, means, log_scales, coefficients = _split(part, params)
    pixels = edge.reshape(*edge.shape[:-1], part.channels, -1)
    values = [pixels[..., c, :] for c in range(part.channels)]
    shifted = torch.stack(
        [coupled_mean(means[..., c, :], c, coefficients, values) for c in range(part.channels)], dim=-2
    )
    log_bins = _log_bin(pixels, shifted, log_scales).sum(-2)
    return torch.logsumexp(log_bins + torch.log_softmax(weights, dim=-2), dim=-2).sum(-1)


def log_likelihood(x: torch.Tensor, params: torch.Tensor, part: Likelihood) -> torch.Tensor:
    """log p(x|z) per row; x broadcasts against the parameters' leading dimensions."""
    if isinstance(part, DiscretizedLogistic):
        return log_discretized_logistic(part, x, params)
    x = x.expand(*params.shape[:-1], x.shape[-1])
    log_p = log_bernoulli(x, params)
    if isinstance(part, ContinuousBernoulli):
        log_p = log_p + log_cb_normaliser(params).sum(-1)
    return log_p


def likelihood_mean(params: torch.Tensor, part: Likelihood) -> torch.Tensor:
    """E[x|z] per value (the decoder graph's ``probs``)."""
    if isinstance(part, Bernoulli):
        return torch.sigmoid(params)
    if isinstance(part, ContinuousBernoulli):
        return cb_mean(params)
    if not part.channels:
        weights, means, log_scales = _split(part, params)
        return ((torch.softmax(weights, dim=-2) * _clipped_mean(means, log_scales)).sum(-2) + 1.0) * 0.5
    weights, means, log_scales, coefficients = _split(part, params)
    component_means: list[torch.Tensor] = []
    for c in range(part.channels):
        shifted = coupled_mean(means[..., c, :], c, coefficients, component_means)
        component_means.append(_clipped_mean(shifted, log_scales[..., c, :]))
    per_channel = torch.stack(component_means, dim=-2)
    mixed = (torch.softmax(weights, dim=-2).unsqueeze(-2) * per_channel).sum(-3)
    return (mixed.reshape(*mixed.shape[:-2], -1) + 1.0) * 0.5
