"""The Open Inference Protocol on the real server, driven by clients other projects wrote:
tritonclient over gRPC and HTTP (binary tensors), plain JSON over urllib, and tritonclient's
own generated stubs for messages its high-level client cannot send."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import servers

from vaeserve.client import VaeClient
from vaeserve.datasets import model_inputs
from vaeserve.repository import resolve
from vaeserve.runtime import OnnxPair

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402 - after the skip
from tritonclient.utils import InferenceServerException  # noqa: E402

D, M = 784, 8
MAX_ROWS = 64
MODELS = ("tiny-encoder", "tiny-decoder", "tiny-reconstruct", "tiny-sample-prior")


@pytest.fixture(scope="module")
def server(serve):
    return serve("--max-request-rows", str(MAX_ROWS), "--max-message-mb", "1")


@pytest.fixture(scope="module")
def pair(repo: Path) -> OnnxPair:
    return OnnxPair.load(resolve(repo, "tiny"))


@pytest.fixture(scope="module")
def pixels(mnist) -> np.ndarray:
    return mnist.test_images[:MAX_ROWS].reshape(MAX_ROWS, D)


# -- three clients, one call shape: (model, {input: array}, parameters, outputs) → {output: array} --
def grpc_infer(server, model, inputs, parameters=None, outputs=None, headers=None):
    client = tritonclient_grpc.InferenceServerClient(server.target)
    given = []
    for name, array in inputs.items():
        tensor = tritonclient_grpc.InferInput(name, list(array.shape), _datatype(array))
        tensor.set_data_from_numpy(array)
        given.append(tensor)
    asked = [tritonclient_grpc.InferRequestedOutput(n) for n in outputs] if outputs else None
    result = client.infer(model, given, outputs=asked, parameters=parameters, headers=headers)
    return {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}


def http_infer(server, model, inputs, parameters=None, outputs=None, headers=None):
    client = tritonclient_http.InferenceServerClient(server.http)
    given = []
    for name, array in inputs.items():
        tensor = tritonclient_http.InferInput(name, list(array.shape), _datatype(array))
        tensor.set_data_from_numpy(array, binary_data=True)
        given.append(tensor)
    asked = (
        [tritonclient_http.InferRequestedOutput(n, binary_data=True) for n in outputs] if outputs else None
    )
    result = client.infer(model, given, outputs=asked, parameters=parameters, headers=headers)
    return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response()["outputs"]}


def json_infer(server, model, inputs, parameters=None, outputs=None, headers=None):
    body = {
        "inputs": [
            {"name": n, "datatype": _datatype(a), "shape": list(a.shape), "data": a.tolist()}
            for n, a in inputs.items()
        ],
        "parameters": parameters or {},
    }
    if outputs:
        body["outputs"] = [{"name": n} for n in outputs]
    answer = post(server, f"/v2/models/{model}/infer", json.dumps(body).encode(), headers)
    dtypes = {"FP32": np.float32, "UINT8": np.uint8}
    return {
        o["name"]: np.asarray(o["data"], dtypes[o["datatype"]]).reshape(o["shape"]) for o in answer["outputs"]
    }


CLIENTS = {"grpc": grpc_infer, "http-binary": http_infer, "http-json": json_infer}


def _datatype(array: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(array.dtype)


def post(server, path: str, body: bytes, headers=None) -> dict:
    request = urllib.request.Request(
        f"http://{server.http}{path}", body, {"Content-Type": "application/json", **(headers or {})}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def http_error(server, path: str, body: bytes | None = None, method: str | None = None, headers=None):
    """(status, error message) of a request that must fail."""
    request = urllib.request.Request(f"http://{server.http}{path}", body, headers or {}, method=method)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.headers["Content-Type"].startswith("application/json")
    return info.value.code, json.loads(info.value.read())["error"]


def count(n: int) -> dict[str, np.ndarray]:
    return {"count": np.array([n], np.int64)}


# -- the protocol definition ----------------------------------------------------------------
def test_our_proto_numbers_every_field_as_tritons_own_copy(tmp_path: Path) -> None:
    """Field numbers and types, message by message, against an independently published copy
    of the specification (tritonclient's grpc_service.proto), so generated clients interoperate."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    root = Path(__file__).resolve().parents[1] / "protos"
    out = tmp_path / "oip.desc"
    assert (
        protoc.main(["protoc", f"-I{root}", f"--descriptor_set_out={out}", "inference/grpc_predict_v2.proto"])
        == 0
    )
    ours = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    assert (ours.package, [s.name for s in ours.service]) == ("inference", ["GRPCInferenceService"])
    theirs = service_pb2.DESCRIPTOR.message_types_by_name

    def compare(message: descriptor_pb2.DescriptorProto, reference) -> int:
        checked = 0
        for field in message.field:
            other = reference.fields_by_name[field.name]
            assert (field.number, field.type) == (other.number, other.type), f"{message.name}.{field.name}"
            checked += 1
        for nested in message.nested_type:
            if not nested.options.map_entry:
                checked += compare(nested, reference.nested_types_by_name[nested.name])
        return checked

    assert sum(compare(m, theirs[m.name]) for m in ours.message_type) >= 50
    methods = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    for method in ours.service[0].method:
        assert method.input_type == f".{methods[method.name].input_type.full_name}"
        assert method.output_type == f".{methods[method.name].output_type.full_name}"


# -- results ----------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", list(CLIENTS))
def test_every_model_equals_onnxruntime_and_vae_v1(server, pair, pixels, protocol) -> None:
    infer = CLIENTS[protocol]
    x = model_inputs(pixels, "threshold")
    mean, stddev = pair.encode(x)
    for inputs in ({"x": x}, {"x": pixels}):  # float32 model inputs and raw uint8 pixels
        out = infer(server, "tiny-encoder", inputs)
        assert set(out) == {"mean", "stddev"}
        np.testing.assert_allclose(out["mean"], mean, atol=1e-6, rtol=0)
        np.testing.assert_allclose(out["stddev"], stddev, atol=1e-6, rtol=0)
    z = np.random.default_rng(0).standard_normal((20, M), dtype=np.float32)
    np.testing.assert_allclose(infer(server, "tiny-decoder", {"z": z})["probs"], pair.decode(z)[1], atol=1e-6)
    with VaeClient(server.target) as v1:
        expected = {
            "tiny-encoder": v1.encode(pixels, sample=True, seed=3),
            "tiny-decoder": v1.decode(z, sample=True, seed=3),
            "tiny-reconstruct": v1.reconstruct(pixels, seed=3),
            "tiny-sample-prior": v1.sample_prior(9, seed=3),
        }
        mean_rebuilt = v1.reconstruct(pixels, use_mean=True, seed=3)
    inputs = {"tiny-encoder": {"x": pixels}, "tiny-decoder": {"z": z}, "tiny-sample-prior": count(9)}
    for model, want in expected.items():
        got = infer(server, model, inputs.get(model, {"x": pixels}), {"seed": 3, "sample": True})
        assert set(got) == set(want), model
        for name in want:  # same data plane, same seed: bit-identical
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{model} {name}")
    got = infer(server, "tiny-reconstruct", {"x": pixels}, {"seed": 3, "use_mean": True})
    np.testing.assert_array_equal(got["latents"], mean_rebuilt["latents"])
    np.testing.assert_allclose(got["latents"], mean, atol=1e-6)


@pytest.mark.parametrize("protocol", list(CLIENTS))
def test_name_score_equals_vae_v1_score(server, pixels, protocol) -> None:
    """NAME-score and vae.v1's Score run the same data plane: with the same seed, k and row
    offset, every per-row score is bit-identical; unseeded, the input-complexity part (no draws)
    still is."""
    infer = CLIENTS[protocol]
    rows = pixels[:12]
    with VaeClient(server.target) as v1:
        want = v1.score(rows, iw_samples=5, seed=9, row_offset=100)
    got = infer(server, "tiny-score", {"x": rows}, {"seed": 9, "iw_samples": 5, "row_offset": 100})
    assert set(got) == {"elbo", "log_px", "complexity_bits", "ood_score"} == set(want)
    for name in want:
        assert got[name].shape == (len(rows),) and got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    unseeded = infer(server, "tiny-score", {"x": rows})
    np.testing.assert_array_equal(unseeded["complexity_bits"], want["complexity_bits"])


@pytest.mark.parametrize("protocol", list(CLIENTS))
def test_seeds_reproduce_and_outputs_can_be_chosen(server, pixels, protocol) -> None:
    infer = CLIENTS[protocol]
    first = infer(server, "tiny-sample-prior", count(5), {"seed": 11})
    again = infer(server, "tiny-sample-prior", count(5), {"seed": 11})
    other = infer(server, "tiny-sample-prior", count(5), {"seed": 12})
    for name in ("latents", "probs", "samples"):
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["latents"], other["latents"])
    assert first["samples"].dtype == np.uint8 and set(np.unique(first["samples"])) <= {0, 1}
    chosen = infer(server, "tiny-encoder", {"x": pixels[:4]}, {"seed": 1}, outputs=["z", "mean"])
    assert list(chosen) == ["z", "mean"] and chosen["z"].shape == (4, M)
    assert not np.array_equal(chosen["z"], chosen["mean"])


def test_typed_contents_are_answered_in_kind(server, pair, pixels) -> None:
    """gRPC inputs as typed contents (not raw bytes) get typed contents back."""
    x = model_inputs(pixels[:3], "threshold")
    request = service_pb2.ModelInferRequest(model_name="tiny-encoder", model_version="1")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[3, D])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    with grpc.insecure_channel(server.target) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        raw = service_pb2.ModelInferRequest(model_name="tiny-decoder", raw_input_contents=[b"\0" * 4 * M])
        raw.inputs.add(name="z", datatype="FP32", shape=[1, M])
        raw.parameters["sample"].bool_param = True
        decoded = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(raw, timeout=30)
    assert not response.raw_output_contents and response.model_version == "1"
    mean = np.asarray(response.outputs[0].contents.fp32_contents, np.float32).reshape(3, M)
    np.testing.assert_allclose(mean, pair.encode(x)[0], atol=1e-6)
    assert [o.name for o in decoded.outputs] == ["probs", "samples"]
    assert len(decoded.raw_output_contents[1]) == D and not decoded.outputs[1].contents.uint_contents


# -- metadata and health ----------------------------------------------------------------------
def test_metadata_is_exact_over_both_protocols(server) -> None:
    shapes = {
        "tiny-encoder": (
            [("x", "FP32", [-1, D])],
            [("mean", "FP32", [-1, M]), ("stddev", "FP32", [-1, M]), ("z", "FP32", [-1, M])],
        ),
        "tiny-decoder": (
            [("z", "FP32", [-1, M])],
            [("probs", "FP32", [-1, D]), ("samples", "UINT8", [-1, D])],
        ),
        "tiny-reconstruct": (
            [("x", "FP32", [-1, D])],
            [("probs", "FP32", [-1, D]), ("samples", "UINT8", [-1, D]), ("latents", "FP32", [-1, M])],
        ),
        "tiny-sample-prior": (
            [("count", "INT64", [1])],
            [("latents", "FP32", [-1, M]), ("probs", "FP32", [-1, D]), ("samples", "UINT8", [-1, D])],
        ),
    }
    over_grpc = tritonclient_grpc.InferenceServerClient(server.target)
    over_http = tritonclient_http.InferenceServerClient(server.http)
    for client in (over_grpc, over_http):
        assert client.is_server_live() and client.is_server_ready()
        assert not client.is_model_ready("tiny-nothing") and not client.is_model_ready("tiny-encoder", "7")
    for model, (inputs, outputs) in shapes.items():
        from_grpc = over_grpc.get_model_metadata(model, "1", as_json=True)
        from_http = over_http.get_model_metadata(model)
        for found in (from_grpc, from_http):
            assert (found["name"], found["versions"], found["platform"]) == (model, ["1"], "vaeserve")
            tensors = lambda items: [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in items]  # noqa: E731
            assert tensors(found["inputs"]) == inputs and tensors(found["outputs"]) == outputs
        assert over_grpc.is_model_ready(model) and over_http.is_model_ready(model, "1")
    for found in (over_grpc.get_server_metadata(as_json=True), over_http.get_server_metadata()):
        assert found["name"] == "vaeserve" and "binary_tensor_data" in found["extensions"]


def test_openapi_document_is_valid_and_names_every_route(server) -> None:
    from openapi_spec_validator import validate

    document = json.loads(urllib.request.urlopen(f"http://{server.http}/v2/openapi.json", timeout=10).read())
    validate(document)
    assert {"/v2/health/live", "/v2/health/ready", "/v2", "/v2/models/{model}/infer"} <= set(
        document["paths"]
    )
    assert "/v2/models/{model}/versions/{version}/ready" in document["paths"]
    assert {"/v2/repository/index", "/v2/repository/models/{model}/unload"} <= set(document["paths"])


# -- errors -------------------------------------------------------------------------------------
BAD = [
    # (model, inputs, parameters, gRPC code, HTTP code, words of the message)
    (
        "tiny-encoder",
        {"x": np.zeros((2, 5), np.float32)},
        None,
        "INVALID_ARGUMENT",
        400,
        "5 columns; this model expects 784",
    ),
    (
        "tiny-encoder",
        {"x": np.zeros((2, D), np.float64)},
        None,
        "INVALID_ARGUMENT",
        400,
        "datatype 'FP64'; expected FP32 or UINT8",
    ),
    (
        "tiny-encoder",
        {"x": np.full((1, D), np.nan, np.float32)},
        None,
        "INVALID_ARGUMENT",
        400,
        "NaN or infinity at row 0",
    ),
    ("tiny-encoder", {"x": np.full((1, D), 2, np.float32)}, None, "INVALID_ARGUMENT", 400, "expected [0, 1]"),
    ("tiny-encoder", {"x": np.zeros((0, D), np.float32)}, None, "INVALID_ARGUMENT", 400, "empty batch"),
    (
        "tiny-encoder",
        {"x": np.zeros((MAX_ROWS + 1, D), np.uint8)},
        None,
        "INVALID_ARGUMENT",
        400,
        f"limit of {MAX_ROWS}",
    ),
    ("tiny-encoder", {"y": np.zeros((1, D), np.float32)}, None, "INVALID_ARGUMENT", 400, "input 'y'"),
    ("tiny-decoder", {"z": np.zeros((1, M), np.uint8)}, None, "INVALID_ARGUMENT", 400, "expected FP32"),
    ("tiny-sample-prior", count(0), None, "INVALID_ARGUMENT", 400, f"count: 0; expected 1 to {MAX_ROWS}"),
    ("tiny-sample-prior", count(2), {"sed": 1}, "INVALID_ARGUMENT", 400, "parameters ['sed']"),
    ("tiny-sample-prior", count(2), {"seed": "x"}, "INVALID_ARGUMENT", 400, "parameter seed"),
    ("tiny-nothing", count(1), None, "NOT_FOUND", 404, "'tiny-nothing' is not served"),
    ("nothing-encoder", count(1), None, "NOT_FOUND", 404, "is not served here"),
]


@pytest.mark.parametrize("model, inputs, parameters, code, status, words", BAD)
def test_bad_requests_get_their_status_over_both_protocols(
    server, model, inputs, parameters, code, status, words
):
    with pytest.raises(InferenceServerException) as over_grpc:
        grpc_infer(server, model, inputs, parameters)
    assert over_grpc.value.status() == f"StatusCode.{code}" and words in over_grpc.value.message()
    with pytest.raises(InferenceServerException) as over_http:
        http_infer(server, model, inputs, parameters)
    assert over_http.value.status() == str(status) and words in over_http.value.message()


def test_unknown_versions_and_outputs(server, pixels) -> None:
    stub_error = None
    with grpc.insecure_channel(server.target) as channel:
        request = service_pb2.ModelInferRequest(
            model_name="tiny-encoder", model_version="9", raw_input_contents=[b""]
        )
        request.inputs.add(name="x", datatype="UINT8", shape=[1, D])
        try:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        except grpc.RpcError as exc:
            stub_error = exc
        short = service_pb2.ModelInferRequest(model_name="tiny-encoder", raw_input_contents=[b"\1" * 7])
        short.inputs.add(name="x", datatype="UINT8", shape=[1, D])
        with pytest.raises(grpc.RpcError) as wrong_length:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(short, timeout=30)
    assert stub_error.code() == grpc.StatusCode.NOT_FOUND and "no loaded version '9'" in stub_error.details()
    assert wrong_length.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "7 bytes for shape [1, 784] of UINT8; expected 784" in wrong_length.value.details()
    with pytest.raises(InferenceServerException) as unknown_output:
        http_infer(server, "tiny-decoder", {"z": np.zeros((1, M), np.float32)}, outputs=["logits"])
    assert (
        unknown_output.value.status() == "400"
        and "its outputs: probs, samples" in unknown_output.value.message()
    )


def test_http_errors_are_json_with_precise_codes(server) -> None:
    path = "/v2/models/tiny-sample-prior/infer"
    assert http_error(server, path, b"{not json")[0] == 400
    status, message = http_error(server, path, json.dumps({"inputs": []}).encode())
    assert status == 400 and '"inputs"' in message
    body = json.dumps(
        {
            "inputs": [
                {"name": "count", "datatype": "INT64", "shape": [1], "parameters": {"binary_data_size": 8}}
            ]
        }
    )
    status, message = http_error(
        server, path, body.encode() + b"\0" * 4, headers={"Inference-Header-Content-Length": str(len(body))}
    )
    assert status == 400 and "binary_data_size 8; 4 bytes of binary data remain" in message
    status, message = http_error(server, path, b"{" + b" " * (2 << 20) + b"}")
    assert status == 413 and "over this server's limit" in message
    assert http_error(server, "/v2/models/tiny-nothing/versions/1")[0] == 404
    assert http_error(server, "/v2/models/tiny-encoder/versions/5/ready")[0] == 404
    assert http_error(server, "/v2/no/such/path")[0] == 404
    assert http_error(server, path, method="GET")[0] == 405
    assert http_error(server, "/v2", b"{}", method="POST")[0] == 405


def test_metrics_count_calls_by_protocol(server, pixels) -> None:
    grpc_infer(server, "tiny-encoder", {"x": pixels[:2]})
    http_infer(server, "tiny-encoder", {"x": pixels[:2]})
    with pytest.raises(InferenceServerException):
        http_infer(server, "tiny-nothing", {"x": pixels[:2]})
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    )
    assert 'vaeserve_requests_total{code="OK",method="ModelInfer",model="tiny",protocol="oip-grpc"}' in text
    assert 'vaeserve_requests_total{code="200",method="ModelInfer",model="tiny",protocol="oip-http"}' in text
    assert 'vaeserve_requests_total{code="404",method="ModelInfer",model="",protocol="oip-http"}' in text
    assert 'vaeserve_rows_total{method="ModelInfer",protocol="oip-grpc"}' in text


# -- security and lifecycle -----------------------------------------------------------------------
def test_a_token_protected_server_refuses_without_it(repo: Path, tmp_path: Path, pixels) -> None:
    (tmp_path / "token").write_text("oip-s3cret\n")
    bearer = {"authorization": "Bearer oip-s3cret"}
    with servers.running(
        repo, tmp_path / "serve.log", "--token-file", str(tmp_path / "token"), client={"token": "oip-s3cret"}
    ) as secured:
        for infer in (grpc_infer, http_infer):
            with pytest.raises(InferenceServerException) as refused:
                infer(secured, "tiny-sample-prior", count(1))
            assert refused.value.status() in ("StatusCode.UNAUTHENTICATED", "401")
            assert infer(secured, "tiny-sample-prior", count(2), headers=bearer)["samples"].shape == (2, D)
        status, message = http_error(secured, "/v2")
        assert status == 401 and "bearer token" in message
        assert tritonclient_grpc.InferenceServerClient(secured.target).is_server_ready()  # health stays open
        assert tritonclient_http.InferenceServerClient(secured.http).is_model_ready("tiny-encoder")
    assert "oip-s3cret" not in (tmp_path / "serve.log").read_text()


def test_http_over_tls_and_mutual_tls(repo: Path, tmp_path: Path) -> None:
    import ssl

    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    files = {name: tmp_path / f"{name}.pem" for name in ("key", "cert", "ca", "client", "client-key")}
    cert, client_cert = ca.issue_cert("127.0.0.1", "localhost"), ca.issue_cert("client")
    cert.private_key_pem.write_to_path(str(files["key"]))
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    ca.cert_pem.write_to_path(str(files["ca"]))
    client_cert.cert_chain_pems[0].write_to_path(str(files["client"]))
    client_cert.private_key_pem.write_to_path(str(files["client-key"]))
    flags = ["--tls-cert", files["cert"], "--tls-key", files["key"], "--tls-client-ca", files["ca"]]
    mutual = {
        "root_certificates": files["ca"],
        "client_certificate": files["client"],
        "client_key": files["client-key"],
    }
    with servers.running(repo, tmp_path / "tls.log", *map(str, flags), client=mutual) as secured:
        url = f"https://{secured.http}/v2"
        without_certificate = ssl.create_default_context(cafile=str(files["ca"]))
        with pytest.raises(OSError):
            urllib.request.urlopen(url, timeout=10, context=without_certificate).read()
        with_certificate = ssl.create_default_context(cafile=str(files["ca"]))
        with_certificate.load_cert_chain(files["client"], files["client-key"])
        answer = urllib.request.urlopen(url, timeout=10, context=with_certificate).read()
        assert json.loads(answer)["name"] == "vaeserve"
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://{secured.http}/v2", timeout=10).read()  # plaintext


def test_sigterm_drains_http_calls_in_flight(repo: Path, tmp_path: Path, pixels) -> None:
    """Calls already received when SIGTERM arrives are answered; then the server exits 0."""
    from tritonclient.http import aio

    started = servers.start(repo, tmp_path / "serve.log", "--grace-s", "20")
    big = np.tile(pixels, (64, 1))  # 4,096 rows a call

    async def calls() -> tuple[list, list[float], float]:
        clients = [aio.InferenceServerClient(started.http) for _ in range(16)]
        for client in clients:  # each connection open (and its answer read) before the signal
            try:
                assert (await client.get_model_metadata("tiny-encoder"))["name"] == "tiny-encoder"
            except InferenceServerException as exc:  # the status and error, with the server's log
                pytest.fail(f"before the signal: {exc}\n{started.output()}")
        finished: list[float] = []

        async def call(client):
            x = aio.InferInput("x", list(big.shape), "UINT8")
            x.set_data_from_numpy(big, binary_data=True)
            result = await client.infer("tiny-reconstruct", [x])
            finished.append(time.monotonic())
            return result.as_numpy("probs").shape

        tasks = [asyncio.create_task(call(c)) for c in clients]
        await asyncio.sleep(0.1)
        signalled = time.monotonic()
        started.process.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            await client.close()
        return results, finished, signalled

    results, finished, signalled = asyncio.run(calls())
    assert started.process.wait(60) == 0, started.output()
    assert results == [(len(big), D)] * 16, results
    assert max(finished) > signalled, "every call ended before the signal: nothing was drained"
    assert "draining calls" in started.output() and "stopped" in started.output()


def test_http_overload_is_refused_quickly_with_json(repo: Path, tmp_path: Path, pixels) -> None:
    """More requests than --max-concurrent-rpcs, or than the queue holds, get 429 with Retry-After
    (RESOURCE_EXHAUSTED's code, as over gRPC): each a JSON error saying which limit, never a hang,
    a 503 or a 500; the server keeps answering."""
    import aiohttp

    flags = ("--max-concurrent-rpcs", "3", "--batching", "--max-queue-rows", "4096")
    big = np.tile(pixels, (64, 1))  # 4,096 rows: one fills the queue
    body = {"inputs": [{"name": "x", "datatype": "UINT8", "shape": list(big.shape), "parameters": {}}]}

    async def burst(url: str) -> list[tuple[int, dict, str | None]]:
        header = json.dumps(
            {**body, "inputs": [{**body["inputs"][0], "parameters": {"binary_data_size": big.nbytes}}]}
        )
        data = header.encode() + big.tobytes()
        headers = {"Inference-Header-Content-Length": str(len(header))}
        async with aiohttp.ClientSession() as session:

            async def call() -> tuple[int, dict, str | None]:
                async with session.post(url, data=data, headers=headers) as answer:
                    content = await answer.read()
                    payload = json.loads(
                        content[: int(answer.headers.get("Inference-Header-Content-Length", len(content)))]
                    )
                    return answer.status, payload, answer.headers.get("Retry-After")

            return await asyncio.gather(*(call() for _ in range(24)))

    with servers.running(repo, tmp_path / "serve.log", *flags) as busy:
        answers = asyncio.run(burst(f"http://{busy.http}/v2/models/tiny-encoder/infer"))
        statuses = [status for status, _, _ in answers]
        assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
        refusals = [payload["error"] for status, payload, _ in answers if status == 429]
        assert all(retry_after == "1" for status, _, retry_after in answers if status == 429)
        assert any("requests in progress" in message for message in refusals), refusals
        assert all("requests in progress" in m or "rows already queued" in m for m in refusals), refusals
        assert tritonclient_http.InferenceServerClient(busy.http).is_server_ready()


def test_a_client_gone_mid_request_is_counted_499_not_500(server) -> None:
    """A client that closes its connection halfway through the body (as a load generator does when
    its time is up) is no server error: counted as 499, nothing logged as a failure."""
    import socket

    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        head = (
            "POST /v2/models/tiny-encoder/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n"
        )
        sock.sendall(head.encode() + b"{" * 1000)
    deadline = time.monotonic() + 10
    page = ""
    while time.monotonic() < deadline and 'code="499"' not in page:
        time.sleep(0.1)
        page = (
            urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10)
            .read()
            .decode()
        )
    assert 'vaeserve_requests_total{code="499",method="ModelInfer",model="tiny",protocol="oip-http"}' in page
    assert 'code="500"' not in page and "Traceback" not in server.output()
    assert tritonclient_http.InferenceServerClient(server.http).is_server_live()


def test_compressed_http_bodies_as_tritonclient_sends_them(server, pixels) -> None:
    client = tritonclient_http.InferenceServerClient(server.http)
    x = tritonclient_http.InferInput("x", list(pixels[:8].shape), "UINT8")
    x.set_data_from_numpy(pixels[:8], binary_data=True)
    plain = client.infer("tiny-encoder", [x]).as_numpy("mean")
    for algorithm in ("gzip", "deflate"):
        squeezed = client.infer(
            "tiny-encoder",
            [x],
            request_compression_algorithm=algorithm,
            response_compression_algorithm=algorithm,
        )
        np.testing.assert_array_equal(squeezed.as_numpy("mean"), plain)
