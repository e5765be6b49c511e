"""p(z) in torch: the standard normal of Kingma & Welling (2014), or the VampPrior
(Tomczak & Welling 2018), a uniform mixture of the encoder's posteriors at K learned
pseudo-inputs, trained with the rest of the model. Export writes a learned prior out as the
diagonal Gaussian mixture it is (vaeserve.prior reads it)."""

from __future__ import annotations

import math

import torch
from torch import nn

from vaeserve.elbo import LOG_2PI


def log_mixture(z: torch.Tensor, means: torch.Tensor, stddevs: torch.Tensor) -> torch.Tensor:
    """log (1/K) Σ_k N(z; means_k, diag(stddevs_k²)) for z [..., M], components [K, M].

    Written as two matmuls, Σ_d −z²/2σ² + zμ/σ² plus a per-component constant: the
    broadcast form [..., K, M] costs sixteen times as much at K = 500."""
    precision = stddevs.pow(-2)
    constant = (-0.5 * means.pow(2) * precision - torch.log(stddevs)).sum(-1) - 0.5 * means.shape[1] * LOG_2PI
    per_component = -0.5 * z.pow(2) @ precision.T + z @ (means * precision).T + constant
    return torch.logsumexp(per_component, dim=-1) - math.log(means.shape[0])


class VampPrior(nn.Module):
    """K pseudo-inputs u_k; p(z) = (1/K) Σ_k q(z|u_k). The encoder passed to each call is the
    model's own, so the prior moves with it."""

    def __init__(self, components: int, input_size: int) -> None:
        super().__init__()
        self.pseudo_inputs = nn.Parameter(torch.zeros(components, input_size))

    def initialise_from(self, rows: torch.Tensor, generator: torch.Generator) -> None:
        """Start the pseudo-inputs at K distinct training rows (intensities)."""
        chosen = torch.randperm(len(rows), generator=generator)[: len(self.pseudo_inputs)]
        with torch.no_grad():
            self.pseudo_inputs.copy_(rows[chosen])

    def mixture(self, encode) -> tuple[torch.Tensor, torch.Tensor]:
        """The components' means and stddevs [K, M]."""
        return encode(self.pseudo_inputs)

    def log_prob(self, z: torch.Tensor, encode) -> torch.Tensor:
        return log_mixture(z, *self.mixture(encode))
