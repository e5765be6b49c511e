"""Soak: mixed calls on both protocols, a share of them bad, and a worker SIGKILLed now and then.

`python -m benchmarks.soak --model models/mnist/1 --minutes 10` starts `vae serve` with its
defaults (one worker per core) and runs callers that mix vae.v1 Encode, Decode and SamplePrior
(VaeClient, which sends a call that met UNAVAILABLE again) with OIP REST infer calls; a share
of calls is bad on purpose (a wrong shape, NaN, an unknown model) and must get its documented
client error. Every ``--kill-every-s`` seconds one worker is SIGKILLed; the supervisor restarts
it. Printed at the end: calls by kind, answers by status, good calls that failed (the figure
that must be 0), bad calls answered otherwise than documented, worker restarts, and the
server's RSS and open file descriptors at start and end.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks.service_throughput import server
from vaeserve.client import RESEND_BACKOFF_S, ServiceError, VaeClient
from vaeserve.datasets import load_dataset
from vaeserve.repository import open_path

BAD_CODES = {"INVALID_ARGUMENT", "NOT_FOUND", "400", "404"}


def processes(root: int) -> list[int]:
    """The supervisor and its workers."""
    children = Path(f"/proc/{root}/task/{root}/children")
    return [root, *(int(p) for p in children.read_text().split())] if children.exists() else [root]


def footprint(root: int) -> tuple[float, int]:
    """RSS in MB and open file descriptors, over the supervisor and its workers."""
    rss, fds = 0.0, 0
    for pid in processes(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rss += int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, AttributeError):
            continue
    return rss, fds


class Soak:
    def __init__(
        self, target: str, http: str, name: str, latent_size: int, pixels: np.ndarray, bad_fraction: float
    ) -> None:
        self.target, self.http, self.name, self.pixels = target, http, name, pixels
        self.latent_size = latent_size
        self.bad_fraction = bad_fraction
        self.calls: collections.Counter[str] = collections.Counter()
        self.codes: collections.Counter[str] = collections.Counter()
        self.lost: list[str] = []  # good calls that failed, bad ones answered wrongly
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def caller(self, seed: int) -> None:
        rng = random.Random(seed)
        with VaeClient(self.target, timeout=30) as client:
            while not self.stop.is_set():
                bad = rng.random() < self.bad_fraction
                kind = rng.choice(["encode", "decode", "sample-prior", "rest"])
                code = self.call(client, kind, bad, rng)
                with self.lock:
                    self.calls[f"{kind}{' (bad)' if bad else ''}"] += 1
                    self.codes[code] += 1
                    if (code in BAD_CODES) != bad or (not bad and code not in ("OK", "200")):
                        self.lost.append(f"{kind} bad={bad}: {code}")

    def call(self, client: VaeClient, kind: str, bad: bool, rng: random.Random) -> str:
        if kind == "rest":
            return self.rest(bad)
        if bad:  # straight to the server: the client would catch some of these itself
            return raw_code(client, kind)
        rows = self.pixels[rng.randrange(0, len(self.pixels) - 64) :][:64]
        try:
            if kind == "encode":
                client.encode(rows)
            elif kind == "decode":
                client.decode(np.zeros((8, self.latent_size), np.float32))
            else:
                client.sample_prior(16, seed=rng.randrange(1000))
        except ServiceError as exc:
            return exc.code.name
        return "OK"

    def rest(self, bad: bool) -> str:
        model = "nope-sample-prior" if bad else f"{self.name}-sample-prior"
        body = {"inputs": [{"name": "count", "datatype": "INT64", "shape": [1], "data": [4]}]}
        request = urllib.request.Request(
            f"http://{self.http}/v2/models/{model}/infer", data=json.dumps(body).encode(), method="POST"
        )
        for pause in RESEND_BACKOFF_S:  # a worker that dies mid-call: send again, as VaeClient does
            try:
                with urllib.request.urlopen(request, timeout=30) as answer:
                    return str(answer.status)
            except urllib.error.HTTPError as error:
                return str(error.code)
            except (urllib.error.URLError, ConnectionError):
                time.sleep(pause)
        return "unreachable"


def raw_code(client: VaeClient, kind: str) -> str:
    """A bad call of ``kind``: a row one column short, NaN latents, an unknown model."""
    import grpc

    from vaeserve._proto import vae_pb2
    from vaeserve.codec import to_tensor

    calls = {
        "encode": (client.stub.Encode, vae_pb2.EncodeRequest(inputs=to_tensor(np.zeros((2, 783), np.uint8)))),
        "decode": (
            client.stub.Decode,
            vae_pb2.DecodeRequest(latents=to_tensor(np.full((2, 4), np.nan, np.float32))),
        ),
        "sample-prior": (client.stub.SamplePrior, vae_pb2.SamplePriorRequest(model="nope", count=4)),
    }
    method, request = calls[kind]
    for pause in RESEND_BACKOFF_S:
        try:
            method(request, timeout=30)
            return "OK"
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                return error.code().name
            time.sleep(pause)  # a worker died with the call: send it again
    return "UNAVAILABLE"


def workers(root: int) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    found = []
    for pid in processes(root)[1:]:
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def killer(root: int, every: float, stop: threading.Event, killed: list[int]) -> None:
    while not stop.wait(every):
        live = workers(root)
        if live:
            victim = random.choice(live)
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="models/NAME/VERSION")
    parser.add_argument("--data-dir", type=Path, help="folder of the MNIST IDX files")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--callers", type=int, default=6)
    parser.add_argument("--bad-fraction", type=float, default=0.05)
    parser.add_argument(
        "--kill-every-s", type=float, default=30.0, help="SIGKILL a worker this often (0: never)"
    )
    args = parser.parse_args()
    version = open_path(args.model)
    pixels = load_dataset(version.manifest.dataset, args.data_dir, progress=False).test_images
    with server(args.model, None, workers=None) as served:
        start_rss, start_fds = footprint(served.pid)
        soak = Soak(served.target, served.http, version.name, version.latent_size, pixels, args.bad_fraction)
        killed: list[int] = []
        threads = [threading.Thread(target=soak.caller, args=(i,)) for i in range(args.callers)]
        if args.kill_every_s:
            threads.append(
                threading.Thread(target=killer, args=(served.pid, args.kill_every_s, soak.stop, killed))
            )
        started = time.monotonic()
        for thread in threads:
            thread.start()
        soak.stop.wait(args.minutes * 60)
        soak.stop.set()
        for thread in threads:
            thread.join(120)
        elapsed = time.monotonic() - started
        end_rss, end_fds = footprint(served.pid)
        page = (
            urllib.request.urlopen(f"http://127.0.0.1:{served.metrics_port}/metrics", timeout=10)
            .read()
            .decode()
        )
        restarts = re.search(r"^vaeserve_worker_restarts_total (\S+)", page, re.MULTILINE)
    total = sum(soak.calls.values())
    print(f"soak: {elapsed / 60:.1f} min, {args.callers} callers, {total:,} calls ({total / elapsed:,.0f}/s)")
    print("calls:", dict(sorted(soak.calls.items())))
    print("answers:", dict(sorted(soak.codes.items())))
    print(f"workers SIGKILLed: {len(killed)}, restarted: {restarts.group(1) if restarts else 'n/a'}")
    print(f"good calls failed or bad calls answered wrongly: {len(soak.lost)} {soak.lost[:5]}")
    print(f"server RSS {start_rss:.0f} -> {end_rss:.0f} MB, open fds {start_fds} -> {end_fds}")


if __name__ == "__main__":
    main()
