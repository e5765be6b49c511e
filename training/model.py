"""The VAE (Kingma & Welling, 2014): an MLP encoder giving a mean and a softplus
standard deviation per latent dimension, and an MLP decoder giving the logits of a Bernoulli
or continuous Bernoulli p(x|z)."""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn
from torch.nn import functional as F

from vaeserve.training.config import TrainConfig

STDDEV_FLOOR = 1e-6  # the seed's: stddev = softplus(raw) + 1e-6 keeps log σ finite
_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU}


def mlp(widths: list[int], activation: str) -> nn.Sequential:
    """Dense layers with ``activation`` between them and none after the last."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(widths) - 2:
            layers.append(_ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    def __init__(
        self,
        input_size: int,
        hidden_sizes: tuple[int, ...],
        latent_size: int,
        activation: str = "relu",
        likelihood: str = "bernoulli",
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.latent_size = latent_size
        self.likelihood = likelihood
        self.encoder = mlp([input_size, *hidden_sizes, 2 * latent_size], activation)
        self.decoder = mlp([latent_size, *reversed(hidden_sizes), input_size], activation)

    @classmethod
    def from_config(cls, config: TrainConfig, input_size: int) -> VAE:
        model = cls(input_size, config.hidden_sizes, config.latent_size, config.activation, config.likelihood)
        if config.init == "seed":
            model.apply(_seed_init)
        return model

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of q(z|x)."""
        mean, raw = self.encoder(x).chunk(2, dim=-1)
        return mean, F.softplus(raw) + STDDEV_FLOOR

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Logits of p(x|z)."""
        return self.decoder(z)

    @staticmethod
    def reparameterize(mean: torch.Tensor, stddev: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return mean + stddev * eps


def _seed_init(module: nn.Module) -> None:
    # The TF1 program's initialiser: W ~ N(0, 1) · 2/√fan_in, b = 0.
    if isinstance(module, nn.Linear):
        with torch.no_grad():
            module.weight.normal_(0.0, 2.0 / math.sqrt(module.in_features))
            module.bias.zero_()
