"""The VAE (Kingma & Welling, 2014): an encoder giving a mean and a softplus standard deviation
per latent dimension, and a decoder giving the parameters (logits) of p(x|z), built by the
registered architecture the config names (training.architectures)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from vaeserve.layout import ImageLayout
from vaeserve.likelihoods import BERNOULLI, COUPLED_CHANNELS, Likelihood, likelihood
from vaeserve.training.architectures import Networks, architecture
from vaeserve.training.config import TrainConfig
from vaeserve.training.priors import LOG_2PI, VampPrior

STDDEV_FLOOR = 1e-6  # the seed's: stddev = softplus(raw) + 1e-6 keeps log σ finite


class VAE(nn.Module):
    def __init__(
        self,
        networks: Networks,
        image_shape: tuple[int, ...],
        latent_size: int,
        likelihood: Likelihood = BERNOULLI,
        prior_components: int = 0,
    ) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        input_size = self.input_size = math.prod(image_shape)
        self.latent_size = latent_size
        self.likelihood = likelihood
        self.row_shape: tuple[int, ...] = (input_size,)  # as the graphs take a row; the architecture's
        self.encoder = networks.encoder
        self.decoder = networks.decoder
        # None: p(z) = N(0, I), the seed's; else a VampPrior of that many pseudo-inputs.
        self.prior = VampPrior(prior_components, input_size) if prior_components else None

    @classmethod
    def from_config(cls, config: TrainConfig, image_shape: tuple[int, ...]) -> VAE:
        """The VAE ``config`` describes, for rows that are images of ``image_shape``."""
        part = architecture(config.architecture)
        p_x = likelihood(config.likelihood, config.logistic_components, coupled_channels(config, image_shape))
        networks = part.build(config, tuple(image_shape), config.latent_size, p_x.params_per_value)
        components = config.prior_components if config.prior == "vamp" else 0
        model = cls(networks, image_shape, config.latent_size, p_x, components)
        model.row_shape = part.row_shape(tuple(image_shape))
        part.initialise(networks, config.init)
        _start_output_at(part.output_layer(networks), p_x.initial_params())
        return model

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of q(z|x), for rows [..., D]."""
        mean, raw = _widened(_rows(self.encoder, x)).chunk(2, dim=-1)
        return mean, F.softplus(raw) + STDDEV_FLOOR

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The parameters of p(x|z) (logits for the Bernoulli), [..., P·D] for latents [..., M]
        (IWAE's are [k, N, M])."""
        return _widened(_rows(self.decoder, z))

    def log_prior_ratio(self, z: torch.Tensor, eps: torch.Tensor, stddev: torch.Tensor) -> torch.Tensor:
        """log p(z) − log q(z|x) at z = mean + stddev·ε, per row."""
        if self.prior is None:  # the 2π terms cancel and (z − mean)/stddev is ε
            return (-0.5 * z**2 + 0.5 * eps**2 + torch.log(stddev)).sum(-1)
        log_q = (-0.5 * eps**2 - torch.log(stddev)).sum(-1) - 0.5 * self.latent_size * LOG_2PI
        return self.prior.log_prob(z, self.encode) - log_q

    @staticmethod
    def reparameterize(mean: torch.Tensor, stddev: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return mean + stddev * eps


def coupled_channels(config: TrainConfig, image_shape: tuple[int, ...]) -> int:
    """The channels the discretized logistic couples (PixelCNN++'s, defined for RGB): the images'
    when they have 2 or 3 and ``logistic_coupling`` is on, else 0 (grey images have nothing to
    couple)."""
    layout = ImageLayout.of(tuple(image_shape))
    wanted = config.logistic_coupling and config.likelihood == "discretized-logistic"
    if not wanted or layout is None or layout.channels not in COUPLED_CHANNELS:
        return 0
    return layout.channels


def _start_output_at(layer: nn.Module, initial: tuple[float, ...]) -> None:
    """The decoder's output bias at the likelihood's starting parameters: parameter p of every
    value (outputs p·D to (p + 1)·D, or channels p·C to (p + 1)·C) at initial[p]."""
    if not any(initial):
        return
    with torch.no_grad():
        layer.bias.view(len(initial), -1)[:] = torch.tensor(initial)[:, None]


def _widened(outputs: torch.Tensor) -> torch.Tensor:
    """A network's outputs as fp32 when autocast (--precision bf16) computed them in a 16-bit
    type, so that what follows (the posterior, the likelihood, the prior, the loss) is fp32; fp32
    and the export checks' float64 pass as they are."""
    return outputs.float() if outputs.dtype in (torch.bfloat16, torch.float16) else outputs


def _rows(network: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """An architecture's network takes rows [N, ·]; inputs with more leading dimensions go
    through as rows and come back shaped as they came (2-D inputs, the exported graphs', as is)."""
    if inputs.dim() == 2:
        return network(inputs)
    return network(inputs.reshape(-1, inputs.shape[-1])).reshape(*inputs.shape[:-1], -1)
