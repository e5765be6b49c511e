"""`vae evaluate --model`: an exported version on a split, with numpy and onnxruntime only;
and the one-line (or JSON) report every `vae evaluate` prints."""

from __future__ import annotations

import argparse
import json


def evaluate_model_command(args: argparse.Namespace) -> int:
    from vaeserve.datasets import evaluation_slice, load_run_data
    from vaeserve.evaluation import ScoreFolder, evaluate
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
    x = evaluation_slice(images, version.manifest.binarization, 0, args.offset, args.limit)
    scores = None
    if args.scores is not None:
        graphs = {f"{role}_sha256": record.sha256 for role, record in version.manifest.graphs.items()}
        model = {"model": version.name, "version": version.version, "variant": args.variant, **graphs}
        scores = ScoreFolder(args.scores, score_identity(args, dataset.name, model))
    result = evaluate(
        pair.encode,
        pair.decode_logits,
        x,
        args.iw_samples,
        seed=0,
        progress=not args.no_progress,
        likelihood=version.likelihood,
        prior=version.load_prior(),
        first_row=args.offset,
        scores=scores,
    )
    print_evaluation(result.to_dict(), args.split, args.json, first_row=args.offset)
    return 0


def score_identity(args: argparse.Namespace, dataset: str, model: dict) -> dict:
    """What a --scores folder's rows are scores of: the model, the rows and how they are scored."""
    rows = {"dataset": dataset, "split": args.split, "first_row": args.offset, "limit": args.limit}
    return {**model, **rows, "iw_samples": args.iw_samples}


def print_evaluation(result: dict, split: str, as_json: bool, saved: str = "", first_row: int = 0) -> None:
    """``saved``: where the result went, said after it; ``first_row``: the split's row the
    evaluated rows start at."""
    if as_json:
        print(json.dumps({"split": split, "first_row": first_row, **result}, indent=2))
        return
    print(
        f"{split}: ELBO {result['elbo']:.2f} ± {result['elbo_stderr']:.2f} nats "
        f"(reconstruction {result['reconstruction']:.2f}, KL {result['kl']:.2f}); "
        f"NLL_{result['iw_samples']} {result['nll']:.2f} ± {result['nll_stderr']:.2f}; "
        f"active units {result['active_units']}/{result['latent_size']}; "
        f"{result['rows']} images"
        + (f" from row {first_row}" if first_row else "")
        + f" in {result['seconds']:.1f} s"
        + (
            f" ({result['rows_read_back']} rows' scores read back from --scores)"
            if result.get("rows_read_back")
            else ""
        )
        + (f"; {saved}" if saved else "")
    )
