"""Checks an export must pass before its version becomes visible (issue 3, §4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from vaeserve.errors import ExportError, first_line
from vaeserve.prior import Prior
from vaeserve.runtime import OnnxPair
from vaeserve.training.likelihoods import likelihood_mean
from vaeserve.training.model import VAE

PARITY_BATCH_SIZES = (1, 7, 1000)
PARITY_TOLERANCE = 1e-5  # absolute, on means, stddevs and probabilities
# On log p(z) of a learned prior: PyTorch computes it in float32, the exported mixture in float64,
# and at precisions in the hundreds float32 loses ~1e-4 of a nat; a wrong mixture is off by nats.
PRIOR_LOG_TOLERANCE = 1e-2
PRIOR_PARITY_SAMPLES = 1000


def check_graph(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises ValidationError, InferenceError and others
        raise ExportError(f"onnx.checker rejects {path.name}: {first_line(exc)}") from None


def max_differences(model: VAE, pair: OnnxPair, images: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Largest absolute difference ONNX vs PyTorch over the parity batch sizes,
    on real images (encoder) and on random z ~ N(0, I) (decoder)."""
    rng = np.random.default_rng(seed)
    worst = {"mean": 0.0, "stddev": 0.0, "logits": 0.0, "probs": 0.0}
    for batch in sorted({min(size, len(images)) for size in PARITY_BATCH_SIZES}):  # small test sets too
        x = images[rng.choice(len(images), size=batch, replace=False)]
        z = rng.standard_normal((batch, model.latent_size), dtype=np.float32)
        with torch.no_grad():
            mean, stddev = (t.numpy() for t in model.encode(torch.from_numpy(x)))
            logits = model.decode(torch.from_numpy(z))
            probs = likelihood_mean(logits, model.likelihood).numpy()
        onnx_mean, onnx_stddev = pair.encode(x)
        onnx_logits, onnx_probs = pair.decode(z)
        pairs = {
            "mean": (mean, onnx_mean),
            "stddev": (stddev, onnx_stddev),
            "logits": (logits.numpy(), onnx_logits),
            "probs": (probs, onnx_probs),
        }
        for name, (expected, actual) in pairs.items():
            if expected.shape != actual.shape:
                raise ExportError(
                    f"ONNX {name} has shape {actual.shape} at batch {batch}, PyTorch {expected.shape}"
                )
            worst[name] = max(worst[name], float(np.max(np.abs(expected - actual))))
    return worst


def check_parity(differences: dict[str, float]) -> None:
    failing = {k: v for k, v in differences.items() if k != "logits" and v > PARITY_TOLERANCE}
    if failing:
        detail = ", ".join(f"{k} differs by {v:.2e}" for k, v in failing.items())
        raise ExportError(f"ONNX outputs do not match PyTorch within {PARITY_TOLERANCE}: {detail}")


def prior_differences(model: VAE, prior: Prior, pair: OnnxPair, seed: int = 0) -> dict[str, float]:
    """A learned prior's exported mixture against the ONNX encoder at the pseudo-inputs (its
    components), and its log p(z) against PyTorch's at draws from it."""
    pseudo_inputs = model.prior.pseudo_inputs.detach().numpy()
    onnx_mean, onnx_stddev = pair.encode(pseudo_inputs)
    z = prior.sample(PRIOR_PARITY_SAMPLES, model.latent_size, np.random.default_rng(seed))
    with torch.no_grad():
        expected = model.prior.log_prob(torch.from_numpy(z), model.encode).numpy().astype(np.float64)
    return {
        "components": prior.components,
        "mean": float(np.max(np.abs(prior.means - onnx_mean))),
        "stddev": float(np.max(np.abs(prior.stddevs - onnx_stddev))),
        "log_prob": float(np.max(np.abs(prior.log_prob(z) - expected))),
    }


def check_prior_parity(differences: dict[str, float]) -> None:
    failing = [
        f"{name} differs by {differences[name]:.2e} (tolerance {tolerance})"
        for name, tolerance in (
            ("mean", PARITY_TOLERANCE),
            ("stddev", PARITY_TOLERANCE),
            ("log_prob", PRIOR_LOG_TOLERANCE),
        )
        if not differences[name] <= tolerance
    ]
    if failing:
        raise ExportError(f"the exported prior does not match PyTorch's: {', '.join(failing)}")
