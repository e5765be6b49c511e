"""One error policy and one access policy over every front end: each mistake docs/protocol.md
tabulates is sent over vae.v1, OIP gRPC and OIP REST, and must get the table's gRPC status (both
gRPC protocols) and HTTP code (REST). The table is read from the page itself, so the page and the
server cannot drift apart."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from vaeserve._proto import vae_pb2, vae_pb2_grpc
from vaeserve.codec import to_tensor
from vaeserve.service import policy

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "policy-token"
D, M = 784, 8
MAX_REQUEST_ROWS, MAX_QUEUE_ROWS, MAX_IW_SAMPLES = 64, 32, 10
ROW = re.compile(r"^\| [^|]+ \| `([a-z0-9-]+)` \| (all|OIP) \| ([A-Z_]+) \| (\d{3}) \|$")


def documented() -> list[tuple[str, str, str, int]]:
    rows = [ROW.match(line) for line in (ROOT / "docs" / "protocol.md").read_text().splitlines()]
    return [(m[1], m[2], m[3], int(m[4])) for m in rows if m]


def test_the_table_follows_googles_mapping() -> None:
    table = documented()
    assert len(table) >= 16
    for mistake, _, status, http in table:
        assert policy.HTTP[grpc.StatusCode[status]] == http, mistake


def test_a_status_is_found_through_the_class_hierarchy() -> None:
    """A new subclass answers as its parent does; an unknown exception is INTERNAL."""
    from vaeserve.errors import ModelNotFoundError, VaeError

    class LabelNotFoundError(ModelNotFoundError):
        pass

    assert policy.grpc_status(LabelNotFoundError("x")) is grpc.StatusCode.NOT_FOUND
    assert policy.http_status(LabelNotFoundError("x")) == 404
    assert policy.grpc_status(type("NewError", (VaeError,), {})("x")) is grpc.StatusCode.FAILED_PRECONDITION
    assert policy.grpc_status(KeyError("x")) is grpc.StatusCode.INTERNAL


@pytest.fixture(scope="module")
def server(serve):
    return serve(
        "--max-request-rows",
        str(MAX_REQUEST_ROWS),
        "--max-queue-rows",
        str(MAX_QUEUE_ROWS),
        "--max-iw-samples",
        str(MAX_IW_SAMPLES),
        token=TOKEN,
    )


# -- each mistake as a call: (rpc, model, version, tensor name → array, parameters) -------------
def pixels(rows: int, columns: int = D) -> np.ndarray:
    return np.zeros((rows, columns), np.uint8)


def floats(value: float) -> np.ndarray:
    x = np.full((2, D), 0.5, np.float32)
    x[1, 3] = value
    return x


MISTAKES: dict[str, dict] = {
    "wrong-columns": {"rpc": "encode", "x": pixels(2, 5)},
    "empty-batch": {"rpc": "encode", "x": pixels(0)},
    "too-many-rows": {"rpc": "encode", "x": pixels(MAX_REQUEST_ROWS + 1)},
    "not-finite": {"rpc": "encode", "x": floats(np.nan)},
    "out-of-range": {"rpc": "encode", "x": floats(2.0)},
    "binary-uint8": {"rpc": "encode", "x": np.eye(2, D, dtype=np.uint8)},
    "wrong-dtype": {"rpc": "decode", "z": np.zeros((2, M), np.uint8)},
    "bad-count": {"rpc": "sample-prior", "count": 0},
    "too-many-iw-samples": {"rpc": "score", "x": pixels(2), "iw_samples": MAX_IW_SAMPLES + 1},
    "unknown-model": {"rpc": "encode", "x": pixels(2), "model": "nosuch"},
    "unknown-version": {"rpc": "encode", "x": pixels(2), "version": "99"},
    "encode-over-queue": {"rpc": "encode", "x": pixels(MAX_QUEUE_ROWS + 16)},
    "score-over-queue": {"rpc": "score", "x": pixels(MAX_QUEUE_ROWS + 16), "iw_samples": MAX_IW_SAMPLES},
    "no-token": {"rpc": "encode", "x": pixels(2), "token": None},
    "wrong-token": {"rpc": "encode", "x": pixels(2), "token": "not-it"},
    "unknown-parameter": {"rpc": "encode", "x": pixels(2), "parameters": {"temperature": 1}},
    "admin-off": {"rpc": "repository-index"},
}


def metadata(call: dict) -> tuple:
    token = call.get("token", TOKEN)
    return (("authorization", f"Bearer {token}"),) if token else ()


def v1_status(target: str, call: dict) -> grpc.StatusCode:
    model, version = call.get("model", "tiny"), call.get("version", "")
    requests = {
        "encode": lambda: ("Encode", vae_pb2.EncodeRequest(inputs=to_tensor(call["x"]))),
        "decode": lambda: ("Decode", vae_pb2.DecodeRequest(latents=to_tensor(call["z"]))),
        "sample-prior": lambda: ("SamplePrior", vae_pb2.SamplePriorRequest(count=call["count"])),
        "score": lambda: (
            "Score",
            vae_pb2.ScoreRequest(inputs=to_tensor(call["x"]), iw_samples=call.get("iw_samples", 1)),
        ),
    }
    method, request = requests[call["rpc"]]()
    request.model, request.version = model, version
    with grpc.insecure_channel(target) as channel:
        try:
            getattr(vae_pb2_grpc.VaeServiceStub(channel), method)(
                request, timeout=30, metadata=metadata(call)
            )
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def oip_inputs(call: dict) -> list[tuple[str, str, np.ndarray]]:
    if "count" in call:
        return [("count", "INT64", np.array([call["count"]], np.int64))]
    name = "z" if "z" in call else "x"
    array = call[name]
    return [(name, "UINT8" if array.dtype == np.uint8 else "FP32", array)]


def oip_parameters(call: dict) -> dict:
    return {
        **({"iw_samples": call["iw_samples"]} if "iw_samples" in call else {}),
        **call.get("parameters", {}),
    }


def oip_grpc_status(target: str, call: dict) -> grpc.StatusCode:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            if call["rpc"] == "repository-index":
                stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30, metadata=metadata(call))
                return grpc.StatusCode.OK
            request = pb.ModelInferRequest(
                model_name=f"{call.get('model', 'tiny')}-{DECODER.get(call['rpc'], call['rpc'])}",
                model_version=call.get("version", ""),
            )
            for name, datatype, array in oip_inputs(call):
                request.inputs.add(name=name, datatype=datatype, shape=array.shape)
                request.raw_input_contents.append(array.tobytes())
            for key, value in oip_parameters(call).items():
                request.parameters[key].int64_param = value
            stub.ModelInfer(request, timeout=30, metadata=metadata(call))
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


# vae.v1's names → the OIP model suffixes.
DECODER = {"encode": "encoder", "decode": "decoder"}


def rest_status(http: str, call: dict) -> int:
    headers = {"Authorization": f"Bearer {call.get('token', TOKEN)}"} if call.get("token", TOKEN) else {}
    if call["rpc"] == "repository-index":
        url, body = f"http://{http}/v2/repository/index", b"{}"
    else:
        version = f"/versions/{call['version']}" if "version" in call else ""
        model = f"{call.get('model', 'tiny')}-{DECODER.get(call['rpc'], call['rpc'])}"
        url = f"http://{http}/v2/models/{model}{version}/infer"
        inputs, chunks = [], []
        for name, datatype, array in oip_inputs(call):
            chunk = array.tobytes()
            params = {"binary_data_size": len(chunk)}
            inputs.append(
                {"name": name, "datatype": datatype, "shape": list(array.shape), "parameters": params}
            )
            chunks.append(chunk)
        header = json.dumps({"inputs": inputs, "parameters": oip_parameters(call)}).encode()
        body = header + b"".join(chunks)
        headers["Inference-Header-Content-Length"] = str(len(header))
    request = urllib.request.Request(url, body, headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        assert "error" in json.loads(exc.read()), url
        return exc.code


@pytest.mark.parametrize(("mistake", "over", "status", "http"), documented(), ids=lambda v: str(v))
def test_each_documented_mistake_gets_the_tables_status_over_every_protocol(
    server, mistake: str, over: str, status: str, http: int
) -> None:
    call = MISTAKES[mistake]
    protocols: dict[str, Callable[[], object]] = {
        "oip-grpc": lambda: oip_grpc_status(server.target, call).name,
        "oip-http": lambda: rest_status(server.http, call),
    }
    if over == "all":
        protocols["v1"] = lambda: v1_status(server.target, call).name
    answers = {protocol: ask() for protocol, ask in protocols.items()}
    expected = {p: http if p == "oip-http" else status for p in protocols}
    assert answers == expected


def test_model_ready_of_a_model_not_served_is_not_ready_over_both_oip_protocols(server) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert not stub.ModelReady(pb.ModelReadyRequest(name="nosuch-encoder"), timeout=30).ready
        assert stub.ModelReady(pb.ModelReadyRequest(name="tiny-encoder"), timeout=30).ready
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://{server.http}/v2/models/nosuch-encoder/ready", timeout=30)
    assert refused.value.code == 404
    with urllib.request.urlopen(f"http://{server.http}/v2/models/tiny-encoder/ready", timeout=30) as answer:
        assert answer.status == 200


def test_a_score_over_the_queue_bound_is_refused_at_once_naming_the_limit(server) -> None:
    """Score passes admission as Encode does: refused up front, the message naming the bound."""
    call = MISTAKES["score-over-queue"]
    with grpc.insecure_channel(server.target) as channel:
        request = vae_pb2.ScoreRequest(model="tiny", inputs=to_tensor(call["x"]))
        with pytest.raises(grpc.RpcError) as refused:
            vae_pb2_grpc.VaeServiceStub(channel).Score(request, timeout=30, metadata=metadata(call))
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "scorer" in refused.value.details() and "--max-queue-rows" in refused.value.details()
