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
   requests on and off (what it gains and costs) and with two worker processes;
3. the server's RSS before and after a long run of calls;
4. what Python gRPC alone allows a batch-1,024 Encode with bytes in the messages: a no-op
   server answering uint8 requests with a mean and stddev of the right size, beside the
   in-process encoder (the ceiling of the bytes column in 1);
5. the same Encode calls over vae.v1, the Open Inference Protocol's gRPC (ModelInfer on
   NAME-encoder, raw tensors) and its REST API (binary tensors), on the cells of 1 and 2,
   side by side on one server, with each load generator;
6. vaeserve with its defaults (vae.v1 and OIP gRPC) beside Triton Inference Server 2.51 serving
   the same encoder (benchmarks/triton_peer.py), on the cells issue 14 names; skipped with a
   message where the peer cannot be installed.

The load comes from the Python generator (`vae bench`'s, vaeserve/bench.py) and, where h2load is
installed (`apt-get install nghttp2-client`), also from h2load, a C generator that leaves
the server the CPU a Python client would take (vaeserve/h2load.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from benchmarks import triton_peer
from benchmarks.load import noop_server, run_load
from benchmarks.timing import rows_per_second
from vaeserve import h2load
from vaeserve._proto import vae_pb2
from vaeserve.bench import rss_mb
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


class Served(NamedTuple):
    target: str
    pid: int
    metrics_port: int
    http: str  # host:port of the OIP REST API


@contextlib.contextmanager
def server(model: Path, threads: int | None, *flags: str, workers: int | None = 1) -> Iterator[Served]:
    """`vae serve` on free ports, of the version folder ``model`` (or, given a repository folder,
    of every model in it); ``threads`` or ``workers`` None: the server's own default."""
    port, metrics_port, http_port = free_port(), free_port(), free_port()
    if model.name.isdecimal():
        chosen = ["--repo", str(model.parent.parent), "--model", model.parent.name, "--version", model.name]
    else:
        chosen = ["--repo", str(model)]
    command = [
        sys.executable,
        "-m",
        "vaeserve.cli",
        "serve",
        *chosen,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--http-port",
        str(http_port),
        *(["--threads", str(threads)] if threads is not None else []),
        *(["--workers", str(workers)] if workers is not None else []),
        *flags,
    ]
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
        try:
            _wait_serving(process, log, f"127.0.0.1:{port}")
            yield Served(f"127.0.0.1:{port}", process.pid, metrics_port, f"127.0.0.1:{http_port}")
        finally:
            process.terminate()
            process.wait(60)


def _wait_serving(process: subprocess.Popen, log, target: str) -> None:
    """Until SERVING and, with workers, until the supervisor says every one is (a health
    check reaches only one of them)."""
    with VaeClient(target, timeout=5) as client:
        serving = client.wait_until_serving(60)
    deadline = time.monotonic() + 60
    while serving and time.monotonic() < deadline:
        log.seek(0)
        text = log.read()
        supervising = re.search(r"supervising (\d+) workers", text)
        if not supervising or f"all {supervising.group(1)} workers serving" in text:
            return
        time.sleep(0.1)
    process.kill()
    log.seek(0)
    raise RuntimeError(f"vae serve not SERVING after 60 s:\n{log.read()}")


# (target, request, concurrency, seconds, the server's metrics port or None, protocol) → figures.
Load = Callable[..., dict[str, float]]


def python_load(
    target: str, message, concurrency: int, seconds: float, _metrics_port: int | None, protocol: str = "v1"
):
    """The Python generator, which reads every call's status itself: any failure is refused."""
    return run_load(target, message, concurrency, seconds, protocol=protocol)


def loads() -> dict[str, Load]:
    """The load generators to measure with: Python's always, h2load where installed."""
    if not h2load.available():
        print(h2load.MISSING)
        return {"Python": python_load}
    return {"Python": python_load, "h2load": h2load.run_h2load}


def request(pixels: np.ndarray, binarization: str, dtype: str, model: str = "") -> vae_pb2.EncodeRequest:
    rows = pixels if dtype == "uint8" else model_inputs(pixels, binarization)
    return vae_pb2.EncodeRequest(model=model, inputs=to_tensor(rows))


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
    served: Served,
    local: InProcess,
    pixels: np.ndarray,
    binarization: str,
    seconds: float,
    generators: dict[str, Load],
) -> None:
    provider = local.sessions.provider
    with_h2load = "h2load" in generators
    print(f"\n1. Encode rows/s: gRPC (bytes; shared memory) vs in-process onnxruntime ({provider})")
    print(
        f"{'input':<8}{'batch':>6}{'conc':>6}{'in-process':>13}{'gRPC':>11}{'ratio':>8}"
        f"{'gRPC+shm':>11}{'ratio':>8}" + (f"{'h2load':>11}{'ratio':>8}" if with_h2load else "")
    )
    for dtype in ("float32", "uint8"):
        for batch in BATCHES:
            rate = local.rows_per_s(model_inputs(pixels[:batch], binarization))
            for concurrency in (1, 4):
                message = request(pixels[:batch], binarization, dtype)
                columns = [
                    run_load(served.target, message, concurrency, seconds)["rows_per_s"],
                    run_load(served.target, message, concurrency, seconds, shared=True)["rows_per_s"],
                ]
                if with_h2load:
                    args = (served.target, message, concurrency, seconds, served.metrics_port)
                    columns.append(generators["h2load"](*args)["rows_per_s"])
                print(
                    f"{dtype:<8}{batch:>6}{concurrency:>6}{rate:>13,.0f}"
                    + "".join(f"{rows:>11,.0f}{rows / rate:>8.2f}" for rows in columns)
                )


def latency_table(
    model: Path,
    threads: int,
    pixels: np.ndarray,
    binarization: str,
    seconds: float,
    generators: dict[str, Load],
) -> None:
    print("\n2. Batch-1 Encode calls from a separate process")
    print(f"{'server':<34}{'load':>8}{'conc':>6}{'calls/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    one = request(pixels[:1], binarization, "float32")
    latents = to_tensor(np.zeros((1, open_path(model).latent_size), np.float32))
    answer = vae_pb2.EncodeResponse(mean=latents, stddev=latents)

    def rows(label: str, target: str, metrics_port: int | None) -> None:
        for name, load in generators.items():
            for concurrency in (1, 8):
                r = load(target, one, concurrency, seconds, metrics_port)
                print(
                    f"{label:<34}{name:>8}{concurrency:>6}{r['calls_per_s']:>10,.0f}"
                    f"{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
                )

    with noop_server(free_port(), answer) as target:
        rows("no-op grpc.aio (ceiling)", target, None)
    for label, flags, workers in (
        ("vae serve --workers 1 --batching", ("--batching",), 1),
        ("vae serve --workers 1", (), 1),
        ("vae serve --workers 2", (), 2),
    ):
        # Each worker may use every thread, as `vae serve` gives them by default.
        with server(model, threads, *flags, workers=workers) as served:
            rows(label, served.target, served.metrics_port)


def soak_table(served: Served, pixels: np.ndarray, binarization: str, seconds: float) -> None:
    before = rss_mb(served.pid)
    soak = run_load(served.target, request(pixels[:64], binarization, "uint8"), 8, seconds)
    after = rss_mb(served.pid)
    calls = soak["calls_per_s"] * seconds
    print(
        f"\n3. Server RSS {before:.0f} MB before, {after:.0f} MB after {calls:,.0f} calls "
        f"({seconds:.0f} s of batch-64 uint8 Encode at concurrency 8)"
    )


def transport_ceiling(
    local: InProcess,
    pixels: np.ndarray,
    binarization: str,
    latent_size: int,
    seconds: float,
    generators: dict[str, Load],
) -> None:
    print("\n4. Batch-1,024 uint8 Encode with bytes in the messages: a no-op server (Python gRPC alone)")
    print(f"{'load':>8}{'conc':>6}{'rows/s':>11}{'ratio to in-process':>22}")
    rows = pixels[:1024]
    rate = local.rows_per_s(model_inputs(rows, binarization))
    latents = to_tensor(np.zeros((len(rows), latent_size), np.float32))
    answer = vae_pb2.EncodeResponse(mean=latents, stddev=latents)
    message = request(rows, binarization, "uint8")
    with noop_server(free_port(), answer) as target:
        for name, load in generators.items():
            for concurrency in (1, 4):
                r = load(target, message, concurrency, seconds, None)
                print(f"{name:>8}{concurrency:>6}{r['rows_per_s']:>11,.0f}{r['rows_per_s'] / rate:>22.2f}")


def protocol_table(
    served: Served,
    name: str,
    pixels: np.ndarray,
    binarization: str,
    seconds: float,
    generators: dict[str, Load],
    repeats: int,
) -> None:
    """The same Encode calls over each protocol, one server: per cell and generator, the protocols
    take turns ``repeats`` times and each figure is the median of its turns (a drift of the shared
    machine then moves all three alike)."""
    print(
        f"\n5. Encode over vae.v1, OIP gRPC and OIP REST (binary tensors), the same server "
        f"(rows/s, median of {repeats} turns)"
    )
    print(
        f"{'input':<8}{'batch':>6}{'conc':>6}"
        + "".join(f"{g + ' v1':>13}{'OIP gRPC':>11}{'ratio':>7}{'REST':>11}{'ratio':>7}" for g in generators)
    )
    targets = {"v1": served.target, "oip-grpc": served.target, "oip-http": served.http}
    for dtype in ("float32", "uint8"):
        for batch in BATCHES:
            for concurrency in (1, 8) if batch == 1 else (1, 4):
                message = request(pixels[:batch], binarization, dtype, name)
                line = f"{dtype:<8}{batch:>6}{concurrency:>6}"
                for load in generators.values():
                    turns: dict[str, list[float]] = {protocol: [] for protocol in targets}
                    for _ in range(repeats):
                        for protocol, target in targets.items():
                            figures = load(
                                target, message, concurrency, seconds, served.metrics_port, protocol
                            )
                            turns[protocol].append(figures["rows_per_s"])
                    v1, oip, rest = (float(np.median(turns[p])) for p in targets)
                    line += f"{v1:>13,.0f}{oip:>11,.0f}{oip / v1:>7.2f}{rest:>11,.0f}{rest / v1:>7.2f}"
                print(line, flush=True)


# The cells the Triton comparison is judged on (issue 14): (batch, concurrency), float32 bytes.
PEER_CELLS = ((1, 1), (1, 8), (256, 1), (256, 4), (1024, 1), (1024, 4))


def triton_table(
    model: Path,
    version: ModelVersion,
    pixels: np.ndarray,
    seconds: float,
    generators: dict[str, Load],
    repeats: int,
    threads: int,
) -> None:
    """vaeserve (defaults; vae.v1 and OIP gRPC) beside Triton serving the same encoder, both up at
    once, the three taking turns per cell; medians."""
    prepared = triton_peer.prepare()
    if isinstance(prepared, str):
        print(f"\n6. {prepared}")
        return
    tritonserver, site = prepared
    print(
        f"\n6. vaeserve beside Triton 2.51, float32 bytes (calls/s at batch 1, else rows/s; {repeats} turns)"
    )
    columns = ("vae.v1", "ratio", "OIP gRPC", "ratio", "Triton")
    print(
        f"{'batch':>6}{'conc':>6}{'load':>8}" + "".join(f"{c:>{7 if c == 'ratio' else 11}}" for c in columns)
    )
    encoder = version.graph_path("encoder")
    peer = triton_peer.triton(
        tritonserver, site, encoder, version.name, version.input_size, free_port(), threads
    )
    with server(model, None, workers=None) as served, peer as triton_target:
        targets = {
            "v1": (served.target, "v1"),
            "oip": (served.target, "oip-grpc"),
            "triton": (triton_target, "oip-grpc"),
        }
        for batch, concurrency in PEER_CELLS:
            message = request(pixels[:batch], version.manifest.binarization, "float32", version.name)
            figure = "calls_per_s" if batch == 1 else "rows_per_s"
            for name, load in generators.items():
                turns: dict[str, list[float]] = {label: [] for label in targets}
                for _ in range(repeats):
                    for label, (target, protocol) in targets.items():
                        metrics = served.metrics_port if target == served.target else None
                        turns[label].append(
                            load(target, message, concurrency, seconds, metrics, protocol)[figure]
                        )
                v1, oip, peer_rate = (float(np.median(turns[label])) for label in targets)
                print(
                    f"{batch:>6}{concurrency:>6}{name:>8}{v1:>11,.0f}{v1 / peer_rate:>7.2f}"
                    f"{oip:>11,.0f}{oip / peer_rate:>7.2f}{peer_rate:>11,.0f}",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="models/NAME/VERSION")
    parser.add_argument("--data-dir", type=Path, help="folder of the MNIST IDX files")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads, server and in-process")
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each load measurement")
    parser.add_argument("--soak-seconds", type=float, default=30.0, help="duration of the RSS soak run")
    parser.add_argument("--sections", default="1,2,3,4,5,6", help="which sections to run (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="section 5: turns of each protocol per cell")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    version = open_path(args.model)
    binarization = version.manifest.binarization
    pixels = load_dataset(version.manifest.dataset, args.data_dir, progress=False).test_images
    local = InProcess(version, args.threads)
    generators = loads()
    print(
        f"model {version.name}/{version.version}, {os.cpu_count()} cores, onnxruntime threads {args.threads}"
    )
    with server(args.model, args.threads, "--shared-memory") as served:
        if "1" in sections:
            throughput_table(served, local, pixels, binarization, args.seconds, generators)
        if "3" in sections:
            soak_table(served, pixels, binarization, args.soak_seconds)
        if "5" in sections:
            protocol_table(served, version.name, pixels, binarization, args.seconds, generators, args.repeats)
    if "2" in sections:
        latency_table(args.model, args.threads, pixels, binarization, args.seconds, generators)
    if "4" in sections:
        transport_ceiling(local, pixels, binarization, version.latent_size, args.seconds, generators)
    if "6" in sections:
        triton_table(args.model, version, pixels, args.seconds, generators, args.repeats, args.threads)


if __name__ == "__main__":
    main()
