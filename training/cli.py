"""`vae train` and `vae evaluate --run`. Imports torch only inside the commands, so the
CLI still starts where only the service's dependencies are installed."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vaeserve.errors import ConfigError, require
from vaeserve.evaluate_cli import print_evaluation, score_identity
from vaeserve.flags import add_data_flags, add_dataclass_flags, values
from vaeserve.training.config import PRESETS, TrainConfig, resolve_config


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and training (override the preset and --config)")
    add_dataclass_flags(group, TrainConfig, show_default_of=PRESETS["seed"])


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="fit the VAE on a dataset",
        description="Fit the VAE, checkpointing every epoch into --out.",
    )
    train.add_argument(
        "--preset",
        default="seed",
        choices=sorted(PRESETS),
        help="starting configuration (default: seed, the TF1 program's)",
    )
    train.add_argument("--config", type=Path, help="JSON file of config keys applied over the preset")
    train.add_argument(
        "--out", type=Path, required=True, help="run directory for checkpoints, metrics and plots"
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last complete epoch (only --epochs may change)",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_data_flags(train)
    _add_config_flags(train)
    train.set_defaults(handler=train_command, interrupted=train_interrupted)


def train_interrupted(args: argparse.Namespace) -> str:
    """What an interrupted `vae train` leaves: its completed epochs, or nothing."""
    from vaeserve.training.checkpoint import LAST

    if (args.out / LAST).is_file():
        return f"the completed epochs are kept in {args.out}: vae train --resume --out {args.out} continues"
    return "no epoch had completed, so nothing was kept"


def train_command(args: argparse.Namespace) -> int:
    require("vae train", "train", "torch")
    from vaeserve.datasets import load_run_data
    from vaeserve.training.objectives import objective_name
    from vaeserve.training.trainer import resumed_config, saved_state, start_or_resume

    overrides = values(args, TrainConfig)
    recorded = None
    if args.resume:  # a resumed run reads its data where it read it before, as export does
        state = saved_state(args.out)
        config = resumed_config(state["config"], overrides)
        recorded = state["dataset"].get("source")
    else:
        config = resolve_config(args.preset, args.config, overrides)
    dataset = load_run_data(
        config.to_dict(), recorded, args.data_dir, args.cache_dir, progress=not args.no_progress
    )
    trainer = start_or_resume(
        config, dataset, args.out, args.resume, progress=not args.no_progress, preset=args.preset
    )
    done_before = len(trainer.history)
    started = time.perf_counter()
    history = trainer.run()[done_before:]
    trained = objective_name(trainer.config.objective, trainer.config.train_samples)
    plots = _training_pictures(trainer, dataset, args.out, trained)
    _print_summary(history, time.perf_counter() - started, args.out, plots, trained)
    return 0


def _training_pictures(trainer, dataset, run_dir: Path, objective: str) -> list[Path]:
    from vaeserve import pictures
    from vaeserve.training import checkpoint
    from vaeserve.training.evaluate import write_pictures

    plots = run_dir / "plots"
    curves = pictures.learning_curves(
        trainer.history, trainer.costs, trainer.config.batch_size, plots / "learning_curves.png", objective
    )
    best = checkpoint.load(run_dir)
    return [curves, *write_pictures(best, dataset, "test", plots)]


def _print_summary(
    history: list[dict], seconds: float, run_dir: Path, plots: list[Path], objective: str = "ELBO"
) -> None:
    if not history:
        print(
            f"nothing to train: the run in {run_dir} already has its epochs "
            "(--resume --epochs N trains it to epoch N)"
        )
        return
    last = history[-1]
    validation = last["validation_elbo"]
    rate = sum(r["rows_per_s"] for r in history) / len(history)
    print(
        f"trained {len(history)} epochs (to epoch {last['epoch']}) in {seconds:.1f} s ({rate:,.0f} rows/s): "
        f"train {objective} {last['train_elbo']:.2f}"
        + (f", validation ELBO {validation:.2f}" if validation is not None else "")
        + f"; checkpoints and plots in {run_dir}"
    )


def register_evaluate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="test ELBO, importance-sampled NLL and active units",
        description="Evaluate a training run's best checkpoint (--run) or an exported model "
        "(--model) on a split: ELBO with its reconstruction and KL parts, "
        "NLL_k by importance sampling, active units.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="run directory or checkpoint file")
    source.add_argument("--model", type=Path, help="exported model version folder (models/NAME/VERSION)")
    parser.add_argument("--dataset", help="dataset to evaluate on (default: the one it was trained on)")
    parser.add_argument(
        "--split",
        default="test",
        choices=("test", "validation", "train"),
        help="split to evaluate (default: test)",
    )
    parser.add_argument(
        "--iw-samples",
        type=int,
        default=5000,
        metavar="K",
        help="importance samples per image for NLL_k (default 5000, as in Burda et al.)",
    )
    parser.add_argument("--limit", type=int, metavar="N", help="evaluate the first N rows only")
    parser.add_argument(
        "--offset",
        type=int,
        default=0,
        metavar="N",
        help="start at row N (with --limit: rows N to N+limit-1, scored as in the whole evaluation, "
        "so slices run apart add up to it)",
    )
    parser.add_argument("--variant", default="fp32", help="with --model: fp32 (default), int8 or fp16")
    parser.add_argument(
        "--scores",
        type=Path,
        metavar="DIR",
        help="keep each row's scores in DIR as they are computed (a file per 100 rows); rerun with "
        "the same arguments to resume after the last complete file",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--no-pictures", action="store_true", help="skip the PNGs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_data_flags(parser)
    parser.set_defaults(handler=evaluate_command)


def evaluate_command(args: argparse.Namespace) -> int:
    if args.iw_samples < 1 or (args.limit is not None and args.limit < 1):
        raise ConfigError("--iw-samples and --limit must be at least 1")
    if args.offset < 0:
        raise ConfigError(f"--offset {args.offset}: expected a row number, 0 or more")
    if args.model is not None:
        from vaeserve.evaluate_cli import evaluate_model_command  # numpy and onnxruntime only

        return evaluate_model_command(args)
    require("vae evaluate --run", "train", "torch")
    from vaeserve.datasets import load_run_data
    from vaeserve.training import checkpoint
    from vaeserve.training.evaluate import evaluate_checkpoint, write_evaluation, write_pictures

    source = checkpoint.resolve(args.run)
    state = checkpoint.load(source)
    dataset = load_run_data(
        state["config"],
        state["dataset"].get("source"),
        args.data_dir,
        args.cache_dir,
        progress=not args.no_progress,
        dataset=args.dataset,
    )
    scores = None
    if args.scores is not None:
        from vaeserve.evaluation import ScoreFolder

        identity = {"run": str(source.resolve()), "epoch": state["epoch"]}
        scores = ScoreFolder(args.scores, score_identity(args, dataset.name, identity))
    result = evaluate_checkpoint(
        state, dataset, args.split, args.iw_samples, not args.no_progress, args.limit, args.offset, scores
    )
    run_dir = source.parent
    whole = not args.limit and not args.offset
    written = write_evaluation(run_dir, args.split, result, source) if whole else None
    if not args.no_pictures:
        write_pictures(state, dataset, args.split, run_dir / "plots")
    saved = f"saved {written}" if written else "not saved (a partial evaluation: --limit, --offset)"
    print_evaluation(result.to_dict(), args.split, args.json, saved, args.offset)
    return 0
