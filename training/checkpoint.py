"""The checkpoint format: the training stage's contract with the export stage.

A checkpoint is one ``torch.save`` file of plain types and tensors (loadable with
``weights_only=True``, so loading never runs pickled code):

    format: "vaeserve-checkpoint", format_version: 1, vaeserve_version
    config: TrainConfig as a dict       model: the VAE's state dict
    input_size, image_shape, dataset: {name, split_sizes}
    epoch: completed epochs             optimizer, generator: state to resume exactly
    history: one record per epoch       costs: the loss of every iteration
    best_validation_elbo

A run directory holds ``checkpoint.pt`` (the last complete epoch), ``best.pt``
(the best by validation ELBO), ``config.json``, ``metrics.jsonl`` and ``plots/``.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch

from vaeserve import __version__
from vaeserve.atomic import atomic_path
from vaeserve.errors import CheckpointError, first_line
from vaeserve.training.config import TrainConfig
from vaeserve.training.model import VAE

FORMAT = "vaeserve-checkpoint"
FORMAT_VERSION = 1
LAST = "checkpoint.pt"
BEST = "best.pt"


def save(state: dict[str, Any], path: Path) -> None:
    """Write atomically: an interrupted save leaves the previous checkpoint intact."""
    state = {"format": FORMAT, "format_version": FORMAT_VERSION, "vaeserve_version": __version__, **state}
    # Serialized in memory first: torch's zip writer reports a full disk as a RuntimeError
    # ("unexpected pos"), a plain write as the OSError it is.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def load(path: Path) -> dict[str, Any]:
    path = resolve(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns before failing on foreign pickles
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or torn files
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a vaeserve checkpoint (no format marker {FORMAT!r})")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {state.get('format_version')!r}, "
            f"this vaeserve reads version {FORMAT_VERSION}"
        )
    # Runs saved before the discretized logistic coupled a pixel's channels were trained without
    # it; the config's default is on now.
    state["config"].setdefault("logistic_coupling", False)
    return state


def resolve(path: Path, which: str = BEST) -> Path:
    """A checkpoint file, or a run directory's ``best.pt`` (or ``checkpoint.pt``)."""
    if path.is_dir():
        for name in (which, LAST):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: run directory holds no {BEST} or {LAST}")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or run directory")
    return path


def model_from(state: dict[str, Any]) -> VAE:
    config = TrainConfig.from_dict(state["config"])
    model = VAE.from_config(config, tuple(state["image_shape"]))
    model.load_state_dict(state["model"])
    return model.eval()
