"""Bounded residency (`--max-loaded-models`, service.residency): a repository of three models
(the tiny run under three names), a real server that may hold two, calls rotating over all
three over vae.v1 and OIP REST."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import grpc
import pytest
import servers
from servers import metric

from vaeserve._proto import vae_pb2, vae_pb2_grpc
from vaeserve.codec import to_tensor
from vaeserve.datasets import model_inputs
from vaeserve.repository import copy_version
from vaeserve.service.residency import Residency

NAMES = ("a", "b", "c")


@pytest.fixture(scope="module")
def three_models(tmp_path_factory, repo: Path) -> Path:
    root = tmp_path_factory.mktemp("residency") / "models"
    for name in NAMES:
        copy_version(repo / "tiny" / "1", root, name, 1)
    return root


def loaded(server) -> float:
    return metric(server, "vaeserve_models_loaded")


def test_calls_rotating_over_three_models_with_room_for_two(
    three_models: Path, tmp_path: Path, mnist
) -> None:
    """Each call names a model; one not loaded is loaded for it (the least recently called
    evicted), so every call succeeds, answered by the model it named, while the gauge stays at 1
    or 2; OIP REST's calls load alike, and the console's overview says which are not resident."""
    rows = model_inputs(mnist.test_images[:4], "threshold")
    with servers.running(
        three_models, tmp_path / "serve.log", "--max-loaded-models", "2", "--workers", "1"
    ) as server:
        assert "bounded residency: loading a, b now; c on their first call" in server.output()
        assert loaded(server) == 2
        seen = set()
        with grpc.insecure_channel(server.target) as channel:
            stub = vae_pb2_grpc.VaeServiceStub(channel)
            for call in range(12):
                name = NAMES[call % 3]
                answer = stub.Encode(vae_pb2.EncodeRequest(model=name, inputs=to_tensor(rows)), timeout=30)
                assert answer.model.name == name and answer.mean.shape == [4, 8]
                seen.add(loaded(server))
        assert seen <= {1, 2}, seen
        output = server.output()
        assert "evicted a (least recently called, to load c" in output
        assert "loaded c on demand" in output
        # After the rotation, c and b are loaded (a was evicted last): a REST call to a loads it.
        body = json.dumps(
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [4, 784], "data": rows.ravel().tolist()}]}
        ).encode()
        url = f"http://{server.http}/v2/models/a-encoder/infer"
        request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert json.loads(answer.read())["model_name"] == "a-encoder"
        with urllib.request.urlopen(f"http://{server.http}/v2/console/models", timeout=10) as answer:
            models = json.loads(answer.read())["models"]
        states = {m["name"]: (m["versions"][0]["state"], m["versions"][0]["reason"]) for m in models}
        assert states["a"][0] == "READY" and states["c"][0] == "READY", states
        assert states["b"] == ("UNLOADED", "not resident: the next call naming it loads it")
        assert loaded(server) == 2


def test_the_byte_bound_counts_graph_bytes() -> None:
    """--max-loaded-mb: a model joins while the graphs' bytes fit; at least one is always loaded."""
    bounded = Residency(None, 0, 1000)
    assert bounded.fits({}, 5000)  # alone, whatever its size
    assert bounded.fits({"a": 400}, 600) and not bounded.fits({"a": 400}, 601)
    both = Residency(None, 2, 1000)
    assert not both.fits({"a": 1, "b": 1}, 1)
    assert not Residency(None, 0, 0).bounded and both.bounded
