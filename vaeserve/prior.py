"""p(z) of a model, in numpy: what SamplePrior draws from and what the evaluator's and Score's
bounds weigh by.

The standard normal N(0, I) (Kingma & Welling 2014; every export before learned priors), or a
uniform mixture of K diagonal Gaussians: a VampPrior (Tomczak & Welling 2018) is exactly that,
its components the encoder's posteriors at the learned pseudo-inputs, computed once at export
and stored in the version as ``prior.npz``.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vaeserve.elbo import LOG_2PI
from vaeserve.errors import RepositoryError

PRIOR_FILE = "prior.npz"
STANDARD_NORMAL = "standard-normal"
GAUSSIAN_MIXTURE = "gaussian-mixture"


@dataclass(frozen=True, eq=False)
class Prior:
    """None for the standard normal; else the mixture's components, means and stddevs [K, M]."""

    means: np.ndarray | None = None
    stddevs: np.ndarray | None = None

    @property
    def kind(self) -> str:
        return STANDARD_NORMAL if self.means is None else GAUSSIAN_MIXTURE

    @property
    def components(self) -> int:
        return 0 if self.means is None else len(self.means)

    def sample(self, count: int, latent_size: int, rng: np.random.Generator) -> np.ndarray:
        """z [count, M] float32: the standard normal's draws are those every version has always
        given for a seed; a mixture's are a component per row, then that Gaussian."""
        if self.means is None:
            return rng.standard_normal((count, latent_size), dtype=np.float32)
        chosen = rng.integers(len(self.means), size=count)
        eps = rng.standard_normal((count, latent_size), dtype=np.float32)
        return (self.means[chosen] + self.stddevs[chosen] * eps).astype(np.float32)

    def log_prob(self, z: np.ndarray) -> np.ndarray:
        """log p(z) per row of z [..., M]. A mixture's per-component terms Σ_d −z²/2σ² + zμ/σ² + c
        are one float64 matmul, [N, 2M] x [2M, K] (the broadcast form is 16x slower, and float32
        would lose tenths of a nat where precisions reach the hundreds); the exponentials, each
        at most 1 after the shift, are float32."""
        if self.means is None:
            return np.sum(-0.5 * z.astype(np.float64) ** 2 - 0.5 * LOG_2PI, axis=-1)
        flat = z.reshape(-1, z.shape[-1]).astype(np.float64)
        weights, constant = self._linear_form
        per_component = np.concatenate([flat * flat, flat], axis=1) @ weights
        per_component += constant
        top = per_component.max(axis=1, keepdims=True)
        per_component -= top
        shifted = np.exp(per_component.astype(np.float32))
        log_p = top[:, 0] + np.log(shifted.sum(axis=1, dtype=np.float64)) - np.log(len(self.means))
        return log_p.reshape(z.shape[:-1])

    @functools.cached_property
    def _linear_form(self) -> tuple[np.ndarray, np.ndarray]:
        """[2M, K] weights of (z², z) and the [K] constants of log N(z; μ_k, σ_k²)."""
        means, stddevs = self.means.astype(np.float64), self.stddevs.astype(np.float64)
        precision = stddevs**-2
        weights = np.concatenate([-0.5 * precision.T, (means * precision).T])
        constant = (
            np.sum(-0.5 * means**2 * precision - np.log(stddevs), axis=-1) - 0.5 * means.shape[1] * LOG_2PI
        )
        return weights, constant

    def log_ratio(self, z: np.ndarray, eps: np.ndarray, stddev: np.ndarray) -> np.ndarray:
        """log p(z) − log q(z|x) at z = mean + stddev·ε, for z and ε [B, k, M], stddev [B, M]."""
        if self.means is None:  # the 2π terms cancel and (z − mean)/stddev is ε itself
            return np.sum(-0.5 * z**2 + 0.5 * eps**2 + np.log(stddev)[:, None, :], axis=-1)
        log_q = np.sum(
            -0.5 * eps.astype(np.float64) ** 2 - np.log(stddev.astype(np.float64))[:, None, :], axis=-1
        )
        return self.log_prob(z) - (log_q - 0.5 * z.shape[-1] * LOG_2PI)

    # -- the version's file -------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, means=self.means.astype(np.float32), stddevs=self.stddevs.astype(np.float32))
        return buffer.getvalue()

    @classmethod
    def read(cls, path: Path) -> Prior:
        """A mixture from its file, checked: RepositoryError saying what is wrong."""
        try:
            with np.load(path, allow_pickle=False) as data:
                means, stddevs = data["means"], data["stddevs"]
        except (OSError, KeyError, ValueError) as exc:
            raise RepositoryError(f"{path}: not a readable prior ({type(exc).__name__}: {exc})") from None
        if means.ndim != 2 or means.shape != stddevs.shape or not len(means):
            raise RepositoryError(
                f"{path}: prior means {means.shape} and stddevs {stddevs.shape}; expected [K, M] each"
            )
        if not (np.isfinite(means).all() and np.isfinite(stddevs).all() and (stddevs > 0).all()):
            raise RepositoryError(f"{path}: prior holds non-finite means or stddevs that are not positive")
        return cls(means.astype(np.float32), stddevs.astype(np.float32))


STANDARD = Prior()
