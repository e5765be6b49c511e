"""Several replicas behind one client: calls spread over them, and a replica that goes is skipped."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import servers

from vaeserve.client import VaeClient, channel_target
from vaeserve.errors import VaeError


def ok_calls(server: servers.Server) -> float:
    page = (
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    )
    found = re.search(r'vaeserve_requests_total\{code="OK",method="Encode",protocol="v1"\} (\S+)', page)
    return float(found.group(1)) if found else 0.0


def test_calls_spread_over_replicas_and_survive_one_going(repo: Path, tmp_path: Path) -> None:
    first = servers.start(repo, tmp_path / "a.log", "--workers", "1")
    second = servers.start(repo, tmp_path / "b.log", "--workers", "1")
    pixels = np.zeros((1, 784), np.uint8)
    try:
        with VaeClient(f"{first.target},{second.target}", timeout=10) as client:
            for _ in range(20):
                client.encode(pixels)
            assert ok_calls(first) >= 5 and ok_calls(second) >= 5  # round robin, not one replica
            first.stop()
            for _ in range(20):  # every call still answered: the gone replica is skipped
                assert client.encode(pixels)["mean"].shape == (1, 8)
            assert ok_calls(second) >= 25
    finally:
        first.stop()
        second.stop()


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
