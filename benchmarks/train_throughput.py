"""Training throughput of the seed preset beside a plain PyTorch loop of the same model.

    python -m benchmarks.train_throughput --data-dir ../shared/data/mnist [--epochs 3]

Both train the 784-200-(2x100) VAE with batch 64 on the same 50,000 binarized rows;
epochs alternate between the two so machine noise hits both alike. Prints rows/s
(median over epochs) of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from vaeserve.datasets import load_dataset
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="folder of the MNIST IDX files")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each, alternating")
    args = parser.parse_args()
    dataset = load_dataset("mnist", data_dir=args.data_dir, progress=False)
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
