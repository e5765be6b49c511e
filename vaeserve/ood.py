"""Out-of-distribution scores from the model's likelihood.

A likelihood alone ranks simple inputs as likely whatever they show: models of Fashion-MNIST
give MNIST digits higher likelihood than their own test set (Nalisnick et al. 2019). The
input-complexity correction (Serrà et al. 2020) subtracts what a generic lossless compressor
needs for the input, here PNG: S(x) = −log₂ p(x) − L(x) bits. Higher scores mean less likely
to come from the training distribution.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np

from vaeserve.evaluation import Decode, Encode, score_rows
from vaeserve.layout import png_pixels
from vaeserve.likelihoods import Likelihood
from vaeserve.prior import STANDARD, Prior

# What a Score call (vae.v1, OIP NAME-score, `vae score`) gives per row, in this order.
SCORE_FIELDS = ("elbo", "log_px", "complexity_bits", "ood_score")
# PNG's strongest deflate setting; the container's fixed ~57 bytes shift every score alike.
PNG_LEVEL = 9


def complexity_bits(x: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    """L(x): bits of each row as a PNG of the model's input in 8 bits, floor(256·x) (the pixels
    themselves for dequantized inputs, 0/255 for binary ones), in the shape vaeserve.layout gives
    it (grey, RGB or RGBA; anything else as one line of pixels)."""
    from PIL import Image

    pixels = np.clip(np.floor(np.asarray(x, np.float32) * 256.0), 0, 255).astype(np.uint8)
    bits = np.empty(len(pixels))
    for i, picture in enumerate(png_pixels(pixels, image_shape)):
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(picture)).save(buffer, format="PNG", compress_level=PNG_LEVEL)
        bits[i] = 8.0 * buffer.tell()
    return bits


def ood_score(log_px: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """S(x) = −log₂ p(x) − L(x), with log p(x) in nats."""
    return -np.asarray(log_px) / math.log(2.0) - bits


def scores(
    encode: Encode,
    decode: Decode,
    x: np.ndarray,
    iw_samples: int,
    seed: int | None,
    likelihood: Likelihood,
    image_shape: tuple[int, ...],
    first_row: int = 0,
    prior: Prior = STANDARD,
    checkpoint: Callable[[], None] | None = None,
) -> dict[str, np.ndarray]:
    """The SCORE_FIELDS of model inputs ``x``, float32 [N] each: the evaluator's per-row ELBO
    and k-sample log p(x) under the model's prior (row i seeded by (seed, first_row + i)), L(x)
    and S(x). ``checkpoint``: as for `score_rows`."""
    rows = score_rows(encode, decode, x, iw_samples, seed, False, likelihood, first_row, prior, checkpoint)
    bits = complexity_bits(x, image_shape)
    values = (rows.elbo, rows.log_px, bits, ood_score(rows.log_px, bits))
    return {name: value.astype(np.float32) for name, value in zip(SCORE_FIELDS, values)}


# The test set's score percentiles, recorded at export: a likelihood ranks blank and constant
# inputs as very likely (an all-black digit scores far below every test image), so a useful
# check flags both tails of the test set's distribution, not only the high one.
REFERENCE_PERCENTILES = (0.1, 0.5, 1.0, 5.0, 50.0, 95.0, 99.0, 99.5, 99.9)
REFERENCE_IW_SAMPLES = 10


# The tails outside which a row is flagged, in percent of the test set at each end (the console,
# `vae score`'s ood_flag and docs/scoring.md apply the same).
FLAG_TAIL = 0.5


def flag_percentiles(score_reference: dict, iw_samples: int) -> dict[str, float] | None:
    """The test set's ood_score percentiles that scores made with k = ``iw_samples`` can be
    placed among: the manifest's reference when it was recorded at the same k, else None (a
    bound at another k sits elsewhere, and flagging against it would be wrong)."""
    if score_reference.get("iw_samples") != iw_samples:
        return None
    return score_reference.get("percentiles", {}).get("ood_score")


def log_px_meaning(iw_samples: int) -> str:
    """What a log_px made with k importance samples is, said the same way by every output."""
    if iw_samples == 1:
        return (
            "k = 1: log_px is a one-sample estimate of the ELBO, a lower bound on log p(x), "
            "not an estimate of it"
        )
    return (
        f"k = {iw_samples}: log_px is the importance-weighted bound (IWAE), a lower bound on "
        "log p(x) that tightens towards it as k grows; an estimate, biased low"
    )


def reference(values: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Each score's percentiles over a set of rows: {field: {"0.1": value, ..., "99.9": value}}."""
    return {
        field: {
            f"{p:g}": float(v)
            for p, v in zip(REFERENCE_PERCENTILES, np.percentile(row, REFERENCE_PERCENTILES))
        }
        for field, row in values.items()
    }


def outside(values: np.ndarray, percentiles: dict[str, float], tail: float = FLAG_TAIL) -> np.ndarray:
    """-1 where a score is below the reference's ``tail`` percentile (more typical than nearly
    every test row: blank or constant inputs), +1 above its 100 - ``tail`` one, else 0."""
    low, high = percentiles[f"{tail:g}"], percentiles[f"{100 - tail:g}"]
    values = np.asarray(values)
    return np.where(values < low, -1, np.where(values > high, 1, 0))


def auroc(inliers: np.ndarray, outliers: np.ndarray) -> float:
    """P(an outlier scores above an inlier), ties counted half (the Mann-Whitney U / n·m)."""
    ordered = np.sort(np.asarray(inliers, np.float64))
    outliers = np.asarray(outliers, np.float64)
    below = np.searchsorted(ordered, outliers, side="left")
    ties = np.searchsorted(ordered, outliers, side="right") - below
    return float(np.sum(below + 0.5 * ties) / (len(ordered) * len(outliers)))
