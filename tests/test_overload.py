"""Offered load far over capacity: every call is served or refused quickly, never left to wait
behind everything ahead of it, and the server's memory stays bounded."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import servers

from vaeserve._proto import vae_pb2, vae_pb2_grpc
from vaeserve.bench import rss_mb
from vaeserve.client import VaeClient
from vaeserve.codec import to_tensor

CALLERS = 32  # each with a batch-4,096 call in flight: 131,072 rows against a bound of 16,384
SECONDS = 4.0


def test_overload_is_served_or_refused_quickly(repo: Path, tmp_path: Path) -> None:
    flags = ("--workers", "1", "--max-queue-rows", "16384")
    with servers.running(repo, tmp_path / "serve.log", *flags) as server:
        request = vae_pb2.EncodeRequest(inputs=to_tensor(np.zeros((4096, 784), np.uint8)))
        outcomes: list[tuple[grpc.StatusCode, float]] = []
        stop = threading.Event()
        peak_rss = [0.0]

        def caller() -> None:
            with grpc.insecure_channel(server.target, options=[("grpc.enable_retries", 0)]) as channel:
                stub = vae_pb2_grpc.VaeServiceStub(channel)
                while not stop.is_set():
                    started = time.monotonic()
                    try:
                        stub.Encode(request, timeout=10)
                        code = grpc.StatusCode.OK
                    except grpc.RpcError as error:
                        code = error.code()
                    outcomes.append((code, time.monotonic() - started))
                    if code is not grpc.StatusCode.OK:
                        time.sleep(0.05)  # a refused caller backs off a little, as asked

        threads = [threading.Thread(target=caller) for _ in range(CALLERS)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + SECONDS
        while time.monotonic() < deadline:
            peak_rss[0] = max(peak_rss[0], rss_mb(server.process.pid))
            time.sleep(0.1)
        stop.set()
        for thread in threads:
            thread.join(30)
        codes = {code for code, _ in outcomes}
        served = sorted(t for code, t in outcomes if code is grpc.StatusCode.OK)
        refused = sorted(t for code, t in outcomes if code is grpc.StatusCode.RESOURCE_EXHAUSTED)
        print(  # the figures, with pytest -s
            f"{len(served)} served (p50 {served[len(served) // 2]:.2f} s, p99 "
            f"{served[int(0.99 * (len(served) - 1))]:.2f} s), {len(refused)} refused (p99 "
            f"{refused[int(0.99 * (len(refused) - 1))] * 1000:.0f} ms), peak RSS {peak_rss[0]:.0f} MB"
        )
        assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        assert served and refused
        # Refusals come at once; accepted calls wait only for the bounded work ahead of them.
        assert refused[int(0.99 * (len(refused) - 1))] < 1.0, refused[-5:]
        assert served[int(0.99 * (len(served) - 1))] < 5.0, served[-5:]
        assert peak_rss[0] < 1500, peak_rss[0]
        with VaeClient(server.target) as client:
            assert client.health() == "SERVING"
