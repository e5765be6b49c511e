"""`vae evaluate --model`: an exported version on a split, with numpy and onnxruntime only;
and the one-line (or JSON) report every `vae evaluate` prints."""

from __future__ import annotations

import argparse
import json


def evaluate_model_command(args: argparse.Namespace) -> int:
    from vaeserve.datasets import evaluation_inputs, load_run_data
    from vaeserve.evaluation import evaluate
    from vaeserve.repository import open_path
    from vaeserve.runtime import OnnxPair

    version = open_path(args.model)
    pair = OnnxPair.load(version, variant=args.variant)
    training = version.manifest.training
    dataset = load_run_data(
        training["config"],
        training.get("data_source"),
        args.data_dir,
        args.cache_dir,
        progress=not args.no_progress,
        dataset=args.dataset,
    )
    images, _ = dataset.split(args.split)
    if args.limit:
        images = images[: args.limit]
    x = evaluation_inputs(images, version.manifest.binarization, seed=0)
    result = evaluate(
        pair.encode,
        pair.decode_logits,
        x,
        args.iw_samples,
        seed=0,
        progress=not args.no_progress,
        likelihood=version.likelihood,
        prior=version.load_prior(),
    )
    print_evaluation(result.to_dict(), args.split, args.json)
    return 0


def print_evaluation(result: dict, split: str, as_json: bool, saved: str = "") -> None:
    """``saved``: where the result went, said after it."""
    if as_json:
        print(json.dumps({"split": split, **result}, indent=2))
        return
    print(
        f"{split}: ELBO {result['elbo']:.2f} ± {result['elbo_stderr']:.2f} nats "
        f"(reconstruction {result['reconstruction']:.2f}, KL {result['kl']:.2f}); "
        f"NLL_{result['iw_samples']} {result['nll']:.2f} ± {result['nll_stderr']:.2f}; "
        f"active units {result['active_units']}/{result['latent_size']}; "
        f"{result['rows']} images in {result['seconds']:.1f} s" + (f"; {saved}" if saved else "")
    )
