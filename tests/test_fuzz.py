"""Random and hostile input, property-based (hypothesis): the codec and the wire parser, then the
live server through vae.v1 gRPC, OIP gRPC (tritonclient's messages) and OIP REST. Every answer is
OK or a documented client-error status, never INTERNAL or 500; the server stays up and its memory
bounded. `VAESERVE_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py` runs the long mode."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import servers
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vaeserve._proto import vae_pb2, vae_pb2_grpc
from vaeserve.bench import rss_mb
from vaeserve.client import VaeClient
from vaeserve.codec import read_tensor
from vaeserve.errors import TensorError
from vaeserve.rows import Rows
from vaeserve.service import wire

pytest.importorskip("tritonclient.grpc", reason="tritonclient is installed by make setup")
from tritonclient.grpc import service_pb2, service_pb2_grpc

EXAMPLES = int(os.environ.get("VAESERVE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
D, M = 784, 8
# What a server may answer to bad input: each a documented client error.
GRPC_ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
HTTP_ALLOWED = {200, 400, 404, 405, 413, 429, 503}

sizes = st.integers(-3, 5) | st.sampled_from([D, M, 4096, 4097, 2**31, -(2**63)])
tensors = st.builds(
    vae_pb2.Tensor,
    shape=st.lists(sizes, max_size=4),
    dtype=st.integers(0, 4),
    data=st.binary(max_size=2 * D * 4 + 3),
)
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
names = st.sampled_from(["", "tiny", "nope", "tiny/1", "\0"]) | st.text(max_size=6)
versions = st.sampled_from(["", "1", "latest", "9", "stable", "01", "-1", "¹", "٣"]) | st.text(max_size=6)


@pytest.fixture(scope="module")
def server(serve):
    return serve("--workers", "1", "--shared-memory")


# -- in-process ---------------------------------------------------------------------------------
@FUZZ
@given(tensor=tensors)
def test_the_codec_reads_a_tensor_or_says_what_is_wrong(tensor: vae_pb2.Tensor) -> None:
    try:
        rows = read_tensor(tensor, "inputs", Rows(D, 4096, uint8=True, low=0.0, high=1.0))
    except TensorError as exc:
        assert str(exc).startswith("inputs:")
        return
    assert rows.shape == (tensor.shape[0], D) and 1 <= tensor.shape[0] <= 4096


@FUZZ
@given(values=st.lists(floats, min_size=8, max_size=8))
def test_values_outside_zero_one_or_not_finite_are_refused(values: list[float]) -> None:
    array = np.array([values], np.float32)
    tensor = vae_pb2.Tensor(shape=[1, 8], dtype=vae_pb2.DATA_TYPE_FLOAT32, data=array.tobytes())
    fine = bool(np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1)
    try:
        read_tensor(tensor, "inputs", Rows(8, 4096, uint8=True, low=0.0, high=1.0))
    except TensorError as exc:
        assert not fine and ("NaN or infinity" in str(exc) or "expected [0, 1]" in str(exc))
    else:
        assert fine


parse = wire.tolerant(
    wire.tensor_request(vae_pb2.EncodeRequest, wire.field_number(vae_pb2.EncodeRequest, "inputs")),
    vae_pb2.EncodeRequest,
)
valid = st.builds(vae_pb2.EncodeRequest, model=names, version=versions, inputs=tensors, sample=st.booleans())


@FUZZ
@given(message=valid, cut=st.integers(0, 64), noise=st.binary(max_size=16), at=st.integers(0, 64))
def test_the_wire_parser_means_what_protobuf_means(message, cut: int, noise: bytes, at: int) -> None:
    raw = message.SerializeToString()
    raw = raw[: max(0, len(raw) - cut)]
    raw = raw[:at] + noise + raw[at:]  # truncated, then corrupted
    try:
        expected = vae_pb2.EncodeRequest.FromString(raw)
    except DecodeError:
        assert isinstance(parse(raw), wire.Undecodable)
        return
    received = parse(raw)
    message = vae_pb2.EncodeRequest()
    message.CopyFrom(received.message)
    if received.tensors is not None:
        message.inputs.data = bytes(received.tensors[0])
    assert message == expected


# -- the live server ----------------------------------------------------------------------------
@FUZZ
@given(request=valid, seed=st.none() | st.integers(0, 2**64 - 1))
def test_vae_v1_encode_answers_ok_or_a_client_error(server, request, seed) -> None:
    if seed is not None:
        request.seed = seed
    with grpc.insecure_channel(server.target) as channel:
        code, _ = servers.raw_status(vae_pb2_grpc.VaeServiceStub(channel).Encode, request)
    assert code in GRPC_ALLOWED, code


METHODS = ["Encode", "Decode", "Reconstruct", "SamplePrior", "Score", "GetModelInfo", "RegisterSharedMemory"]


@FUZZ
@given(
    tensor=tensors,
    iw_samples=st.sampled_from([0, 1, 3, 1000, 1001, 2**32 - 1]),
    seed=st.none() | st.integers(0, 2**64 - 1),
    offset=st.integers(0, 2**64 - 1),
    version=versions,
)
def test_vae_v1_score_answers_ok_or_a_client_error(server, tensor, iw_samples, seed, offset, version) -> None:
    request = vae_pb2.ScoreRequest(
        model="tiny", version=version, inputs=tensor, iw_samples=iw_samples, seed=seed, row_offset=offset
    )
    with grpc.insecure_channel(server.target) as channel:
        code, details = servers.raw_status(vae_pb2_grpc.VaeServiceStub(channel).Score, request)
    assert code in GRPC_ALLOWED, (code, details)


@FUZZ
@given(method=st.sampled_from(METHODS), raw=st.binary(max_size=200))
def test_raw_bytes_to_any_vae_v1_method_are_a_client_error(server, method: str, raw: bytes) -> None:
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary(f"/vae.v1.VaeService/{method}")  # bytes in, bytes out
        try:
            call(raw, timeout=10)
        except grpc.RpcError as error:
            assert error.code() in GRPC_ALLOWED, (error.code(), error.details())


@FUZZ
@given(
    model=st.sampled_from(["tiny-encoder", "tiny-decoder", "tiny-sample-prior", "tiny-score", "tiny", "x"]),
    version=versions,
    inputs=st.lists(
        st.tuples(
            st.sampled_from(["x", "z", "count", "y"]),
            st.sampled_from(["FP32", "UINT8", "INT64", "FP64", "BYTES", "BOOL", "??"]),
            st.lists(sizes, max_size=3),
        ),
        max_size=3,
    ),
    raw=st.lists(st.binary(max_size=2 * D * 4), max_size=3),
    parameters=st.dictionaries(
        st.sampled_from(["seed", "sample", "use_mean", "iw_samples", "row_offset", "other"]),
        st.integers(-5, 5),
    ),
)
def test_oip_model_infer_answers_ok_or_a_client_error(
    server, model, version, inputs, raw, parameters
) -> None:
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version, raw_input_contents=raw)
    for name, datatype, shape in inputs:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
    for key, value in parameters.items():
        request.parameters[key].int64_param = value
    with grpc.insecure_channel(server.target) as channel:
        code, _ = servers.raw_status(service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer, request)
    assert code in GRPC_ALLOWED, code


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | floats.map(float) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
bodies = json_values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=300)
infer_like = st.fixed_dictionaries(
    {
        "inputs": st.lists(
            st.fixed_dictionaries(
                {
                    "name": st.sampled_from(["x", "z", "count"]),
                    "datatype": st.sampled_from(["FP32", "UINT8", "INT64", "X"]),
                    "shape": st.lists(sizes, max_size=3),
                    "data": json_values,
                }
            ),
            max_size=2,
        )
    },
    optional={"parameters": json_values, "outputs": json_values, "id": json_values},
).map(lambda v: json.dumps(v).encode())


@FUZZ
@given(
    path=st.sampled_from(
        [
            "/v2/models/tiny-encoder/infer",
            "/v2/models/tiny-sample-prior/versions/1/infer",
            "/v2/models/x/infer",
        ]
    ),
    body=bodies | infer_like,
    header_length=st.none()
    | st.integers(-5, 400).map(str)
    | st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=4),  # what a header can carry
)
def test_oip_rest_answers_ok_or_a_client_error(server, path: str, body: bytes, header_length) -> None:
    headers = {"Content-Type": "application/json"}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = header_length
    request = urllib.request.Request(f"http://{server.http}{path}", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            status = answer.status
    except urllib.error.HTTPError as error:
        status = error.code
        assert "error" in json.loads(error.read())  # every error says what was wrong
    assert status in HTTP_ALLOWED, status


shared_refs = st.builds(
    vae_pb2.SharedMemoryRef,
    region=st.sampled_from(["", "fuzz-region", "nope"]) | st.text(max_size=4),
    offset=st.integers(0, 2**64 - 1) | st.integers(0, 70_000),
    byte_size=st.integers(0, 2**64 - 1) | st.integers(0, 70_000),
)


@pytest.fixture(scope="module")
def region(server):
    """A registered 64 KiB region for the fuzzed references to point into (or past)."""
    import uuid
    from multiprocessing import shared_memory

    memory = shared_memory.SharedMemory(name=f"vaeserve-fuzz-{uuid.uuid4().hex}", create=True, size=65536)
    with grpc.insecure_channel(server.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        stub.RegisterSharedMemory(
            vae_pb2.RegisterSharedMemoryRequest(name="fuzz-region", key=memory.name, byte_size=memory.size)
        )
        yield memory
        stub.UnregisterSharedMemory(vae_pb2.UnregisterSharedMemoryRequest(name="fuzz-region"))
    memory.close()
    memory.unlink()


@FUZZ
@given(
    shape=st.lists(sizes, max_size=3),
    dtype=st.integers(0, 2),
    reference=shared_refs,
    output=st.none() | shared_refs,
    data=st.sampled_from([b"", b"\0" * 8]),
)
def test_shared_memory_references_answer_ok_or_a_client_error(
    server, region, shape, dtype, reference, output, data
):
    tensor = vae_pb2.Tensor(shape=shape, dtype=dtype, data=data, shared_memory=reference)
    request = vae_pb2.EncodeRequest(inputs=tensor)
    if output is not None:
        request.output_shared_memory.CopyFrom(output)
    with grpc.insecure_channel(server.target) as channel:
        code, _ = servers.raw_status(vae_pb2_grpc.VaeServiceStub(channel).Encode, request)
    assert code in GRPC_ALLOWED, code


def test_the_server_is_still_up_and_its_memory_bounded(server) -> None:
    """Runs after the fuzzing above (module order): health, a correct answer, RSS."""
    with VaeClient(server.target) as client:
        assert client.health() == "SERVING"
        assert client.encode(np.zeros((2, D), np.uint8))["mean"].shape == (2, M)
    assert rss_mb(server.process.pid) < 400
    assert "Traceback" not in server.output() and "internal error" not in server.output()
