"""The load generators of the service benchmark (vaeserve.h2load, vaeserve.bench), against the real server."""

from __future__ import annotations

import struct
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import servers

from vaeserve import h2load
from vaeserve._proto import vae_pb2
from vaeserve.bench import run_load
from vaeserve.codec import to_tensor


def encode_request(columns: int) -> vae_pb2.EncodeRequest:
    return vae_pb2.EncodeRequest(inputs=to_tensor(np.zeros((2, columns), np.uint8)))


def test_grpc_frame_is_length_prefixed() -> None:
    message = encode_request(784)
    frame = h2load.grpc_frame(message.SerializeToString())
    assert frame[0] == 0 and struct.unpack(">I", frame[1:5])[0] == len(frame) - 5
    assert vae_pb2.EncodeRequest.FromString(frame[5:]) == message


@pytest.mark.skipif(not h2load.available(), reason=h2load.MISSING)
def test_h2load_calls_are_counted_and_failures_refused(repo: Path, tmp_path: Path) -> None:
    with servers.running(repo, tmp_path / "serve.log") as server:
        result = h2load.run_h2load(server.target, encode_request(784), 2, 0.5, server.metrics_port)
        assert result["calls_per_s"] > 0 and result["rows_per_s"] == 2 * result["calls_per_s"]
        assert 0 < result["p50_ms"] <= result["p99_ms"]
        with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
            h2load.run_h2load(server.target, encode_request(5), 1, 0.5, server.metrics_port)


def test_load_generators_speak_every_protocol(repo: Path, tmp_path: Path) -> None:
    """The service benchmark's generators over vae.v1, OIP gRPC and OIP REST (binary tensors):
    each call reaches the server as the protocol's own method and succeeds."""
    message = vae_pb2.EncodeRequest(model="tiny", inputs=to_tensor(np.zeros((2, 784), np.uint8)))
    with servers.running(repo, tmp_path / "serve.log") as server:
        targets = {"v1": server.target, "oip-grpc": server.target, "oip-http": server.http}
        for protocol, target in targets.items():
            result = run_load(target, message, 2, 0.3, protocol=protocol)
            assert not result["errors"], result["errors"]
            assert result["calls_per_s"] > 0 and result["rows_per_s"] == 2 * result["calls_per_s"]
        if h2load.available():  # the parent builds h2load's body: REST only (see bench.oip_request)
            result = h2load.run_h2load(server.http, message, 2, 0.5, server.metrics_port, "oip-http")
            assert result["calls_per_s"] > 0
        page = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read()
    text = page.decode()
    for line in (
        'code="OK",method="Encode",model="tiny",protocol="v1"',
        'code="OK",method="ModelInfer",model="tiny",protocol="oip-grpc"',
        'code="200",method="ModelInfer",model="tiny",protocol="oip-http"',
    ):
        assert f"vaeserve_requests_total{{{line}}}" in text, line
