"""`vae evaluate --run`: the shared evaluator applied to a checkpoint, plus its pictures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vaeserve import pictures
from vaeserve.atomic import atomic_write_text
from vaeserve.datasets import Dataset, evaluation_inputs, evaluation_slice
from vaeserve.evaluation import Evaluation, ScoreFolder, evaluate
from vaeserve.repository import sha256_file
from vaeserve.training import checkpoint
from vaeserve.training.backend import numpy_callables, numpy_prior
from vaeserve.training.config import TrainConfig

EVALUATION_SEED = 0  # the fixed binarization of dynamic splits and the importance samples' seed


def evaluation_path(run_dir: Path, split: str) -> Path:
    return run_dir / f"evaluation-{split}.json"


def evaluate_checkpoint(
    state: dict[str, Any],
    dataset: Dataset,
    split: str,
    iw_samples: int,
    progress: bool = True,
    limit: int | None = None,
    offset: int = 0,
    scores: ScoreFolder | None = None,
) -> Evaluation:
    """The shared evaluator on ``limit`` rows of the split from row ``offset`` (all by default)."""
    config = TrainConfig.from_dict(state["config"])
    x = evaluation_slice(dataset.split(split)[0], config.binarization, EVALUATION_SEED, offset, limit)
    model = checkpoint.model_from(state)
    encode, decode = numpy_callables(model)
    return evaluate(
        encode,
        decode,
        x,
        iw_samples,
        seed=EVALUATION_SEED,
        progress=progress,
        likelihood=model.likelihood,
        prior=numpy_prior(model),
        first_row=offset,
        scores=scores,
    )


def write_evaluation(run_dir: Path, split: str, result: Evaluation, source: Path) -> Path:
    record = {
        "split": split,
        "checkpoint": source.name,
        "checkpoint_sha256": sha256_file(source),
        **result.to_dict(),
    }
    path = evaluation_path(run_dir, split)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path


def write_pictures(state: dict[str, Any], dataset: Dataset, split: str, out_dir: Path) -> list[Path]:
    config = TrainConfig.from_dict(state["config"])
    images, labels = dataset.split(split)
    x = evaluation_inputs(images[:5000], config.binarization, EVALUATION_SEED)
    model = checkpoint.model_from(state)
    encode, decode = numpy_callables(model)
    return pictures.model_pictures(
        encode,
        decode,
        x,
        labels,
        dataset.image_shape,
        out_dir,
        likelihood=model.likelihood,
        prior=numpy_prior(model),
    )
