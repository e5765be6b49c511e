"""In-process onnxruntime throughput of an exported pair beside PyTorch eager on the same weights.

    python -m benchmarks.export_throughput --model models/mnist/1 --checkpoint runs/seed \
        --data-dir ../shared/data/mnist

Prints rows/s of the encoder (real test images) and the decoder (z ~ N(0, I)) at batch
sizes 1, 64, 256 and 1,024 for onnxruntime fp32, PyTorch eager and onnxruntime int8
(when exported), with the ratios, and the int8 variant's test-ELBO change from the
manifest. These are the reference numbers the service is measured against.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from benchmarks.timing import rows_per_second
from vaeserve.datasets import evaluation_inputs, load_dataset
from vaeserve.repository import open_path
from vaeserve.runtime import OnnxPair
from vaeserve.training import checkpoint

BATCH_SIZES = (1, 64, 256, 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="models/NAME/VERSION")
    parser.add_argument("--checkpoint", type=Path, required=True, help="the run or checkpoint it came from")
    parser.add_argument("--data-dir", type=Path, help="folder of the MNIST IDX files")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime and torch threads (0: all cores)")
    args = parser.parse_args()
    version = open_path(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = checkpoint.model_from(checkpoint.load(args.checkpoint))
    fp32 = OnnxPair.load(version, threads=args.threads)
    has_int8 = "int8" in version.variants
    int8 = OnnxPair.load(version, threads=args.threads, variant="int8") if has_int8 else None
    dataset = load_dataset(version.manifest.dataset, args.data_dir, progress=False)
    images = evaluation_inputs(dataset.test_images, version.manifest.binarization)
    print(
        f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, model {version.name}/{version.version}"
    )
    header = f"{'graph':<8}{'batch':>6}{'ORT fp32':>12}{'PyTorch':>12}{'ORT/PT':>8}"
    print(header + (f"{'ORT int8':>12}{'int8/fp32':>10}" if int8 else "") + "   (rows/s)")
    rng = np.random.default_rng(0)
    for graph in ("encoder", "decoder"):
        for batch in BATCH_SIZES:
            data = (
                images[:batch]
                if graph == "encoder"
                else rng.standard_normal((batch, version.latent_size), dtype=np.float32)
            )
            runs = engines(graph, model, fp32, int8, data)
            rates = {name: rows_per_second(call, batch) for name, call in runs.items()}
            line = (
                f"{graph:<8}{batch:>6}{rates['ort']:>12,.0f}{rates['torch']:>12,.0f}"
                f"{rates['ort'] / rates['torch']:>8.2f}"
            )
            if int8:
                line += f"{rates['int8']:>12,.0f}{rates['int8'] / rates['ort']:>10.2f}"
            print(line)
    if int8:
        change = version.manifest.variants["int8"]["test_elbo_change"]
        print(f"int8 test ELBO change vs fp32 (from the manifest, paired draws): {change:+.3f} nats")


def engines(graph: str, model, fp32: OnnxPair, int8: OnnxPair | None, data: np.ndarray) -> dict:
    tensor = torch.from_numpy(data)

    @torch.no_grad()
    def eager() -> object:
        return model.encode(tensor) if graph == "encoder" else torch.sigmoid(model.decode(tensor))

    runs = {
        "ort": (lambda: fp32.encode(data)) if graph == "encoder" else (lambda: fp32.decode(data)),
        "torch": eager,
    }
    if int8:
        runs["int8"] = (lambda: int8.encode(data)) if graph == "encoder" else (lambda: int8.decode(data))
    return runs


if __name__ == "__main__":
    main()
