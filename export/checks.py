"""Checks an export must pass before its version becomes visible (issue 3, §4)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import torch

from vaeserve.errors import ExportError, first_line
from vaeserve.prior import Prior
from vaeserve.runtime import OnnxPair
from vaeserve.training.likelihoods import likelihood_mean, log_likelihood
from vaeserve.training.model import VAE
from vaeserve.training.priors import log_mixture

PARITY_BATCH_SIZES = (1, 7, 1000)
PARITY_TOLERANCE = 1e-5  # absolute, on means, stddevs and probabilities
# ... or this many times PyTorch's own float32 rounding (its difference from the same model in
# float64), where that is larger: a model whose unused latent units sit at means in the hundreds
# (a VampPrior on continuous pixels) is ~1e-4 from float64 in PyTorch itself, and so is a correct
# graph; a wrong graph is off by the values' own size.
ROUNDING_MARGIN = 10.0
# On log p(z) of a learned prior: numpy's float64 mixture against PyTorch's, in float64 too, on the
# same components; a wrong mixture is off by nats.
PRIOR_LOG_TOLERANCE = 1e-2
PRIOR_PARITY_SAMPLES = 1000
# On log p(x|z) per row: the numpy form (Score, the evaluator) against the torch form (training),
# both in float64 on the same parameters, relative to the row's |log p|; a wrong form is off by
# whole nats.
LIKELIHOOD_TOLERANCE = 1e-6


def check_graph(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises ValidationError, InferenceError and others
        raise ExportError(f"onnx.checker rejects {path.name}: {first_line(exc)}") from None


def float64_copy(model: VAE) -> VAE:
    """The same model computing in float64: the reference PyTorch's float32 rounding is measured
    against."""
    return copy.deepcopy(model).double().eval()


def outputs(model: VAE, x: np.ndarray, z: np.ndarray) -> dict[str, np.ndarray]:
    """The encoder's and decoder's outputs in the model's own precision."""
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        mean, stddev = model.encode(torch.from_numpy(x).to(dtype))
        logits = model.decode(torch.from_numpy(z).to(dtype))
        probs = likelihood_mean(logits, model.likelihood)
    return {"mean": mean.numpy(), "stddev": stddev.numpy(), "logits": logits.numpy(), "probs": probs.numpy()}


def max_differences(
    model: VAE, pair: OnnxPair, images: np.ndarray, seed: int = 0
) -> tuple[dict[str, float], dict[str, float]]:
    """Largest absolute difference ONNX vs PyTorch over the parity batch sizes, on real images
    (encoder) and on random z ~ N(0, I) (decoder); and PyTorch's own float32 rounding on the same
    rows (its largest difference from the model in float64)."""
    rng = np.random.default_rng(seed)
    exact = float64_copy(model)
    worst = {"mean": 0.0, "stddev": 0.0, "logits": 0.0, "probs": 0.0}
    rounding = dict(worst)
    for batch in sorted({min(size, len(images)) for size in PARITY_BATCH_SIZES}):  # small test sets too
        x = images[rng.choice(len(images), size=batch, replace=False)]
        z = rng.standard_normal((batch, model.latent_size), dtype=np.float32)
        expected, reference = outputs(model, x, z), outputs(exact, x, z)
        actual = dict(zip(("mean", "stddev"), pair.encode(x))) | dict(
            zip(("logits", "probs"), pair.decode(z))
        )
        for name in worst:
            if expected[name].shape != actual[name].shape:
                raise ExportError(
                    f"ONNX {name} has shape {actual[name].shape} at batch {batch}, "
                    f"PyTorch {expected[name].shape}"
                )
            worst[name] = max(worst[name], float(np.max(np.abs(expected[name] - actual[name]))))
            rounding[name] = max(rounding[name], float(np.max(np.abs(expected[name] - reference[name]))))
    return worst, rounding


def tolerance(rounding: float) -> float:
    return max(PARITY_TOLERANCE, ROUNDING_MARGIN * rounding)


def check_parity(differences: dict[str, float], rounding: dict[str, float]) -> None:
    failing = [
        f"{name} differs by {value:.2e} (tolerance {tolerance(rounding[name]):.1e}; PyTorch's own "
        f"float32 rounding {rounding[name]:.1e})"
        for name, value in differences.items()
        if name != "logits" and not value <= tolerance(rounding[name])
    ]
    if failing:
        raise ExportError(f"ONNX outputs do not match PyTorch: {', '.join(failing)}")


def likelihood_difference(model: VAE, pair: OnnxPair, images: np.ndarray, seed: int = 0) -> float:
    """The likelihood's two forms on the exported decoder's parameters for real rows: the largest
    difference of numpy's log p(x|z) from torch's, relative to its size; ExportError when they
    disagree (a numpy form that Score uses, wrong, would pass every graph parity check)."""
    rng = np.random.default_rng(seed)
    x = images[rng.choice(len(images), size=min(64, len(images)), replace=False)].astype(np.float64)
    params = pair.decode(pair.encode(x)[0])[0].astype(np.float64)
    ours = model.likelihood.log_prob(x, params)
    with torch.no_grad():
        theirs = log_likelihood(torch.from_numpy(x), torch.from_numpy(params), model.likelihood).numpy()
    difference = float(np.max(np.abs(ours - theirs) / np.maximum(1.0, np.abs(theirs))))
    if not difference <= LIKELIHOOD_TOLERANCE:
        raise ExportError(
            f"the {model.likelihood.name} likelihood's numpy form (Score, the evaluator) differs from "
            f"its torch form (training) by {difference:.2e} of log p(x|z) "
            f"(tolerance {LIKELIHOOD_TOLERANCE:.0e})"
        )
    return difference


def prior_differences(model: VAE, prior: Prior, pair: OnnxPair, seed: int = 0) -> dict[str, float]:
    """A learned prior's exported mixture against the ONNX encoder at the pseudo-inputs (its
    components), with PyTorch's float32 rounding there; and its log p(z) at draws from it against
    PyTorch's mixture density of the same components, both in float64."""
    pseudo_inputs = model.prior.pseudo_inputs.detach().numpy()
    onnx_mean, onnx_stddev = pair.encode(pseudo_inputs)
    with torch.no_grad():
        exact_mean, exact_stddev = (
            t.numpy() for t in float64_copy(model).encode(torch.from_numpy(pseudo_inputs).double())
        )
    z = prior.sample(PRIOR_PARITY_SAMPLES, model.latent_size, np.random.default_rng(seed))
    means, stddevs = (torch.from_numpy(a.astype(np.float64)) for a in (prior.means, prior.stddevs))
    expected = log_mixture(torch.from_numpy(z.astype(np.float64)), means, stddevs).numpy()
    return {
        "components": prior.components,
        "mean": float(np.max(np.abs(prior.means - onnx_mean))),
        "stddev": float(np.max(np.abs(prior.stddevs - onnx_stddev))),
        "mean_rounding": float(np.max(np.abs(prior.means - exact_mean))),
        "stddev_rounding": float(np.max(np.abs(prior.stddevs - exact_stddev))),
        "log_prob": float(np.max(np.abs(prior.log_prob(z) - expected))),
    }


def check_prior_parity(differences: dict[str, float]) -> None:
    limits = {
        "mean": tolerance(differences["mean_rounding"]),
        "stddev": tolerance(differences["stddev_rounding"]),
        "log_prob": PRIOR_LOG_TOLERANCE,
    }
    failing = [
        f"{name} differs by {differences[name]:.2e} (tolerance {limit:.1e})"
        for name, limit in limits.items()
        if not differences[name] <= limit
    ]
    if failing:
        raise ExportError(f"the exported prior does not match PyTorch's: {', '.join(failing)}")
