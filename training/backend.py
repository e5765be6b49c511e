"""A PyTorch VAE as the numpy callables the shared evaluator and pictures take."""

from __future__ import annotations

import numpy as np
import torch

from vaeserve.evaluation import Decode, Encode
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
