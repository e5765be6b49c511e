"""Convolutional models served beside in-process onnxruntime on the same graphs, in one run.

    python -m benchmarks.conv_throughput --model models/photos/1 --model models/digits/1

For each exported model (a conv VAE: 32×32 colour, 28×28 grey): Encode rows/s of uint8 images
[N, C, H, W] at batch 1, 64 and 256, in-process (``OnnxPair.encode`` on every thread, after the
pixels are prepared as the server prepares them) beside `vae serve` (one worker, its default
threads) called over vae.v1 by the Python load generator in its own process at concurrency 1
and 4; the load generator's own CPU is reported, since it shares the machine's cores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.load import run_load
from benchmarks.service_throughput import server
from benchmarks.timing import rows_per_second
from vaeserve._proto import vae_pb2
from vaeserve.codec import to_tensor
from vaeserve.datasets import encoder_inputs
from vaeserve.repository import open_path
from vaeserve.runtime import OnnxPair

BATCHES = (1, 64, 256)
CONCURRENCY = (1, 4)


def images(pair: OnnxPair, rows: int, seed: int = 0) -> np.ndarray:
    """uint8 images [rows, C, H, W] (or rows [rows, D] for a model whose graphs take rows)."""
    return np.random.default_rng(seed).integers(0, 256, (rows, *pair.row_shape), dtype=np.uint8)


def measure(model: Path, seconds: float) -> list[dict]:
    version = open_path(model)
    pair = OnnxPair.load(version)
    binarization = version.manifest.binarization
    cells = []
    for batch in BATCHES:
        pixels = images(pair, batch)
        local = rows_per_second(
            lambda p=pixels: pair.encode(encoder_inputs(p.reshape(len(p), -1), binarization)), batch
        )
        cells.append({"model": model, "shape": pair.row_shape, "batch": batch, "in_process": local})
    with server(model, None) as served:
        for cell in cells:
            request = vae_pb2.EncodeRequest(model=version.name, inputs=to_tensor(images(pair, cell["batch"])))
            for concurrency in CONCURRENCY:
                figures = run_load(served.target, request, concurrency, seconds)
                cell[f"served_c{concurrency}"] = figures["rows_per_s"]
                cell[f"load_cpu_c{concurrency}"] = figures["load_cpu_cores"]
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, action="append", required=True, help="a version folder")
    parser.add_argument("--seconds", type=float, default=5.0, help="each served cell's load")
    args = parser.parse_args()
    print(
        "| model | image | batch | in-process rows/s | served c=1 | served c=4 | ratio c=4 | load CPU c=4 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for model in args.model:
        for cell in measure(model, args.seconds):
            shape = "×".join(str(d) for d in cell["shape"])
            print(
                f"| {model} | {shape} | {cell['batch']} | {cell['in_process']:,.0f} | "
                f"{cell['served_c1']:,.0f} | {cell['served_c4']:,.0f} | "
                f"{cell['served_c4'] / cell['in_process']:.2f} | {cell['load_cpu_c4']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
