"""Several replicas behind one client: calls spread over them, and a replica killed mid-load is
skipped without a failed call."""

from __future__ import annotations

import re
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import servers

from vaeserve.client import VaeClient, channel_target
from vaeserve.datasets import model_inputs
from vaeserve.errors import VaeError
from vaeserve.repository import resolve
from vaeserve.runtime import OnnxPair

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def ok_calls(server: servers.Server) -> float:
    labels = r'code="OK",method="Encode",model="tiny",protocol="v1"'
    found = re.search(rf"vaeserve_requests_total\{{{labels}\}} (\S+)", server.metrics())
    return float(found.group(1)) if found else 0.0


def test_three_replicas_one_killed_mid_load_no_failed_call(repo: Path, tmp_path: Path, mnist) -> None:
    port = servers.free_port()  # the same port on three loopback addresses
    replicas = [
        servers.start(repo, tmp_path / f"{host}.log", "--workers", "1", host=host, port=port)
        for host in HOSTS
    ]
    pixels = mnist.test_images[:64]
    expected = OnnxPair.load(resolve(repo, "tiny")).encode(model_inputs(pixels, "threshold"))[0]
    failures: list[BaseException] = []
    answered = [0]
    stop = threading.Event()

    def caller(client: VaeClient) -> None:
        while not stop.is_set():
            try:
                mean = client.encode(pixels)["mean"]
                np.testing.assert_allclose(mean, expected, atol=1e-6, rtol=0)  # every result correct
                answered[0] += 1
            except BaseException as exc:
                failures.append(exc)
                return

    target = ",".join(f"{host}:{port}" for host in HOSTS)
    try:
        with VaeClient(target, timeout=20) as client:
            threads = [threading.Thread(target=caller, args=(client,)) for _ in range(4)]
            for thread in threads:
                thread.start()
            while answered[0] < 60 and not failures:
                threading.Event().wait(0.05)
            assert all(ok_calls(r) > 0 for r in replicas)  # round robin reaches every replica
            replicas[0].process.send_signal(signal.SIGKILL)  # mid-load, calls in flight on it
            before = answered[0]
            while answered[0] < before + 100 and not failures:
                threading.Event().wait(0.05)
            stop.set()
            for thread in threads:
                thread.join(60)
        assert not failures, failures[0]
        assert ok_calls(replicas[1]) > 0 and ok_calls(replicas[2]) > 0
    finally:
        stop.set()
        for replica in replicas:
            replica.stop()


@pytest.mark.parametrize(
    ("given", "target"),
    [
        ("127.0.0.1:50051", "127.0.0.1:50051"),
        ("10.0.0.1:50051,10.0.0.2:50051", "ipv4:10.0.0.1:50051,10.0.0.2:50051"),
        ("[::1]:50051,[::2]:50051", "ipv6:[::1]:50051,[::2]:50051"),
        ("ipv4:10.0.0.1:1,10.0.0.2:2", "ipv4:10.0.0.1:1,10.0.0.2:2"),
        ("dns:///vaeserve.default.svc:50051", "dns:///vaeserve.default.svc:50051"),
    ],
)
def test_targets(given: str, target: str) -> None:
    assert channel_target(given) == target


def test_a_list_of_host_names_is_refused_with_the_way_out() -> None:
    with pytest.raises(VaeError, match="dns:///NAME:PORT"):
        channel_target("a.example:50051,b.example:50051")
