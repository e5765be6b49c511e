"""gRPC and REST load from h2load (nghttp2's HTTP/2 and HTTP/1.1 benchmarking tool, in C).

The Python load generator (vaeserve/bench.py, `vae bench`) spends about as much CPU per call as the
server does, and on a 2-core machine it takes that CPU from the server: past ~3,000 calls/s
what it measures is itself. h2load sends the same gRPC message (a 5-byte frame header and
the serialized request) on ``concurrency`` connections, one call in flight on each, with a
fraction of the CPU. It cannot read gRPC's status, which travels in trailers, so each run
also reads the server's Prometheus counters and refuses a result with any call not OK.

Install it with `apt-get install nghttp2-client` (Debian, Ubuntu); without it the benchmark
prints the Python generator's rows only and says why.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from vaeserve._proto import vae_pb2
from vaeserve.bench import GRPC_PATHS, grpc_body, rest_request

# Status codes of calls that succeeded: gRPC's over gRPC, HTTP's over REST.
OK_CODES = ("OK", "200")
# Calls h2load itself abandons when its time is up (a closed connection): not the server's failures.
ABANDONED = ("CANCELLED", "499")
MISSING = "h2load not installed (apt-get install nghttp2-client): C load generator rows skipped"


def available() -> bool:
    return shutil.which("h2load") is not None


def grpc_frame(body: bytes) -> bytes:
    """A gRPC length-prefixed message: not compressed, 4-byte big-endian length, body."""
    return b"\0" + struct.pack(">I", len(body)) + body


def request_of(protocol: str, target: str, message: vae_pb2.EncodeRequest) -> tuple[str, bytes, list[str]]:
    """(URL, body, extra h2load flags) of one Encode call over ``protocol``: gRPC frames over
    HTTP/2, or REST's binary tensor data over HTTP/1.1."""
    if protocol == "oip-http":
        path, body, headers = rest_request(message)
        return f"http://{target}{path}", body, ["--h1", *(f"--header={k}: {v}" for k, v in headers.items())]
    flags = ["--header=content-type: application/grpc", "--header=te: trailers"]
    return f"http://{target}{GRPC_PATHS[protocol]}", grpc_frame(grpc_body(protocol, message)), flags


def calls_by_code(metrics_port: int) -> dict[str, float]:
    """`vaeserve_requests_total` by status code, summed over methods."""
    page = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name == "vaeserve_requests_total":
                code = sample.labels["code"]
                counts[code] = counts.get(code, 0.0) + sample.value
    return counts


def run_h2load(
    target: str,
    message: vae_pb2.EncodeRequest,
    concurrency: int,
    seconds: float,
    metrics_port: int | None = None,
    protocol: str = "v1",
) -> dict[str, float]:
    """Calls/s, rows/s and latency percentiles (ms) of Encode calls sent by h2load over
    ``protocol`` (vaeserve.bench.PROTOCOLS). With ``metrics_port`` the server's counters must show every
    call OK."""
    before = calls_by_code(metrics_port) if metrics_port else {}
    url, data, flags = request_of(protocol, target, message)
    with tempfile.TemporaryDirectory(prefix="vaeserve-h2load-") as folder:
        body, log = Path(folder) / "request.bin", Path(folder) / "requests.tsv"
        body.write_bytes(data)
        command = [
            "h2load",
            f"--duration={round(seconds * 1000)}ms",
            "--warm-up-time=500ms",
            f"--clients={concurrency}",
            "--max-concurrent-streams=1",
            *flags,
            f"--data={body}",
            f"--log-file={log}",
            url,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=False)
        done = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", result.stdout)
        counts = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", result.stdout)
        if result.returncode != 0 or not done or not counts or counts.group(1) != counts.group(2):
            raise RuntimeError(f"h2load failed:\n{result.stdout}\n{result.stderr}")
        # Columns: start (µs since the epoch), HTTP status, µs until the response ended.
        micros = np.loadtxt(log, usecols=2, ndmin=1)
    if metrics_port:
        _check_all_ok(before, calls_by_code(metrics_port), int(counts.group(2)))
    calls_per_s = float(done.group(2))
    return {
        "calls_per_s": calls_per_s,
        "rows_per_s": calls_per_s * int(message.inputs.shape[0]),
        "p50_ms": float(np.percentile(micros, 50)) / 1000,
        "p99_ms": float(np.percentile(micros, 99)) / 1000,
    }


def _check_all_ok(before: dict[str, float], after: dict[str, float], sent: int) -> None:
    delta = {code: after.get(code, 0.0) - before.get(code, 0.0) for code in after}
    failed = {code: n for code, n in delta.items() if code not in OK_CODES + ABANDONED and n}
    if failed or sum(delta.get(code, 0.0) for code in OK_CODES) < sent:
        raise RuntimeError(f"h2load sent {sent:,} calls; the server counted {delta}")
