"""Traffic splits and shadows (`vae traffic`, service.shadow): a repository `m` of three really
trained versions (1 and 2 the tiny run, 3 another run with 4 latents, so that its answers differ
and a Decode of 8 latents fails on it), a real server following it, real vae.v1 and OIP REST calls."""

from __future__ import annotations

import json
import os
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
import servers
from servers import metric
from test_cli import assert_one_line_error, vae

from vaeserve._proto import vae_pb2, vae_pb2_grpc
from vaeserve.codec import to_tensor
from vaeserve.datasets import model_inputs
from vaeserve.repository import copy_version

POLL = "0.2"
OTHER = {"hidden_sizes": [64], "latent_size": 4, "epochs": 1, "limit": 3000, "batch_size": 64, "seed": 3}


@pytest.fixture(scope="module")
def traffic_repo(tmp_path_factory, repo: Path, mnist, mnist_dir: Path) -> Path:
    from vaeserve.export.exporter import ExportRequest, export_model
    from vaeserve.training.config import resolve_config
    from vaeserve.training.trainer import start_or_resume

    other = tmp_path_factory.mktemp("other_run")
    start_or_resume(resolve_config("seed", None, OTHER), mnist, other, resume=False, progress=False).run()
    root = tmp_path_factory.mktemp("traffic") / "models"
    for number in (1, 2):
        copy_version(repo / "tiny" / "1", root, "m", number)
    export_model(ExportRequest(other, root, "m", iw_samples=10, data_dir=mnist_dir))  # version 3
    assert sorted(p.name for p in (root / "m").iterdir() if p.name.isdecimal()) == ["1", "2", "3"]
    return root


def answered_by(stub, request, calls: int) -> Counter:
    return Counter(stub.Encode(request, timeout=10).model.version for _ in range(calls))


def shadow_calls(server, method: str, outcome: str) -> float:
    return metric(server, "vaeserve_shadow_calls_total", version="3", method=method, outcome=outcome)


def test_a_weighted_split_with_a_shadow(traffic_repo: Path, tmp_path: Path, mnist) -> None:
    """`vae traffic m 1=80 2=20 --shadow 3`, followed live: 600 unversioned Encode calls answered
    by 1 or 2 in proportion, never by 3, each mirrored to 3 and counted with how far its answer
    was; the shadow's failures never reach a caller; OIP REST routed alike; the console's
    overview shows the split; --clear returns the calls to the latest."""
    rows = model_inputs(mnist.test_images[:2], "threshold")
    request = vae_pb2.EncodeRequest(model="m", inputs=to_tensor(rows))
    repo = str(traffic_repo)
    # One worker: it follows the split at once (several each follow it within a poll of their own).
    server = servers.start(traffic_repo, tmp_path / "serve.log", "--poll-s", POLL, "--workers", "1")
    channel = grpc.insecure_channel(server.target)
    try:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        assert answered_by(stub, request, 5) == {3: 5}  # no split: the latest

        result = vae("traffic", "--repo", repo, "--name", "m", "1=80", "2=20", "--shadow", "3")
        assert result.returncode == 0, result.stderr
        assert "m 1: 80% of calls naming no version" in result.stdout and "m 3: shadow" in result.stdout
        servers.until(lambda: "traffic of m: 1 80%, 2 20%, shadow 3" in server.output(), what="the split")

        counts = answered_by(stub, request, 600)
        assert set(counts) <= {1, 2} and 0.12 <= counts[2] / 600 <= 0.28, counts
        named = vae_pb2.EncodeRequest(model="m", version="3", inputs=request.inputs)
        assert answered_by(stub, named, 3) == {3: 3}  # a call naming a version goes there

        def mirrored() -> float:
            return shadow_calls(server, "encode", "answered") + shadow_calls(server, "encode", "dropped")

        servers.until(lambda: mirrored() == 600, what="600 mirrored Encode calls counted")
        assert shadow_calls(server, "encode", "answered") >= 1
        histogram = "vaeserve_shadow_max_abs_difference"
        # 3's latents are 4 wide, 1's and 2's 8: no Encode output compares, so none is measured.
        assert metric(server, f"{histogram}_count", version="3", method="encode") == 0
        # Reconstruct's probs [2, 784] compare: each mirrored call's difference is measured.
        reconstruct = vae_pb2.ReconstructRequest(model="m", inputs=request.inputs, seed=5)
        assert {stub.Reconstruct(reconstruct, timeout=10).model.version for _ in range(30)} <= {1, 2}
        servers.until(lambda: shadow_calls(server, "reconstruct", "answered") == 30, what="30 mirrored calls")
        assert metric(server, f"{histogram}_count", version="3", method="reconstruct") == 30
        assert metric(server, f"{histogram}_sum", version="3", method="reconstruct") > 0  # another model

        # A Decode of 8 latents fails on the shadow (it has 4): its callers never see it.
        decode = vae_pb2.DecodeRequest(model="m", latents=to_tensor(np.zeros((2, 8), np.float32)))
        assert set(answered_by_decode(stub, decode, 20)) <= {1, 2}
        servers.until(lambda: shadow_calls(server, "decode", "failed") == 20, what="20 failed shadow calls")

        # OIP REST's unversioned calls are routed by the same split, and name their version.
        tensor = {"name": "x", "datatype": "FP32", "shape": [2, 784], "data": rows.ravel().tolist()}
        body = json.dumps({"inputs": [tensor]}).encode()
        url = f"http://{server.http}/v2/models/m-encoder/infer"
        versions: Counter = Counter()
        for _ in range(40):
            call = urllib.request.Request(url, body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(call, timeout=10) as answer:
                versions[json.loads(answer.read())["model_version"]] += 1
        assert set(versions) <= {"1", "2"} and versions["1"] > versions["2"], versions

        overview = json.loads(urllib.request.urlopen(f"http://{server.http}/v2/console/models").read())
        [model] = overview["models"]
        assert model["traffic"]["shadow"] == {"key": "3", "version": 3}
        assert [(s["version"], s["share"]) for s in model["traffic"]["shares"]] == [(1, 0.8), (2, 0.2)]

        assert vae("traffic", "--repo", repo, "--name", "m", "--clear").returncode == 0
        servers.until(lambda: "traffic of m: none; the latest answers" in server.output(), what="clearing")
        assert answered_by(stub, request, 20) == {3: 20}
    finally:
        channel.close()
        assert server.stop() == 0, server.output()


def answered_by_decode(stub, request, calls: int) -> Counter:
    return Counter(stub.Decode(request, timeout=10).model.version for _ in range(calls))


def test_traffic_refuses_what_it_cannot_route(traffic_repo: Path, tmp_path: Path) -> None:
    repo = str(traffic_repo)
    for arguments, fragment in (
        (["1=80", "7=20"], "m has no version 7"),
        (["1=80", "canary=20"], "m has no label 'canary'"),
        (["1=0"], "expected KEY=WEIGHT with a weight above 0"),
        (["1=100", "--shadow", "1"], "--shadow 1: it already answers callers"),
        (["--shadow", "3"], "--shadow needs the split it mirrors"),
        (["--clear", "1=100"], "--clear removes the split"),
    ):
        assert_one_line_error(vae("traffic", "--repo", repo, "--name", "m", *arguments), 1, fragment)
    assert not (traffic_repo / "m" / "traffic.json").exists() or json.loads(
        (traffic_repo / "m" / "traffic.json").read_text()
    )  # never half-written
    (traffic_repo / "m" / "traffic.json").write_text('{"weights": {"1": -3}}')
    with servers.running(traffic_repo, tmp_path / "serve.log") as server:
        assert "refusing the traffic split of m" in server.output()
    os.unlink(traffic_repo / "m" / "traffic.json")
