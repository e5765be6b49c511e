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
    k = part.components
    shaped = params.reshape(*params.shape[:-1], 3, k, params.shape[-1] // (3 * k))
    return shaped[..., 0, :, :], shaped[..., 1, :, :], shaped[..., 2, :, :].clamp(min=LOG_SCALE_FLOOR)


def log_discretized_logistic(
    part: DiscretizedLogistic, x: torch.Tensor, params: torch.Tensor
) -> torch.Tensor:
    weights, means, log_scales = _split(part, params)
    edge = (2.0 * x - 1.0).unsqueeze(-2)
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
    log_bin = torch.where(edge < -top, log_cdf_plus, torch.where(edge > top, log_survival_minus, inner))
    return torch.logsumexp(log_bin + torch.log_softmax(weights, dim=-2), dim=-2).sum(-1)


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
    weights, means, log_scales = _split(part, params)
    scales = torch.exp(log_scales)
    clipped = scales * (F.softplus((1.0 + means) / scales) - F.softplus((means - 1.0) / scales)) - 1.0
    return ((torch.softmax(weights, dim=-2) * clipped).sum(-2) + 1.0) * 0.5
