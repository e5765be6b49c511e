"""The service beside in-process onnxruntime, measured side by side in one run.

    python -m benchmarks.service_throughput --model models/mnist/1 --data-dir ../shared/data/mnist

Starts ``vae serve`` as a subprocess on 127.0.0.1 (one per configuration), and with a
load generator in a separate process measures:
1. Encode rows/s through gRPC, float32 and uint8 inputs, batch 1, 64, 256, 1,024,
   concurrency 1 and 4, beside in-process onnxruntime on the same model and threads
   (the faster of one call with every thread, and the batch cut into one-thread calls
   run in parallel, as the server runs it): with the tensors' bytes in the messages,
   and through shared memory (same host);
2. batch-1 latency p50/p99 and calls/s at concurrency 1 and 8, with batching across
   requests on and off (what it gains and costs);
3. the server's RSS before and after a long run of calls;
4. what Python gRPC alone allows a batch-1,024 Encode with bytes in the messages: a no-op
   server answering uint8 requests with a mean and stddev of the right size, beside the
   in-process encoder (the ceiling of the bytes column in 1).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.load import noop_ceiling, run_load
from benchmarks.timing import rows_per_second
from vaeserve._proto import vae_pb2
from vaeserve.client import VaeClient
from vaeserve.codec import to_tensor
from vaeserve.datasets import load_dataset, model_inputs
from vaeserve.repository import ModelVersion, open_path
from vaeserve.runtime import OnnxPair

BATCHES = (1, 64, 256, 1024)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(model: Path, threads: int, *flags: str) -> Iterator[tuple[str, int]]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "vaeserve.cli",
        "serve",
        "--repo",
        str(model.parent.parent),
        "--model",
        model.parent.name,
        "--version",
        model.name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        "--threads",
        str(threads),
        *flags,
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    target = f"127.0.0.1:{port}"
    with VaeClient(target, timeout=5) as client:
        if not client.wait_until_serving(60):
            process.kill()
            raise RuntimeError(f"vae serve not SERVING after 60 s:\n{process.stderr.read()}")
    try:
        yield target, process.pid
    finally:
        process.terminate()
        process.wait(30)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def request(pixels: np.ndarray, binarization: str, dtype: str) -> vae_pb2.EncodeRequest:
    rows = pixels if dtype == "uint8" else model_inputs(pixels, binarization)
    return vae_pb2.EncodeRequest(inputs=to_tensor(rows))


class InProcess:
    """Encode in this process, the faster of two ways: one call on every thread, or the
    batch cut into one-thread calls run in parallel (as the server runs it on CPU)."""

    def __init__(self, version: ModelVersion, threads: int) -> None:
        self.sessions = OnnxPair.load(version, threads=threads)
        self.single = OnnxPair.load(version, threads=1)
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads)

    def rows_per_s(self, x: np.ndarray) -> float:
        step = -(-len(x) // self.threads)
        pieces = [x[start : start + step] for start in range(0, len(x), step)]
        return max(
            rows_per_second(lambda: self.sessions.encode(x), len(x)),
            rows_per_second(lambda: list(self.pool.map(self.single.encode, pieces)), len(x)),
        )


def throughput_table(
    target: str, local: InProcess, pixels: np.ndarray, binarization: str, seconds: float
) -> None:
    provider = local.sessions.provider
    print(f"\n1. Encode rows/s: gRPC (bytes; shared memory) vs in-process onnxruntime ({provider})")
    print(
        f"{'input':<8}{'batch':>6}{'conc':>6}{'in-process':>13}{'gRPC':>11}{'ratio':>8}"
        f"{'gRPC+shm':>11}{'ratio':>8}"
    )
    for dtype in ("float32", "uint8"):
        for batch in BATCHES:
            rate = local.rows_per_s(model_inputs(pixels[:batch], binarization))
            for concurrency in (1, 4):
                message = request(pixels[:batch], binarization, dtype)
                served = run_load(target, message, concurrency, seconds)["rows_per_s"]
                shared = run_load(target, message, concurrency, seconds, shared=True)["rows_per_s"]
                print(
                    f"{dtype:<8}{batch:>6}{concurrency:>6}{rate:>13,.0f}{served:>11,.0f}"
                    f"{served / rate:>8.2f}{shared:>11,.0f}{shared / rate:>8.2f}"
                )


def latency_table(model: Path, threads: int, pixels: np.ndarray, binarization: str, seconds: float) -> None:
    print("\n2. Batch-1 Encode calls from a separate process")
    print(f"{'server':<24}{'conc':>6}{'calls/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    one = request(pixels[:1], binarization, "float32")
    latents = to_tensor(np.zeros((1, open_path(model).latent_size), np.float32))
    for concurrency in (1, 8):
        r = noop_ceiling(
            free_port(), one, vae_pb2.EncodeResponse(mean=latents, stddev=latents), concurrency, seconds
        )
        print(
            f"{'no-op grpc.aio (ceiling)':<24}{concurrency:>6}{r['calls_per_s']:>10,.0f}{r['p50_ms']:>9.2f}"
            f"{r['p99_ms']:>9.2f}"
        )
    for flag in ("--batching", "--no-batching"):
        with server(model, threads, flag) as (target, _):
            for concurrency in (1, 8):
                r = run_load(target, one, concurrency, seconds)
                print(
                    f"{'vae serve ' + flag[2:]:<24}{concurrency:>6}{r['calls_per_s']:>10,.0f}"
                    f"{r['p50_ms']:>9.2f}"
                    f"{r['p99_ms']:>9.2f}"
                )


def transport_ceiling(
    local: InProcess, pixels: np.ndarray, binarization: str, latent_size: int, seconds: float
) -> None:
    print("\n4. Batch-1,024 uint8 Encode with bytes in the messages: a no-op server (Python gRPC alone)")
    print(f"{'conc':>6}{'rows/s':>11}{'ratio to in-process':>22}")
    rows = pixels[:1024]
    rate = local.rows_per_s(model_inputs(rows, binarization))
    latents = to_tensor(np.zeros((len(rows), latent_size), np.float32))
    answer = vae_pb2.EncodeResponse(mean=latents, stddev=latents)
    for concurrency in (1, 4):
        r = noop_ceiling(free_port(), request(rows, binarization, "uint8"), answer, concurrency, seconds)
        print(f"{concurrency:>6}{r['rows_per_s']:>11,.0f}{r['rows_per_s'] / rate:>22.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="models/NAME/VERSION")
    parser.add_argument("--data-dir", type=Path, help="folder of the MNIST IDX files")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads, server and in-process")
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each load measurement")
    parser.add_argument("--soak-seconds", type=float, default=30.0, help="duration of the RSS soak run")
    args = parser.parse_args()
    version = open_path(args.model)
    binarization = version.manifest["binarization"]
    pixels = load_dataset(version.manifest["training"]["dataset"], args.data_dir, progress=False).test_images
    local = InProcess(version, args.threads)
    print(
        f"model {version.name}/{version.version}, {os.cpu_count()} cores, onnxruntime threads {args.threads}"
    )
    with server(args.model, args.threads, "--shared-memory") as (target, pid):
        throughput_table(target, local, pixels, binarization, args.seconds)
        before = rss_mb(pid)
        soak = run_load(target, request(pixels[:64], binarization, "uint8"), 8, args.soak_seconds)
        after = rss_mb(pid)
        calls = soak["calls_per_s"] * args.soak_seconds
        print(
            f"\n3. Server RSS {before:.0f} MB before, {after:.0f} MB after {calls:,.0f} calls "
            f"({args.soak_seconds:.0f} s of batch-64 uint8 Encode at concurrency 8)"
        )
    latency_table(args.model, args.threads, pixels, binarization, args.seconds)
    transport_ceiling(local, pixels, binarization, version.latent_size, args.seconds)


if __name__ == "__main__":
    main()
