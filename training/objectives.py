"""Training objectives: per-row bounds on log p(x) to maximise.

Each takes the model, a batch x, a generator for ε and the KL weight β (for
warm-up, Bowman et al. 2016), and returns one value per row. Add an objective by
writing a function of that shape and naming it in ``OBJECTIVES``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vaeserve.training.likelihoods import log_likelihood
from vaeserve.training.model import VAE

Objective = Callable[[VAE, torch.Tensor, torch.Generator, float, int], torch.Tensor]


def gaussian_kl(mean: torch.Tensor, stddev: torch.Tensor) -> torch.Tensor:
    """Analytic KL(q(z|x) ‖ N(0, I)) (Kingma & Welling 2014, appendix B)."""
    return (-torch.log(stddev) + 0.5 * (stddev**2 + mean**2) - 0.5).sum(-1)


def elbo(
    model: VAE, x: torch.Tensor, generator: torch.Generator, kl_weight: float = 1.0, samples: int = 1
) -> torch.Tensor:
    """E_q[log p(x|z)] − β·KL, with one reparameterised sample (Kingma & Welling, eq. 10); the
    KL analytic under N(0, I), else estimated at the same sample (no closed form for a mixture)."""
    mean, stddev = model.encode(x)
    eps = torch.randn(mean.shape, generator=generator)
    z = model.reparameterize(mean, stddev, eps)
    logits = model.decode(z)
    kl = gaussian_kl(mean, stddev) if model.prior is None else -model.log_prior_ratio(z, eps, stddev)
    return log_likelihood(x, logits, model.likelihood) - kl_weight * kl


def iwae(
    model: VAE, x: torch.Tensor, generator: torch.Generator, kl_weight: float = 1.0, samples: int = 5
) -> torch.Tensor:
    """log (1/k) Σ_i p(x|z_i)·(p(z_i)/q(z_i|x))^β (Burda et al. 2016, eq. 8; β = 1 is the bound)."""
    mean, stddev = model.encode(x)
    eps = torch.randn((samples, *mean.shape), generator=generator)
    z = model.reparameterize(mean, stddev, eps)
    logits = model.decode(z)
    log_px_z = log_likelihood(x, logits, model.likelihood)
    log_w = log_px_z + kl_weight * model.log_prior_ratio(z, eps, stddev)
    return torch.logsumexp(log_w, dim=0) - torch.log(torch.tensor(float(samples)))


OBJECTIVES: dict[str, Objective] = {"elbo": elbo, "iwae": iwae}


def objective_name(objective: str, samples: int) -> str:
    """What a run's per-epoch train figure (history's ``train_elbo``) is: the ELBO, or the IWAE
    bound of k samples, which lies above the ELBO of the same model."""
    return "ELBO" if objective == "elbo" else f"IWAE bound (k = {samples})"
