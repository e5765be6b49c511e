"""The training loop: data, model, epochs, checkpoints, resume.

Deterministic given the config's seed: one torch.Generator drives shuffling,
ε and dynamic binarization, and its state is saved in every checkpoint, so a
resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vaeserve.atomic import atomic_write_text
from vaeserve.datasets import Dataset, evaluation_inputs, intensities
from vaeserve.errors import CheckpointError, ConfigError, DataError
from vaeserve.training import checkpoint
from vaeserve.training.config import TrainConfig
from vaeserve.training.model import VAE
from vaeserve.training.objectives import OBJECTIVES, elbo
from vaeserve.training.optim import make_optimizer

log = logging.getLogger(__name__)
VALIDATION_SEED = 1234  # fixed ε for the per-epoch validation ELBO, so epochs compare fairly


@dataclass
class TrainingData:
    train: torch.Tensor  # intensities in [0, 1] (dynamic, dequantize) or the binarized rows
    validation: torch.Tensor | None  # evaluation inputs, fixed binarization
    dynamic: bool
    dequantize: bool = False


def prepare_data(config: TrainConfig, dataset: Dataset) -> TrainingData:
    images, _ = dataset.split(config.train_split)
    if config.limit is not None:
        images = images[: config.limit]
    if len(images) < config.batch_size:
        raise DataError(f"{len(images)} training rows are fewer than one batch of {config.batch_size}")
    dynamic, dequantize = config.binarization == "dynamic", config.binarization == "dequantize"
    fresh = dynamic or dequantize  # drawn again every epoch
    train = intensities(images) if fresh else evaluation_inputs(images, config.binarization)
    validation = None
    if config.train_split == "train":
        validation = torch.from_numpy(
            evaluation_inputs(dataset.split("validation")[0], config.binarization, seed=config.seed)
        )
    return TrainingData(torch.from_numpy(np.ascontiguousarray(train)), validation, dynamic, dequantize)


def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 products in hardware (AVX512-BF16 or AMX)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


class Trainer:
    def __init__(
        self, config: TrainConfig, dataset: Dataset, run_dir: Path, progress: bool = True, preset: str = ""
    ):
        self.config = config
        self.preset = preset  # the preset the config started from ("": a run made in code)
        self.dataset = dataset
        self.run_dir = run_dir
        self.progress = progress
        self.data = prepare_data(config, dataset)
        torch.manual_seed(config.seed)
        self.model = VAE.from_config(config, dataset.image_shape)
        if self.model.prior is not None:
            self.model.prior.initialise_from(
                self.pseudo_input_rows(), torch.Generator().manual_seed(config.seed)
            )
        self.optimizer = make_optimizer(config, self.model.parameters())
        self.generator = torch.Generator().manual_seed(config.seed)
        self.objective = OBJECTIVES[config.objective]
        if config.precision == "bf16" and not native_bfloat16():
            log.warning(
                "--precision bf16 on a CPU without AVX512-BF16 or AMX: bfloat16 is emulated there "
                "and trains slower than fp32"
            )
        self.epoch = 0
        self.stopped = ""  # why the loop ended before config.epochs: early stopping or the budget
        self.history: list[dict[str, Any]] = []
        self.costs: list[float] = []
        self.best_validation_elbo = -float("inf")

    def pseudo_input_rows(self) -> torch.Tensor:
        rows, wanted = self.data.train, self.config.prior_components
        if len(rows) < wanted:
            raise ConfigError(
                f"prior_components = {wanted} pseudo-inputs start at distinct training rows, "
                f"but there are {len(rows)}; pass --prior-components {len(rows)} or fewer"
            )
        return rows

    # -- state --------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "preset": self.preset,
            "input_size": self.dataset.input_size,
            "image_shape": list(self.dataset.image_shape),
            "dataset": {
                "name": self.dataset.name,
                # Rows trained on: --limit's, not the split's.
                "split_sizes": {**self.dataset.split_sizes(), "train": len(self.data.train)},
                "source": self.dataset.source,
            },
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "stopped": self.stopped,
            "history": self.history,
            "costs": self.costs,
            "best_validation_elbo": self.best_validation_elbo,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.epoch = int(state["epoch"])
        self.stopped = state.get("stopped", "")
        self.preset = state.get("preset", "")
        self.history = list(state["history"])
        self.costs = list(state["costs"])
        self.best_validation_elbo = float(state["best_validation_elbo"])

    # -- loop ---------------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.json", json.dumps(self.config.to_dict(), indent=2))
        started = time.perf_counter()
        self.stopped = self.stop_reason(started)  # a resumed run that stopped early stays stopped
        while self.epoch < self.config.epochs and not self.stopped:
            record = self.train_epoch()
            self.history.append(record)
            # Decided before the epoch is saved, so that its checkpoint says why the run ends there.
            self.stopped = self.stop_reason(started)
            self.save_epoch(record)
        return self.history

    def stop_reason(self, started: float) -> str:
        """Why the run stops now: early stopping on the validation ELBO, or the wall-clock budget
        of this invocation; "" to go on."""
        budget = self.config.max_minutes
        if budget is not None and time.perf_counter() - started > 60 * budget:
            log.info("stopping after epoch %d: the %.0f-minute budget is spent", self.epoch, budget)
            return f"the --max-minutes {budget:g} budget was spent"
        patience = self.config.patience
        scores = [r["validation_elbo"] for r in self.history if r["validation_elbo"] is not None]
        waited = patience is not None and len(scores) > patience
        if waited and max(scores[-patience:]) <= max(scores[:-patience]):
            return f"early stopping: no better validation ELBO in {patience} epochs (--patience)"
        return ""

    def train_epoch(self) -> dict[str, Any]:
        self.model.train()
        started = time.perf_counter()
        rows = self.epoch_rows()
        batch = self.config.batch_size
        kl_weight, lr = self.kl_weight(), self.learning_rate()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total, steps = 0.0, range(0, len(rows) - batch + 1, batch)
        with tqdm(
            total=len(steps) * batch,
            desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
            unit="img",
            disable=None if self.progress else True,  # None: only on a terminal
            leave=False,
        ) as bar:
            for i, start in enumerate(steps):
                loss = self.step(rows[start : start + batch], kl_weight)
                self.costs.append(loss)
                total += loss
                bar.update(batch)
                if i % 50 == 0:
                    bar.set_postfix(loss=f"{loss / batch:.2f}")
        seconds = time.perf_counter() - started
        self.epoch += 1
        record = {
            "epoch": self.epoch,
            "train_elbo": -total / (len(steps) * batch),
            "validation_elbo": self.validation_elbo(),
            "kl_weight": kl_weight,
            "lr": lr,
            "seconds": seconds,
            "rows_per_s": len(steps) * batch / seconds,
        }
        log.info("epoch %(epoch)d: train ELBO %(train_elbo).2f, validation ELBO %(validation_elbo)s", record)
        return record

    def epoch_rows(self) -> torch.Tensor:
        """This epoch's training rows in a fresh random order (and a fresh binarization, or
        fresh dequantization noise: (p + u)/256 for 8-bit pixel p)."""
        order = torch.randperm(len(self.data.train), generator=self.generator)
        rows = self.data.train[order]
        if self.data.dynamic:
            rows = torch.bernoulli(rows, generator=self.generator)
        if self.data.dequantize:
            rows = (torch.round(rows * 255) + torch.rand(rows.shape, generator=self.generator)) / 256
        return rows

    def step(self, x: torch.Tensor, kl_weight: float) -> float:
        # The seed's loss: −ELBO summed over the batch. Under --precision bf16 autocast runs the
        # networks' convolutions and matrix products in bfloat16; VAE.encode and decode hand their
        # outputs back as fp32, so the likelihood, the prior and the loss are computed in fp32.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.config.precision == "bf16"):
            loss = -self.objective(self.model, x, self.generator, kl_weight, self.config.train_samples).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def kl_weight(self) -> float:
        if self.config.kl_warmup_epochs <= 0:
            return 1.0
        return min(1.0, (self.epoch + 1) / self.config.kl_warmup_epochs)

    def learning_rate(self) -> float:
        """--lr-decay per epoch, or --lr-end: lr · (lr_end/lr)^(the budget's fraction spent in the
        epochs before this one), so that the learning rate anneals within the budget whatever the
        machine's speed (the epochs' own seconds, which the checkpoint keeps across resumes)."""
        config = self.config
        if config.lr_end is None or config.max_minutes is None:
            return config.lr * config.lr_decay**self.epoch
        spent = sum(record["seconds"] for record in self.history) / (60 * config.max_minutes)
        return config.lr * (config.lr_end / config.lr) ** min(1.0, spent)

    @torch.no_grad()
    def validation_elbo(self) -> float | None:
        if self.data.validation is None:
            return None
        self.model.eval()
        generator = torch.Generator().manual_seed(VALIDATION_SEED)
        values = [elbo(self.model, x, generator).sum().item() for x in self.data.validation.split(4096)]
        return sum(values) / len(self.data.validation)

    def save_epoch(self, record: dict[str, Any]) -> None:
        score = record["validation_elbo"]
        improved = score is None or score > self.best_validation_elbo
        if improved and score is not None:
            self.best_validation_elbo = score
        state = self.state()
        checkpoint.save(state, self.run_dir / checkpoint.LAST)
        if improved:
            checkpoint.save(state, self.run_dir / checkpoint.BEST)
        # Rewritten whole from the history the checkpoint holds, so the two always agree.
        lines = "".join(json.dumps(r) + "\n" for r in self.history)
        atomic_write_text(self.run_dir / "metrics.jsonl", lines)


def start_or_resume(
    config: TrainConfig,
    dataset: Dataset,
    run_dir: Path,
    resume: bool,
    progress: bool = True,
    preset: str = "",
) -> Trainer:
    """A trainer for a new run in an empty ``run_dir``, or one restored from its last checkpoint
    (which knows its preset)."""
    last = run_dir / checkpoint.LAST
    if not resume:
        if last.exists():
            raise CheckpointError(
                f"{run_dir} already holds a run; pass --resume to continue it or choose another --out"
            )
        return Trainer(config, dataset, run_dir, progress, preset)
    if not last.exists():
        raise CheckpointError(f"{run_dir}: nothing to resume (no {checkpoint.LAST})")
    state = checkpoint.load(last)
    trainer = Trainer(config, dataset, run_dir, progress)
    trainer.restore(state)
    return trainer


def saved_state(run_dir: Path) -> dict[str, Any]:
    """The run's last checkpoint: its config, and where it read its data (``dataset.source``)."""
    last = run_dir / checkpoint.LAST
    if not last.exists():
        raise CheckpointError(f"{run_dir}: nothing to resume (no {checkpoint.LAST})")
    return checkpoint.load(last)


def resumed_config(saved: dict[str, Any], requested: dict[str, Any]) -> TrainConfig:
    """The saved config, with only ``epochs`` open to change on resume."""
    normalized = TrainConfig.from_dict({k: v for k, v in requested.items() if v is not None})
    conflicts = [
        k
        for k, v in requested.items()
        if v is not None and k != "epochs" and saved.get(k) != normalized.to_dict()[k]
    ]
    if conflicts:
        raise ConfigError(f"--resume keeps the run's config; these flags differ from it: {conflicts}")
    config = dict(saved)
    if requested.get("epochs") is not None:
        config["epochs"] = requested["epochs"]
    return TrainConfig.from_dict(config).validate()
