"""This checkout beside a baseline build of vaeserve, side by side in one run: after a change
that should not move performance, the ratios say whether it did.

Build the baseline from any commit (no dependencies; it runs in this environment):

    git worktree add /tmp/base COMMIT
    pip install --no-deps --no-build-isolation --target /tmp/base-pkg /tmp/base
    python -m benchmarks.compare --baseline /tmp/base-pkg --model models/mnist/1 \
        --data-dir ../shared/data/mnist

Service: a server of each build (`--workers 1`, one process; the other idles meanwhile) under
`vae bench`'s load generator, the builds taking turns per cell, the median of --repeats runs of
each. Embedding: `vae embed`'s local engine of each build on the same rows, taking turns.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from vaeserve._proto import vae_pb2
from vaeserve.bench import run_load
from vaeserve.client import VaeClient
from vaeserve.codec import to_tensor
from vaeserve.datasets import load_dataset
from vaeserve.repository import open_path

CELLS = ((1, 1), (1, 8), (256, 4), (1024, 1))  # (batch rows, concurrent callers)
PROTOCOLS = ("v1", "oip-grpc", "oip-http")
WITHOUT_TORCH = (
    "import sys; sys.modules['torch'] = None\nfrom vaeserve.cli import main\nsys.exit(main(sys.argv[1:]))"
)


def environment(baseline: Path | None) -> dict[str, str]:
    """This checkout's vaeserve, or the baseline's ahead of it on the path."""
    env = dict(os.environ)
    if baseline is not None:
        env["PYTHONPATH"] = f"{baseline}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(repo: Path, baseline: Path | None, log: Path) -> Iterator[tuple[str, str]]:
    """(gRPC target, HTTP host:port) of a `vae serve` of one build."""
    port, http = free_port(), free_port()
    command = [sys.executable, "-c", WITHOUT_TORCH, "serve", "--repo", str(repo), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--http-port", str(http), "--metrics-port", "0", "--workers", "1"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=environment(baseline))
    try:
        with VaeClient(f"127.0.0.1:{port}", timeout=5) as client:
            if not client.wait_until_serving(120):
                raise RuntimeError(f"server did not start:\n{log.read_text()}")
        yield f"127.0.0.1:{port}", f"127.0.0.1:{http}"
    finally:
        process.terminate()
        process.wait(60)


def service(repo: Path, name: str, pixels: np.ndarray, builds: dict, seconds: float, repeats: int) -> list:
    rows = []
    with (
        tempfile.TemporaryDirectory() as logs,
        server(repo, builds["baseline"], Path(logs) / "b.log") as base,
        server(repo, None, Path(logs) / "c.log") as current,
    ):
        targets = {"baseline": base, "current": current}
        for protocol in PROTOCOLS:
            for batch, concurrency in CELLS:
                request = vae_pb2.EncodeRequest(model=name, inputs=to_tensor(pixels[:batch]))
                runs: dict[str, list[float]] = {"baseline": [], "current": []}
                for _ in range(repeats):
                    for build, (grpc_target, http_target) in targets.items():
                        target = http_target if protocol == "oip-http" else grpc_target
                        figures = run_load(target, request, concurrency, seconds, protocol=protocol)
                        if figures["errors"]:
                            raise RuntimeError(f"{build} {protocol}: {figures['errors']}")
                        runs[build].append(figures["rows_per_s"])
                base, now = (statistics.median(runs[b]) for b in ("baseline", "current"))
                rows.append((protocol, batch, concurrency, base, now))
                cells = f"{protocol} | {batch:,} | {concurrency} | {base:,.0f} | {now:,.0f}"
                print(f"| {cells} | {now / base:.2f} |")
    return rows


EMBED = """
import json, sys, time
from pathlib import Path
from vaeserve.embed.job import EmbedRequest, run
model, source, output = map(Path, sys.argv[1:4])
summary = run(EmbedRequest(model, source, output, force=True), progress=False)
print(json.dumps(summary))
"""


def embed(model: Path, pixels: np.ndarray, builds: dict, repeats: int) -> tuple[float, float]:
    runs: dict[str, list[float]] = {"baseline": [], "current": []}
    with tempfile.TemporaryDirectory() as work:
        source = Path(work) / "rows.npy"
        np.save(source, pixels)
        for _ in range(repeats):
            for build, baseline in builds.items():
                output = Path(work) / f"{build}.parquet"
                command = [sys.executable, "-c", EMBED, str(model), str(source), str(output)]
                done = subprocess.run(
                    command, env=environment(baseline), capture_output=True, text=True, check=True
                )
                runs[build].append(json.loads(done.stdout.strip().splitlines()[-1])["rows_per_s"])
    base, now = (statistics.median(runs[b]) for b in ("baseline", "current"))
    print(f"| embed, local engine, {len(pixels):,} rows | {base:,.0f} | {now:,.0f} | {now / base:.2f} |")
    return base, now


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--baseline", type=Path, required=True, help="a folder holding the baseline's vaeserve"
    )
    parser.add_argument("--model", type=Path, required=True, help="models/NAME/VERSION")
    parser.add_argument("--data-dir", type=Path, help="folder of the MNIST IDX files")
    parser.add_argument("--seconds", type=float, default=2.0, help="each load run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each build per cell; the median")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: service, embed")
    args = parser.parse_args()
    version = open_path(args.model)
    dataset = load_dataset(version.manifest.dataset, args.data_dir, progress=False)
    pixels = dataset.test_images
    builds = {"baseline": args.baseline.resolve(), "current": None}
    started = time.perf_counter()
    if "service" not in args.skip:
        print("| protocol | batch | callers | baseline rows/s | current rows/s | ratio |")
        print("|---|---|---|---|---|---|")
        service(version.path.parent.parent, version.name, pixels, builds, args.seconds, args.repeats)
    if "embed" not in args.skip:
        print("| job | baseline rows/s | current rows/s | ratio |\n|---|---|---|---|")
        embed(version.path, np.concatenate([dataset.train_images, pixels]), builds, args.repeats)
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
