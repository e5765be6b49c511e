"""p(x|z): each likelihood one registered part, in numpy (torch's forms: training.likelihoods).

A decoder gives a likelihood's parameters for every value of a row: ``params`` [..., P·D], the
P parameters of value d at [..., p·D + d] (for a conv decoder, P·C channels of the image). Each
likelihood says how many it takes (``params_per_value``), and gives per row log p(x|z) (summed
over the row's D values), E[x|z] per value (the decoder graph's ``probs`` and the service's
images), and a draw x ~ p(x|z). Rows x are model inputs in [0, 1].

- ``bernoulli``: binary pixels; one logit per value (the seed's).
- ``continuous-bernoulli``: intensities in [0, 1] (Loaiza-Ganem & Cunningham 2019): the
  Bernoulli's term times a normaliser C(λ) per value.
- ``discretized-logistic``: 8-bit values (x = p/255), a mixture of K logistics per value
  integrated over its 1/255-wide bin, the edge bins taking the tails (Salimans et al. 2017,
  PixelCNN++): 3K parameters per value, the mixture's logits, means (on [−1, 1]) and log
  scales. With ``channels`` C = 2 or 3 (``--logistic-coupling``), PixelCNN++'s coupling of a
  pixel's channels: one mixture per pixel (the logits of its first channel; the others' go
  unused), and in each component channel c's mean shifted by tanh(coefficient)·value of each
  earlier channel j; 4K parameters per value, the fourth the coefficients, pair (c, j) of
  (1, 0), (2, 0), (2, 1) in channel 0's, 1's, 2's slot.

Each also says where the decoder's output starts (``initial_params``: the output layer's bias).
Adding one is a class here with those members, its torch form in training.likelihoods, a
line in each registry and its tests; export checks that the two forms agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vaeserve.elbo import softplus
from vaeserve.errors import ConfigError

# Below this |logit| the continuous Bernoulli's closed forms cancel catastrophically in float32;
# their Taylor series are exact to float32 there.
CB_TAYLOR_BELOW = 0.1
# 8-bit values: 256 bins of x = p/255; on the logistic's scale [−1, 1], bins 2/255 wide.
PIXEL_LEVELS = 255
# PixelCNN++'s floor on a component's log scale: narrower bins than a pixel's add nothing.
LOG_SCALE_FLOOR = -7.0
INITIAL_LOG_SCALE = -2.0
# A bin's probability below this is computed from the density at its centre (its CDF difference
# rounds to 0 in float32), as PixelCNN++ does.
BIN_MASS_FLOOR = 1e-5


def log_bernoulli(x: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """log p(x|z) = Σ_d x·l − softplus(l), stable for any logit. A row x [..., 1, D] against its
    k draws' logits [..., k, D] (the evaluator's) takes x·l as a batched matmul, ~10x faster."""
    if x.ndim == logits.ndim > 1 and x.shape[-2] == 1:
        dot = np.matmul(logits, np.swapaxes(x, -1, -2).astype(logits.dtype, copy=False))[..., 0]
    else:
        dot = np.sum(x * logits, axis=-1)
    return dot - softplus(logits).sum(axis=-1)


def log_cb_normaliser(logits: np.ndarray) -> np.ndarray:
    """log C(λ) per pixel for λ = sigmoid(l): C = 2·artanh(1−2λ)/(1−2λ) = l / tanh(l/2), even in
    l; near 0 its series log 2 + l²/12 − l⁴/360. Two transcendental calls per pixel: it runs
    over every decoded pixel of every importance sample."""
    a = np.abs(logits)
    near = a < CB_TAYLOR_BELOW
    safe = np.where(near, np.float32(1.0), a)
    exact = np.log(safe / np.tanh(safe * np.float32(0.5)))
    series = np.float32(np.log(2.0)) + a * a / np.float32(12.0) - a**4 / np.float32(360.0)
    return np.where(near, series, exact).astype(logits.dtype, copy=False)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * logits))  # no overflow for any logit


@dataclass(frozen=True)
class Bernoulli:
    name: str = "bernoulli"
    params_per_value: int = 1
    sample_dtype: str = "UINT8"  # draws are 0/1

    def initial_params(self) -> tuple[float, ...]:
        return (0.0,)

    def options(self) -> dict:
        """What besides its name rebuilds it (``likelihood(name, **options)``; the manifest's)."""
        return {}

    def log_prob(self, x: np.ndarray, params: np.ndarray) -> np.ndarray:
        return log_bernoulli(x, params)

    def mean(self, params: np.ndarray) -> np.ndarray:
        return sigmoid(params)

    def sample(self, params: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.draw(params, self.mean(params), rng)

    def draw(self, params: np.ndarray, mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """x ~ p(x|z) given the parameters and the mean a graph already computed: 0/1 against
        the mean itself (so a seeded draw matches the graph's probs exactly)."""
        return (rng.random(mean.shape, dtype=np.float32) < mean).astype(np.uint8)


@dataclass(frozen=True)
class ContinuousBernoulli:
    name: str = "continuous-bernoulli"
    params_per_value: int = 1
    sample_dtype: str = "FP32"

    def initial_params(self) -> tuple[float, ...]:
        return (0.0,)

    def options(self) -> dict:
        return {}

    def log_prob(self, x: np.ndarray, params: np.ndarray) -> np.ndarray:
        return log_bernoulli(x, params) + np.sum(log_cb_normaliser(params), axis=-1)

    def mean(self, params: np.ndarray) -> np.ndarray:
        """λ/(2λ−1) + 1/(2·artanh(1−2λ)) = 1/2 + 1/(2·tanh(l/2)) − 1/l (series 1/2 + l/12 − l³/720)."""
        near = np.abs(params) < CB_TAYLOR_BELOW
        safe = np.where(near, 1.0, params)
        exact = 0.5 + 0.5 / np.tanh(safe / 2.0) - 1.0 / safe
        series = 0.5 + params / 12.0 - params**3 / 720.0
        return np.where(near, series, exact).astype(params.dtype, copy=False)

    def sample(self, params: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """By the inverse CDF, x = log1p(u·(e^l − 1)) / l (u itself as l → 0)."""
        u = rng.random(params.shape)
        clipped = np.clip(params.astype(np.float64), -40.0, 40.0)  # e^40 keeps the product finite
        near = np.abs(clipped) < 1e-4
        safe = np.where(near, 1.0, clipped)
        return np.where(near, u, np.log1p(u * np.expm1(safe)) / safe).astype(np.float32)

    def draw(self, params: np.ndarray, mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.sample(params, rng)


# Channel c's mean in a coupled mixture is shifted by coefficient·value of channel j, for each
# pair (c, j) in order; pair i's coefficient is in channel i's slot of the fourth parameter.
COUPLED_PAIRS = ((1, 0), (2, 0), (2, 1))
COUPLED_CHANNELS = (2, 3)


@dataclass(frozen=True)
class DiscretizedLogistic:
    components: int = 1
    # 0: each value its own mixture; 2 or 3: PixelCNN++'s coupling of a pixel's channels (rows
    # are images flattened channels first, vaeserve.layout).
    channels: int = 0
    name: str = "discretized-logistic"
    sample_dtype: str = "FP32"  # draws are p/255

    @property
    def params_per_value(self) -> int:
        return (4 if self.channels else 3) * self.components

    def initial_params(self) -> tuple[float, ...]:
        """Where the decoder's output starts, per parameter: equal weights, means mid-range and
        scales of e^−2 (≈ 17 levels either side): at scale 1 (a zero output) every level is about
        equally likely and learning starts ~1.5 bits per value worse (measured on photographs);
        coupling coefficients at 0, the channels independent."""
        k = self.components
        coefficients = (0.0,) * k if self.channels else ()
        return (0.0,) * (2 * k) + (INITIAL_LOG_SCALE,) * k + coefficients

    def options(self) -> dict:
        return {"components": self.components, **({"channels": self.channels} if self.channels else {})}

    def split(self, params: np.ndarray) -> tuple[np.ndarray, ...]:
        """[..., 3K·D] → mixture logits, means, log scales, each [..., K, D]; coupled, [..., 4K·D]
        → logits [..., K, HW] (each pixel's), and means, log scales and tanh'd coefficients
        [..., K, C, HW]."""
        k, parts = self.components, 4 if self.channels else 3
        shaped = params.reshape(*params.shape[:-1], parts, k, params.shape[-1] // (parts * k))
        if self.channels:
            shaped = shaped.reshape(*shaped.shape[:-1], self.channels, -1)
            log_scales = np.maximum(shaped[..., 2, :, :, :], np.float32(LOG_SCALE_FLOOR))
            return (
                shaped[..., 0, :, 0, :],
                shaped[..., 1, :, :, :],
                log_scales,
                np.tanh(shaped[..., 3, :, :, :]),
            )
        log_scales = np.maximum(shaped[..., 2, :, :], np.float32(LOG_SCALE_FLOOR))
        return shaped[..., 0, :, :], shaped[..., 1, :, :], log_scales

    def log_prob(self, x: np.ndarray, params: np.ndarray) -> np.ndarray:
        scaled = (2.0 * x[..., None, :] - 1.0).astype(params.dtype, copy=False)  # values in [−1, 1]
        if not self.channels:
            weights, means, log_scales = self.split(params)
            log_mix = _log_bin(scaled, means, log_scales) + _log_softmax(weights, axis=-2)
            return np.sum(_logsumexp(log_mix, axis=-2), axis=-1)
        weights, means, log_scales, coefficients = self.split(params)
        pixels = scaled.reshape(*scaled.shape[:-1], self.channels, -1)  # [..., 1, C, HW]
        values = [pixels[..., c, :] for c in range(self.channels)]
        shifted = np.stack(
            [coupled_mean(means[..., c, :], c, coefficients, values) for c in range(self.channels)], -2
        )
        log_bins = np.sum(_log_bin(pixels, shifted, log_scales), axis=-2)  # a component's pixel
        return np.sum(_logsumexp(log_bins + _log_softmax(weights, axis=-2), axis=-2), axis=-1)

    def mean(self, params: np.ndarray) -> np.ndarray:
        """Σ_k π_k E[clip(X_k, −1, 1)], on [0, 1]: the edge bins take the tails, so each
        component's mean is its logistic's clipped to the range, −1 + s·(softplus((1 + μ)/s) −
        softplus((μ − 1)/s)) (the rounding to levels moves it by far less than a level).
        Coupled, a component's later channels are taken at its earlier channels' means (exact
        without the clipping, which makes the exact mean an integral over the earlier values)."""
        if not self.channels:
            weights, means, log_scales = self.split(params)
            mixed = np.sum(_softmax(weights, axis=-2) * _clipped_mean(means, log_scales), axis=-2)
            return ((mixed + 1.0) * 0.5).astype(params.dtype, copy=False)
        weights, means, log_scales, coefficients = self.split(params)
        component_means: list[np.ndarray] = []
        for c in range(self.channels):
            shifted = coupled_mean(means[..., c, :], c, coefficients, component_means)
            component_means.append(_clipped_mean(shifted, log_scales[..., c, :]))
        per_channel = np.stack(component_means, axis=-2)  # [..., K, C, HW]
        mixed = np.sum(_softmax(weights, axis=-2)[..., None, :] * per_channel, axis=-3)
        return ((mixed.reshape(*mixed.shape[:-2], -1) + 1.0) * 0.5).astype(params.dtype, copy=False)

    def sample(self, params: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if not self.channels:
            weights, means, log_scales = self.split(params)
            # A component per value (Gumbel-max), then a logistic draw μ + s·log(u/(1−u)), on its bin.
            chosen = _gumbel_choice(weights, rng)[..., None, :]
            mean = np.take_along_axis(means, chosen, axis=-2)[..., 0, :]
            scale = np.exp(np.take_along_axis(log_scales, chosen, axis=-2)[..., 0, :])
            return _on_a_level(mean, scale, rng)
        weights, means, log_scales, coefficients = self.split(params)
        # A component per pixel, then the pixel's channels in order, each mean shifted by the
        # levels already drawn (on [−1, 1]).
        chosen = _gumbel_choice(weights, rng)[..., None, None, :]
        mean, log_scale, coefficient = (
            np.take_along_axis(a, chosen, axis=-3)[..., 0, :, :] for a in (means, log_scales, coefficients)
        )
        drawn: list[np.ndarray] = []  # on [0, 1]
        values: list[np.ndarray] = []  # the same levels on [−1, 1]
        for c in range(self.channels):
            shifted = coupled_mean(mean[..., c, :], c, coefficient, values)
            drawn.append(_on_a_level(shifted, np.exp(log_scale[..., c, :]), rng))
            values.append(2.0 * drawn[-1] - 1.0)
        levels = np.stack(drawn, axis=-2)
        return levels.reshape(*levels.shape[:-2], -1)

    def draw(self, params: np.ndarray, mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.sample(params, rng)


def coupled_mean(mean: np.ndarray, channel: int, coefficients: np.ndarray, earlier: list) -> np.ndarray:
    """Channel ``channel``'s mean shifted by coefficient · value of each earlier channel j
    (``earlier[j]``, on [−1, 1]); numpy and torch arrays alike."""
    for slot, (later, j) in enumerate(COUPLED_PAIRS):
        if later == channel:
            mean = mean + coefficients[..., slot, :] * earlier[j]
    return mean


def _log_bin(scaled: np.ndarray, means: np.ndarray, log_scales: np.ndarray) -> np.ndarray:
    """log P(the value's 8-bit bin) under each logistic: the CDF's difference across the bin, the
    edge bins taking the tails, the density at the centre where the difference underflows."""
    centred = scaled - means
    inverse = np.exp(-log_scales)
    half = np.float32(1.0 / PIXEL_LEVELS)
    plus, minus = inverse * (centred + half), inverse * (centred - half)
    log_cdf_plus = plus - softplus(plus)  # log σ(plus): the lowest bin's mass
    log_survival_minus = -softplus(minus)  # log (1 − σ(minus)): the highest bin's
    mass = sigmoid(plus) - sigmoid(minus)
    middle = inverse * centred
    log_density = middle - log_scales - 2.0 * softplus(middle) + np.float32(math.log(2 / PIXEL_LEVELS))
    inner = np.where(mass > BIN_MASS_FLOOR, np.log(np.maximum(mass, BIN_MASS_FLOOR)), log_density)
    top = np.float32(1.0 - 1e-3)
    return np.where(scaled < -top, log_cdf_plus, np.where(scaled > top, log_survival_minus, inner))


def _clipped_mean(means: np.ndarray, log_scales: np.ndarray) -> np.ndarray:
    """E[clip(X, −1, 1)] of a logistic of mean μ and scale s, on [−1, 1]."""
    scales = np.exp(log_scales)
    return scales * (softplus((1.0 + means) / scales) - softplus((means - 1.0) / scales)) - 1.0


def _gumbel_choice(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A component index per value from logits [..., K, V] (Gumbel-max): [..., V]."""
    gumbel = -np.log(-np.log(rng.uniform(1e-5, 1.0 - 1e-5, weights.shape)))
    return np.argmax(weights + gumbel, axis=-2)


def _on_a_level(mean: np.ndarray, scale: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A logistic draw μ + s·log(u/(1−u)) on [−1, 1], clipped there and given as its 8-bit
    level p/255 on [0, 1]."""
    u = rng.uniform(1e-5, 1.0 - 1e-5, mean.shape)
    value = np.clip(mean + scale * (np.log(u) - np.log1p(-u)), -1.0, 1.0)
    return (np.round((value + 1.0) * 0.5 * PIXEL_LEVELS) / PIXEL_LEVELS).astype(np.float32)


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    top = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(top, axis) + np.log(np.sum(np.exp(a - top), axis=axis))


def _log_softmax(a: np.ndarray, axis: int) -> np.ndarray:
    return a - np.expand_dims(_logsumexp(a, axis), axis)


def _softmax(a: np.ndarray, axis: int) -> np.ndarray:
    return np.exp(_log_softmax(a, axis))


Likelihood = Bernoulli | ContinuousBernoulli | DiscretizedLogistic
NAMES = ("bernoulli", "continuous-bernoulli", "discretized-logistic")
# The mixture's components when a manifest or config does not say (a single logistic).
DEFAULT_COMPONENTS = 1


BERNOULLI = Bernoulli()


def likelihood(name: str, components: int = DEFAULT_COMPONENTS, channels: int = 0) -> Likelihood:
    """The registered likelihood ``name``; ``components`` is the discretized logistic's K and
    ``channels`` the C of its coupling (0: none)."""
    if channels and name != "discretized-logistic":
        raise ConfigError(f"--logistic-coupling is for --likelihood discretized-logistic, not {name}")
    if name == "bernoulli":
        return BERNOULLI
    if name == "continuous-bernoulli":
        return ContinuousBernoulli()
    if name == "discretized-logistic":
        if components < 1:
            raise ConfigError(f"--logistic-components {components}: expected at least 1")
        if channels and channels not in COUPLED_CHANNELS:
            raise ConfigError(
                f"--logistic-coupling couples a pixel's 2 or 3 channels (PixelCNN++'s, for RGB); "
                f"these images have {channels}"
            )
        return DiscretizedLogistic(components, channels)
    raise ConfigError(f"likelihood {name!r}: expected one of {', '.join(NAMES)}")
