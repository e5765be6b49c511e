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
from vaeserve.training.priors import LOG_2PI, VampPrior

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
        prior_components: int = 0,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.latent_size = latent_size
        self.likelihood = likelihood
        self.encoder = mlp([input_size, *hidden_sizes, 2 * latent_size], activation)
        self.decoder = mlp([latent_size, *reversed(hidden_sizes), input_size], activation)
        # None: p(z) = N(0, I), the seed's; else a VampPrior of that many pseudo-inputs.
        self.prior = VampPrior(prior_components, input_size) if prior_components else None

    @classmethod
    def from_config(cls, config: TrainConfig, input_size: int) -> VAE:
        components = config.prior_components if config.prior == "vamp" else 0
        model = cls(
            input_size,
            config.hidden_sizes,
            config.latent_size,
            config.activation,
            config.likelihood,
            components,
        )
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

    def log_prior_ratio(self, z: torch.Tensor, eps: torch.Tensor, stddev: torch.Tensor) -> torch.Tensor:
        """log p(z) − log q(z|x) at z = mean + stddev·ε, per row."""
        if self.prior is None:  # the 2π terms cancel and (z − mean)/stddev is ε
            return (-0.5 * z**2 + 0.5 * eps**2 + torch.log(stddev)).sum(-1)
        log_q = (-0.5 * eps**2 - torch.log(stddev)).sum(-1) - 0.5 * self.latent_size * LOG_2PI
        return self.prior.log_prob(z, self.encode) - log_q

    @staticmethod
    def reparameterize(mean: torch.Tensor, stddev: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return mean + stddev * eps


def _seed_init(module: nn.Module) -> None:
    # The TF1 program's initialiser: W ~ N(0, 1) · 2/√fan_in, b = 0.
    if isinstance(module, nn.Linear):
        with torch.no_grad():
            module.weight.normal_(0.0, 2.0 / math.sqrt(module.in_features))
            module.bias.zero_()
