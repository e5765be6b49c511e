"""Training throughput: the seed preset beside a plain PyTorch loop of the same model, or the
conv preset (its convolutions channels last, as training.conv stores them, trained in bfloat16)
beside the same model in fp32 and in PyTorch's default layout.

    python -m benchmarks.train_throughput --data-dir ../shared/data/mnist [--epochs 3]
    python -m benchmarks.train_throughput --data-dir ../shared/data/mnist --preset conv [--turns 5]

seed: both train the 784-200-(2x100) VAE with batch 64 on the same 50,000 binarized rows;
epochs alternate between the two so machine noise hits both alike. Prints rows/s
(median over epochs) of each and their ratio.
conv: the preset's training steps (batch 100, its VampPrior, its IWAE bound of k = 2) in
bfloat16 (the preset's --precision) and in fp32, channels last and in PyTorch's default layout,
and the evaluator's decoding of 1,024 latents (the pieces `vae evaluate` runs k = 5,000 samples
in, always fp32), each variant taking turns; medians of the turns.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from vaeserve.datasets import Dataset, load_dataset
from vaeserve.evaluation import GRAPH_ROWS
from vaeserve.training.config import resolve_config
from vaeserve.training.trainer import Trainer


def plain_pytorch_epoch(model: nn.ModuleDict, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> float:
    """The textbook loop: shuffle, encode, reparameterize, decode, −ELBO summed, step."""
    started = time.perf_counter()
    order = torch.randperm(len(x))
    for start in range(0, len(x) - 63, 64):
        batch = x[order[start : start + 64]]
        mean, raw = model["encoder"](batch).chunk(2, dim=-1)
        stddev = F.softplus(raw) + 1e-6
        z = mean + stddev * torch.randn_like(mean)
        logits = model["decoder"](z)
        reconstruction = F.binary_cross_entropy_with_logits(logits, batch, reduction="sum")
        kl = (-torch.log(stddev) + 0.5 * (stddev**2 + mean**2) - 0.5).sum()
        loss = reconstruction + kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return len(x) // 64 * 64 / (time.perf_counter() - started)


def conv_layouts(dataset: Dataset, turns: int, steps: int) -> None:
    """The conv preset's steps and the evaluator's decoding, channels last beside contiguous, and
    the steps in bfloat16 (the preset's --precision) beside fp32."""
    trainer = Trainer(resolve_config("conv", None, {}), dataset, Path("/tmp/unused"), progress=False)
    model, batch = trainer.model, trainer.config.batch_size
    rows = trainer.epoch_rows()[: steps * batch]
    latents = torch.randn(GRAPH_ROWS, model.latent_size, generator=torch.Generator().manual_seed(0))
    # name: (layout, training precision); the evaluator always decodes in fp32.
    variants = {
        "channels last, bf16 (preset)": (torch.channels_last, "bf16"),
        "channels last, fp32": (torch.channels_last, "fp32"),
        "contiguous (NCHW), fp32": (torch.contiguous_format, "fp32"),
    }
    train: dict[str, list[float]] = {name: [] for name in variants}
    decode: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(turns):
        for name, (layout, precision) in variants.items():
            model.to(memory_format=layout)
            trainer.config = replace(trainer.config, precision=precision)
            model.train()
            started = time.perf_counter()
            for start in range(0, len(rows), batch):
                trainer.step(rows[start : start + batch], 1.0)
            train[name].append(len(rows) / (time.perf_counter() - started))
            model.eval()
            with torch.no_grad():
                started = time.perf_counter()
                model.decode(latents)
                decode[name].append(GRAPH_ROWS / (time.perf_counter() - started))
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {turns} turns of {steps} steps each")
    print(f"{'conv preset':<32}{'train rows/s':>14}{'decode rows/s':>15}")
    medians = {name: (statistics.median(train[name]), statistics.median(decode[name])) for name in variants}
    for name, (trained, decoded) in medians.items():
        print(f"{name:<32}{trained:>14,.0f}{decoded:>15,.0f}")
    (half_train, _), (last_train, last_decode), (plain_train, plain_decode) = medians.values()
    print(f"ratio bf16 / fp32 (channels last): training {half_train / last_train:.2f}")
    print(
        f"ratio channels last / contiguous (fp32): training {last_train / plain_train:.2f}, "
        f"decoding {last_decode / plain_decode:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="folder of the MNIST IDX files")
    parser.add_argument("--preset", choices=("seed", "conv"), default="seed", help="which comparison")
    parser.add_argument("--epochs", type=int, default=3, help="seed: epochs of each, alternating")
    parser.add_argument("--turns", type=int, default=5, help="conv: turns of each layout")
    parser.add_argument("--steps", type=int, default=50, help="conv: training steps per turn")
    args = parser.parse_args()
    dataset = load_dataset("mnist", data_dir=args.data_dir, progress=False)
    if args.preset == "conv":
        conv_layouts(dataset, args.turns, args.steps)
        return
    trainer = Trainer(resolve_config("seed", None, {}), dataset, Path("/tmp/unused"), progress=False)
    trainer.validation_elbo = lambda: None  # time the optimisation only, as the plain loop does
    torch.manual_seed(0)
    plain = nn.ModuleDict(
        {
            "encoder": nn.Sequential(nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200)),
            "decoder": nn.Sequential(nn.Linear(100, 200), nn.ReLU(), nn.Linear(200, 784)),
        }
    )
    optimizer = torch.optim.RMSprop(plain.parameters(), lr=1e-3, alpha=0.9, eps=1e-10)
    ours, theirs = [], []
    for _ in range(args.epochs):
        ours.append(trainer.train_epoch()["rows_per_s"])
        theirs.append(plain_pytorch_epoch(plain, optimizer, trainer.data.train))
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.epochs} epochs each")
    print(f"{'loop':<28}{'rows/s':>10}")
    print(f"{'vaeserve seed preset':<28}{a:>10,.0f}")
    print(f"{'plain PyTorch loop':<28}{b:>10,.0f}")
    print(f"ratio vaeserve / plain: {a / b:.2f}")


if __name__ == "__main__":
    main()
