"""A PyTorch VAE as the numpy callables and prior the shared evaluator and pictures take."""

from __future__ import annotations

import numpy as np
import torch

from vaeserve.evaluation import Decode, Encode
from vaeserve.prior import STANDARD, Prior
from vaeserve.training.model import VAE


def numpy_callables(model: VAE) -> tuple[Encode, Decode]:
    model = model.eval()

    @torch.no_grad()
    def encode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, stddev = model.encode(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return mean.numpy(), stddev.numpy()

    @torch.no_grad()
    def decode(z: np.ndarray) -> np.ndarray:
        return model.decode(torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))).numpy()

    return encode, decode


@torch.no_grad()
def numpy_prior(model: VAE) -> Prior:
    """The model's p(z): N(0, I), or its VampPrior as the Gaussian mixture it is (the encoder's
    posteriors at the pseudo-inputs), what export writes into the version."""
    if model.prior is None:
        return STANDARD
    means, stddevs = model.eval().prior.mixture(model.encode)
    return Prior(means.numpy().astype(np.float32), stddevs.numpy().astype(np.float32))
