"""`vae embed` on the 70,000 MNIST images beside the bare encoder, in one run.

    python -m benchmarks.embed_throughput --model models/mnist/1 --data-dir ../shared/data/mnist

Rows/s of (a) the encoder alone in-process, on float rows prepared beforehand, run two
ways: one onnxruntime session with a thread per core on chunks of 8,192 (as the service
runs it) and a pool of one thread per core making single-threaded calls on 1,024 rows
(as `vae embed` runs it); (b) `vae embed` with the local engine and (c) `vae embed
--server` through a `vae serve --shared-memory` subprocess on 127.0.0.1, with chunks in
the messages and through shared memory. Every embed reads the same uint8 .npy of all
70,000 images and writes a new .npy of means and stddevs (a fresh path each run, as a
user's job would). Ratios are to the faster way of (a).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.service_throughput import server
from vaeserve.datasets import load_dataset, model_inputs
from vaeserve.embed.encoders import SUB_BATCH
from vaeserve.embed.job import EmbedRequest, run
from vaeserve.repository import open_path
from vaeserve.runtime import OnnxPair, usable_cores

CHUNK = 8192


def bare_encoder(pair: OnnxPair, x: np.ndarray) -> float:
    pair.encode(x[:CHUNK])
    started = time.perf_counter()
    for start in range(0, len(x), CHUNK):
        pair.encode(x[start : start + CHUNK])
    return len(x) / (time.perf_counter() - started)


def bare_encoder_pool(pair: OnnxPair, x: np.ndarray) -> float:
    with ThreadPoolExecutor(usable_cores()) as pool:
        list(pool.map(pair.encode, [x[:SUB_BATCH]] * usable_cores()))
        started = time.perf_counter()
        list(pool.map(pair.encode, (x[at : at + SUB_BATCH] for at in range(0, len(x), SUB_BATCH))))
    return len(x) / (time.perf_counter() - started)


def embed_rate(request: EmbedRequest) -> float:
    started = time.perf_counter()
    summary = run(request, progress=False)
    return summary["rows"] / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="models/NAME/VERSION")
    parser.add_argument("--data-dir", type=Path, help="folder of the MNIST IDX files")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each; the best is reported")
    parser.add_argument(
        "--ray-workers",
        type=int,
        nargs="*",
        default=[],
        help="also time --engine ray with these numbers of tasks at a time (one run each, Ray's "
        "start-up included)",
    )
    args = parser.parse_args()
    version = open_path(args.model)
    dataset = load_dataset("mnist", args.data_dir, progress=False)
    pixels = np.concatenate([dataset.train_images, dataset.test_images])
    x = model_inputs(pixels, version.manifest.binarization)
    sessions, single = OnnxPair.load(version), OnnxPair.load(version, threads=1)
    rates = {
        "session": max(bare_encoder(sessions, x) for _ in range(args.repeats)),
        "pool": max(bare_encoder_pool(single, x) for _ in range(args.repeats)),
    }
    rates["encoder"] = max(rates["session"], rates["pool"])
    del x
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "mnist70k.npy"
        np.save(source, pixels)
        rates["local"] = max(
            embed_rate(EmbedRequest(args.model, source, Path(folder) / f"local{i}.npy", stddev=True))
            for i in range(args.repeats)
        )
        with server(args.model, 0, "--shared-memory") as served:
            for name, shared in (("service", False), ("shm", True)):
                remote = EmbedRequest(
                    args.model,
                    source,
                    Path(folder) / f"{name}.npy",
                    server=served.target,
                    stddev=True,
                    force=True,
                    shared_memory=shared,
                )
                rates[name] = max(embed_rate(remote) for _ in range(args.repeats))
        same = all(
            np.array_equal(np.load(Path(folder) / "local0.npy"), np.load(Path(folder) / f"{name}.npy"))
            for name in ("service", "shm")
        )
        for workers in args.ray_workers:
            on_ray = EmbedRequest(
                args.model,
                source,
                Path(folder) / "ray.parquet",
                stddev=True,
                force=True,
                engine="ray",
                workers=workers,
            )
            rates[f"ray{workers}"] = embed_rate(on_ray)
    print(f"{len(pixels):,} MNIST images, model {version.name}/{version.version}, best of {args.repeats}")
    print(f"{'path':<44}{'rows/s':>10}{'ratio':>8}")
    for name, label in (
        ("session", "encoder alone: one call, a thread per core"),
        ("pool", "encoder alone: 1-thread calls, one per core"),
        ("local", "vae embed (local engine)"),
        ("service", "vae embed --server (gRPC)"),
        ("shm", "  --server --shared-memory"),
    ):
        print(f"{label:<44}{rates[name]:>10,.0f}{rates[name] / rates['encoder']:>8.2f}")
    for workers in args.ray_workers:
        rate = rates[f"ray{workers}"]
        print(
            f"{f'vae embed --engine ray, {workers} tasks':<44}{rate:>10,.0f}{rate / rates['encoder']:>8.2f}"
        )
    print(f"local and service outputs identical: {same}")


if __name__ == "__main__":
    main()
