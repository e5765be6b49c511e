"""An exported version served and called with every vae.v1 RPC, its Score over a whole test set
compared with the evaluator: what "everything downstream stays exact" means for a model.

    python -m benchmarks.served_scores --repo models --name vamp --data-dir ../shared/data/mnist \\
        --evaluation runs/vamp/evaluation-test.json

starts `vae serve` over the repository (one worker, no torch), then:
- Encode, Reconstruct, Decode and SamplePrior on a few rows, each against the same call in process
  (the ONNX pair and the version's prior);
- Score on every test row as the evaluator sees it (dynamic binarization: the fixed seed-0 draw),
  k = --iw-samples, seed 0: row for row against `vaeserve.evaluation.score_rows` in process, and
  its mean ELBO against the evaluator's (`vae evaluate`'s JSON, any k: the ELBO's expectation does
  not depend on k), in units of the evaluator's standard error.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.compare import server
from vaeserve.client import VaeClient
from vaeserve.datasets import evaluation_inputs, load_dataset
from vaeserve.evaluation import score_rows
from vaeserve.repository import open_path
from vaeserve.runtime import OnnxPair

FEW = 16  # rows for the cheap RPCs
EVALUATION_FIELDS = ("elbo", "elbo_stderr", "nll", "nll_stderr", "iw_samples")


def cheap_calls(client: VaeClient, pair: OnnxPair, prior, x: np.ndarray, latent_size: int) -> dict:
    """Largest difference of each cheap RPC from the same computation in process."""
    mean, stddev = pair.encode(x[:FEW])
    encoded = client.encode(x[:FEW])
    rebuilt = client.reconstruct(x[:FEW], use_mean=True)
    decoded = client.decode(mean)
    sampled = client.sample_prior(FEW, seed=7)
    _, probs = pair.decode(mean)
    expected_latents = prior.sample(FEW, latent_size, np.random.default_rng(7))
    return {
        "encode_mean": largest_difference(encoded["mean"], mean),
        "encode_stddev": largest_difference(encoded["stddev"], stddev),
        "reconstruct_probs": largest_difference(rebuilt["probs"], probs),
        "decode_probs": largest_difference(decoded["probs"], probs),
        "sample_prior_latents": largest_difference(sampled["latents"], expected_latents),
    }


def largest_difference(served: np.ndarray, local: np.ndarray) -> float:
    """A reply as the wire carries it (images [N, C, H, W] for an image model) against the flat
    channels-first rows the ONNX pair works in: the same values in the same order."""
    return float(np.abs(np.reshape(served, local.shape) - local).max())


def serve_and_call(repo: Path, name: str, pair: OnnxPair, prior, x: np.ndarray, k: int) -> tuple:
    """(cheap RPCs' differences, Score's columns, Score's seconds) from a `vae serve` of REPO."""
    with (
        tempfile.TemporaryDirectory() as logs,
        server(repo, None, Path(logs) / "serve.log") as (target, _),
        VaeClient(target, model=name, timeout=3600) as client,
    ):
        cheap = cheap_calls(client, pair, prior, x, pair.latent_size)
        started = time.perf_counter()
        served = client.score(x, iw_samples=k, seed=0)
        return cheap, served, time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--name", required=True, help="model name in the repository (its default version)")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--iw-samples", type=int, default=100, help="k of Score (default 100)")
    parser.add_argument("--rows", type=int, default=10_000, help="test rows (default all)")
    parser.add_argument("--evaluation", type=Path, help="vae evaluate's evaluation-test.json to compare with")
    args = parser.parse_args(argv)

    version = open_path(args.repo / args.name)
    pair, prior = OnnxPair.load(version), version.load_prior()
    images = load_dataset(version.manifest.dataset, args.data_dir, progress=False).test_images[: args.rows]
    x = evaluation_inputs(images, version.manifest.binarization, seed=0)
    cheap, served, served_s = serve_and_call(args.repo, args.name, pair, prior, x, args.iw_samples)
    local = score_rows(
        pair.encode, pair.decode_logits, x, args.iw_samples, 0, likelihood=version.likelihood, prior=prior
    )
    elbo, stderr = float(served["elbo"].mean()), float(served["elbo"].std() / np.sqrt(len(x)))
    report = {
        "model": str(version.path),
        "prior": prior.kind,
        "prior_components": prior.components,
        "rows": len(x),
        "iw_samples": args.iw_samples,
        "score_seconds": round(served_s, 1),
        "cheap_rpcs_max_abs_difference": cheap,
        "score_vs_in_process_max_abs": {
            "elbo": float(np.abs(served["elbo"] - local.elbo).max()),
            "log_px": float(np.abs(served["log_px"] - local.log_px).max()),
        },
        "served_elbo": elbo,
        "served_elbo_stderr": stderr,
        "served_nll_k": float(-served["log_px"].mean()),
    }
    if args.evaluation:
        evaluated = json.loads(args.evaluation.read_text())
        report["evaluator"] = {k: evaluated[k] for k in EVALUATION_FIELDS}
        report["elbo_difference_in_stderr"] = (elbo - evaluated["elbo"]) / evaluated["elbo_stderr"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
