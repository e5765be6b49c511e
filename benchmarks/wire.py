"""One Encode call as each protocol carries it, for the load generators.

``v1``: vae.v1's EncodeRequest. ``oip-grpc``: the Open Inference Protocol's ModelInferRequest
to ``NAME-encoder`` with the tensor in ``raw_input_contents`` (as tritonclient sends it).
``oip-http``: REST with the binary tensor data extension (a JSON header, then the bytes).
"""

from __future__ import annotations

import json

from vaeserve._proto import vae_pb2

PROTOCOLS = ("v1", "oip-grpc", "oip-http")
GRPC_PATHS = {"v1": "/vae.v1.VaeService/Encode", "oip-grpc": "/inference.GRPCInferenceService/ModelInfer"}
HEADER_LENGTH = "Inference-Header-Content-Length"
DATATYPES = {vae_pb2.DATA_TYPE_UINT8: "UINT8", vae_pb2.DATA_TYPE_FLOAT32: "FP32"}


def oip_request(message: vae_pb2.EncodeRequest):
    """The ModelInferRequest. Its stubs are imported here, not at the top: a process that has
    imported tritonclient's (the test suite) cannot load ours too (same package, inference)."""
    from vaeserve._proto import grpc_predict_v2_pb2 as oip

    request = oip.ModelInferRequest(
        model_name=f"{message.model}-encoder", raw_input_contents=[message.inputs.data]
    )
    request.inputs.add(name="x", datatype=DATATYPES[message.inputs.dtype], shape=message.inputs.shape)
    return request


def rest_request(message: vae_pb2.EncodeRequest) -> tuple[str, bytes, dict[str, str]]:
    """(path, body, headers) of the same call over HTTP, outputs asked for as binary."""
    header = {
        "inputs": [
            {
                "name": "x",
                "datatype": DATATYPES[message.inputs.dtype],
                "shape": list(message.inputs.shape),
                "parameters": {"binary_data_size": len(message.inputs.data)},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
    encoded = json.dumps(header).encode()
    headers = {HEADER_LENGTH: str(len(encoded)), "Content-Type": "application/octet-stream"}
    return f"/v2/models/{message.model}-encoder/infer", encoded + message.inputs.data, headers


def grpc_body(protocol: str, message: vae_pb2.EncodeRequest) -> bytes:
    """The serialized request a gRPC call of ``protocol`` sends."""
    return (oip_request(message) if protocol == "oip-grpc" else message).SerializeToString()
