"""p(x|z) in torch, for training and the exported decoder: the numpy forms in vaeserve/elbo.py,
written with torch ops so they train (gradients stay finite near l = 0) and export to ONNX."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from vaeserve.elbo import CB_TAYLOR_BELOW


def log_bernoulli(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)


def log_cb_normaliser(logits: torch.Tensor) -> torch.Tensor:
    """log C(λ) per pixel, C = l / tanh(l/2); the series near 0 (see vaeserve.elbo)."""
    a = logits.abs()
    near = a < CB_TAYLOR_BELOW
    safe = torch.where(near, torch.ones_like(a), a)  # keeps the unused branch's gradient finite
    exact = torch.log(safe / torch.tanh(safe / 2.0))
    series = math.log(2.0) + a**2 / 12.0 - a**4 / 360.0
    return torch.where(near, series, exact)


def log_likelihood(x: torch.Tensor, logits: torch.Tensor, likelihood: str) -> torch.Tensor:
    log_p = log_bernoulli(x, logits)
    if likelihood == "continuous-bernoulli":
        log_p = log_p + log_cb_normaliser(logits).sum(-1)
    return log_p


def likelihood_mean(logits: torch.Tensor, likelihood: str) -> torch.Tensor:
    """E[x|z]: sigmoid(l), or the continuous Bernoulli's 1/2 + 1/(2·tanh(l/2)) − 1/l."""
    if likelihood == "bernoulli":
        return torch.sigmoid(logits)
    near = logits.abs() < CB_TAYLOR_BELOW
    safe = torch.where(near, torch.ones_like(logits), logits)
    exact = 0.5 + 0.5 / torch.tanh(safe / 2.0) - 1.0 / safe
    series = 0.5 + logits / 12.0 - logits**3 / 720.0
    return torch.where(near, series, exact)
